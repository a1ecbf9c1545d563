"""Readers: JSONL files, folders, globs, `datasets` folders and hub ids; `id_or_path#N` sampling; mixing.

A hub id may name subsets as ms-swift does: `owner/name:subset#N`, several as `owner/name:a/b`
(their rows are concatenated). A local path is always tried first, so a file or folder whose
name holds `:` still reads as itself.

Rows are read raw (JSONL lines stay text) and parsed later in the worker processes, so a
bad line is reported where it is processed, with its file and line number. Blank lines are
not rows. Several dataset specs are mixed by concatenation (the sampler shuffles every epoch).
"""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megalora.data.errors import DataError
from megalora.data.hub_datasets import DEFAULT_TIMEOUT_S, HubDatasetError, load_hub_dataset

# `datasets` is imported where a `save_to_disk` folder is read: it is slow to import and most runs read JSONL.

JSONL_SUFFIXES = (".jsonl", ".json")
_DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SUBSETS = re.compile(r"^[\w.-]+(/[\w.-]+)*$")


@dataclass(frozen=True)
class Row:
    """One input row: `text` for a JSONL line (parsed later), `obj` for a row of a `datasets` table,
    `error` for a line that could not even be decoded (reported where rows are processed)."""
    source: str
    line: int
    text: str | None = None
    obj: dict | None = None
    error: str | None = None


def parse_spec(spec: str) -> tuple[str, int | None]:
    """Split `path_or_id#N` into (path_or_id, N); N is None without a suffix."""
    target, sep, count = spec.rpartition("#")
    if not sep or not count.isdigit():
        return spec, None
    if int(count) < 1:
        raise DataError(f"dataset `{spec}`: the sample count after # must be >= 1")
    return target, int(count)


def parse_hub_target(target: str) -> tuple[str, list[str]]:
    """Split `owner/name:subset[/subset...]` into (owner/name, [subsets]); no `:` gives no subsets."""
    dataset_id, sep, subsets = target.partition(":")
    if not sep:
        return target, []
    if not _SUBSETS.match(subsets):
        raise DataError(f"dataset `{target}`: after `:` give subset names separated by `/` (e.g. "
                        f"`{dataset_id}:default`)")
    return dataset_id, subsets.split("/")


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append(Row(str(path), number, error=f"{e.reason} at byte {e.start}"))
                continue
            if text.strip():
                rows.append(Row(str(path), number, text=text))
    return rows


def read_datasets_folder(path: Path) -> list[Row]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: a `datasets` folder with splits {sorted(ds)} and no `train` split")
    return [Row(str(path), i + 1, obj=dict(row)) for i, row in enumerate(ds)]


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in JSONL_SUFFIXES)


def read_source(target: str, *, use_hf: bool = False, hub_timeout: float = DEFAULT_TIMEOUT_S) -> list[Row]:
    """All rows of one path, folder, glob or hub id (no sampling)."""
    path = Path(target).expanduser()
    if path.is_file():
        return read_jsonl(path)
    if path.is_dir():
        if any((path / m).exists() for m in _DATASETS_MARKERS):
            return read_datasets_folder(path)
        files = _files_in(path)
        if not files:
            raise DataError(f"dataset folder `{target}` holds no .jsonl/.json files and is not a `datasets` folder")
        return [row for f in files for row in read_jsonl(f)]
    if glob.has_magic(target):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"dataset glob `{target}` matches no files")
        return [row for f in files for row in read_jsonl(f)]
    dataset_id, subsets = parse_hub_target(target) if ":" in target and _HUB_ID.match(target.partition(":")[0]) \
        else (target, [])
    if target.startswith(("/", "./", "../", "~")) or target.endswith(JSONL_SUFFIXES) or not _HUB_ID.match(dataset_id):
        raise DataError(f"dataset `{target}` not found: no such file or folder (a hub id looks like `owner/name`, "
                        "a subset of one `owner/name:subset`)")
    rows = []
    for subset in subsets or [None]:
        source = f"{'hf' if use_hf else 'modelscope'}:{dataset_id}" + (f":{subset}" if subset else "")
        try:
            table = load_hub_dataset(dataset_id, use_hf=use_hf, subset=subset, timeout=hub_timeout)
        except HubDatasetError as e:
            raise HubDatasetError(f"{e} (no local file or folder `{target}` exists either)") from None
        rows += [Row(source, i + 1, obj=row) for i, row in enumerate(table)]
    return rows


def sample_indices(num_rows: int, count: int, *, seed: int | list[int]) -> np.ndarray:
    """`count` row indices: below the size a seeded sample without replacement; above it whole
    repeats of every row, then a seeded sample of the remainder."""
    if num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    repeats, rest = divmod(count, num_rows)
    tail = np.sort(rng.choice(num_rows, size=rest, replace=False))
    return np.concatenate([np.tile(np.arange(num_rows), repeats), tail]).astype(np.int64)


def read_datasets(specs: list[str], *, seed: int, use_hf: bool = False,
                  hub_timeout: float = DEFAULT_TIMEOUT_S) -> list[Row]:
    """Rows of several dataset specs mixed together, each sampled by its `#N` suffix."""
    rows: list[Row] = []
    for index, spec in enumerate(specs):
        target, count = parse_spec(spec)
        source_rows = read_source(target, use_hf=use_hf, hub_timeout=hub_timeout)
        if count is not None:
            if not source_rows:
                raise DataError(f"dataset `{spec}`: nothing to sample from, `{target}` has no rows")
            source_rows = [source_rows[i] for i in sample_indices(len(source_rows), count, seed=[seed, index])]
        rows.extend(source_rows)
    return rows
