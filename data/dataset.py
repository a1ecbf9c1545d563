"""The trainer's entry: `build_dataset(cfg_data, tokenizer, cache_dir=...)` -> TokenizedDataset.

Reads the configured datasets, validates and tokenises every row (cached on disk, worker
processes), and returns the samples with their counts. Under torch.distributed rank 0
tokenises and writes the cache first; the other ranks then read it (or tokenise themselves
when the cache folder is not shared), so every rank ends with identical data — and a bad
row in strict mode raises the same DataError on every rank instead of hanging the others.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from megalora.data.cache import cache_key, load_processed, save_processed
from megalora.data.encode import EncodeSettings, check_tokenizer
from megalora.data.errors import BAD_ROW_REASONS, REASONS, DataError, Problem
from megalora.data.hub_datasets import DEFAULT_TIMEOUT_S
from megalora.data.pipeline import DataStats, Processed, RowSettings, masking_line, process_rows
from megalora.data.readers import Row, read_datasets


class TokenizedDataset:
    """Tokenised samples: `ds[i]` is `(input_ids, labels)`, int32 arrays of equal length, labels not shifted."""

    def __init__(self, data: Processed, *, name: str = "train", key: str | None = None):
        self.data, self.name, self.key = data, name, key
        self.lengths = np.diff(data.offsets).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i = i % len(self)
        s, e = self.data.offsets[i], self.data.offsets[i + 1]
        return self.data.input_ids[s:e], self.data.labels[s:e]

    @property
    def stats(self) -> DataStats:
        return self.data.stats

    @property
    def problems(self) -> list[Problem]:
        return self.data.problems

    def provenance(self, i: int) -> tuple[str, int]:
        """(file or hub id, line) of sample i."""
        return self.data.sources[int(self.data.source_index[i])], int(self.data.line[i])


def template_kwargs(cfg_data) -> tuple:
    """The chat template's keyword arguments from the config: `chat_template_kwargs`, and `enable_thinking` when set."""
    kwargs = dict(cfg_data.chat_template_kwargs)
    if cfg_data.enable_thinking is not None:
        kwargs["enable_thinking"] = cfg_data.enable_thinking
    return tuple(sorted(kwargs.items()))


def row_settings(cfg_data) -> RowSettings:
    return RowSettings(
        encode=EncodeSettings(max_length=cfg_data.max_length, truncation_strategy=cfg_data.truncation_strategy,
                              loss_on=cfg_data.loss_on, template_mode=cfg_data.template_mode,
                              template_kwargs=template_kwargs(cfg_data), loss_scale=cfg_data.loss_scale),
        model_name=tuple(cfg_data.model_name), model_author=tuple(cfg_data.model_author), system=cfg_data.system)


def _default_barrier() -> Callable[[], None] | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.barrier
    return None


def _check_strict(data: Processed, strict: bool) -> None:
    if strict:
        bad = next((p for p in data.problems if p.reason in BAD_ROW_REASONS), None)
        if bad is not None:
            raise DataError.from_problem(bad)


def _report(name: str, data: Processed, log: Callable[[str], None]) -> None:
    s = data.stats
    skipped = ", ".join(f"{r}={n}" for r, n in s.skipped.items()) or "none"
    log(f"data[{name}]: {s.rows_read} rows read, {s.kept} kept, skipped: {skipped}; truncated left={s.truncated_left} "
        f"right={s.truncated_right}; {s.num_tokens} tokens, {s.num_trained_tokens} trained")
    log(f"data[{name}]: {masking_line(s)}")
    for reason in REASONS:
        first = next((p for p in data.problems if p.reason == reason), None)
        if first is not None:
            log(f"data[{name}]: e.g. {first.message}")


def _tokenise(rows: list[Row], tokenizer, cfg_data, *, name: str, cache_dir, rank: int, log, progress: bool,
              barrier: Callable[[], None] | None) -> TokenizedDataset:
    settings = row_settings(cfg_data)
    key = cache_key(rows, tokenizer, settings)

    def build(*, write: bool, show: bool) -> Processed:
        if cache_dir is not None and cfg_data.load_from_cache_file:
            hit = load_processed(cache_dir, key)
            if hit is not None:
                log(f"data[{name}]: cache hit {key}")
                return hit
        data = process_rows(rows, tokenizer, settings, num_proc=cfg_data.dataset_num_proc, strict=cfg_data.strict,
                            progress=show)
        if write and cache_dir is not None:
            save_processed(cache_dir, key, data)
        return data

    if barrier is None:
        data = build(write=True, show=progress)
    elif rank == 0:
        try:
            data = build(write=True, show=progress)
        finally:
            barrier()
    else:
        barrier()
        data = load_processed(cache_dir, key) if cache_dir is not None else None
        if data is None:
            data = build(write=False, show=False)
    _check_strict(data, cfg_data.strict)
    if rank == 0:
        _report(name, data, log)
    return TokenizedDataset(data, name=name, key=key)


def dump_encoded(dataset: TokenizedDataset, path: str | Path) -> None:
    """Every sample as one JSON line: input_ids, labels (aligned, -100 where untrained) and source `file:line`."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(len(dataset)):
            ids, labels = dataset[i]
            source, line = dataset.provenance(i)
            f.write(json.dumps({"input_ids": ids.tolist(), "labels": labels.tolist(), "source": f"{source}:{line}"}) + "\n")


def _split(rows: list[Row], ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    num_val = max(1, int(round(len(rows) * ratio)))
    if num_val >= len(rows):
        raise DataError(f"`split_dataset_ratio`={ratio} leaves no training rows out of {len(rows)}")
    held = set(np.random.default_rng([seed, 1]).permutation(len(rows))[:num_val].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def build_datasets(cfg_data, tokenizer, *, cache_dir: str | Path | None, rank: int = 0,
                   log: Callable[[str], None] = print, use_hf: bool = False, progress: bool | None = None,
                   barrier: Callable[[], None] | None = None,
                   hub_timeout: float = DEFAULT_TIMEOUT_S) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Training and evaluation datasets from a `DataSection`.

    Evaluation data is `val_dataset` when given, else a seeded `split_dataset_ratio` share of
    `dataset`, else None. `progress` (default: rank 0) shows a progress bar while tokenising.
    `barrier` (default: torch.distributed's when initialised) orders rank 0 before the others.
    """
    check_tokenizer(tokenizer)
    if not cfg_data.dataset:
        raise DataError("`dataset` is empty: give JSONL files, folders, globs, `datasets` folders or hub ids")
    progress = rank == 0 if progress is None else progress
    barrier = _default_barrier() if barrier is None else barrier
    rows = read_datasets(list(cfg_data.dataset), seed=cfg_data.data_seed, use_hf=use_hf, hub_timeout=hub_timeout)
    val_rows = None
    if cfg_data.val_dataset:
        val_rows = read_datasets(list(cfg_data.val_dataset), seed=cfg_data.data_seed, use_hf=use_hf, hub_timeout=hub_timeout)
    elif cfg_data.split_dataset_ratio > 0:
        rows, val_rows = _split(rows, cfg_data.split_dataset_ratio, cfg_data.data_seed)
    common = dict(cache_dir=cache_dir, rank=rank, log=log, progress=progress, barrier=barrier)
    train = _tokenise(rows, tokenizer, cfg_data, name="train", **common)
    if len(train) == 0:
        raise DataError(f"no training samples left: {train.stats.rows_read} rows read, skipped {train.stats.skipped}")
    if cfg_data.dump_encoded and rank == 0:
        dump_encoded(train, cfg_data.dump_encoded)
        log(f"data[train]: wrote {len(train)} encoded samples to {cfg_data.dump_encoded}")
    val = _tokenise(val_rows, tokenizer, cfg_data, name="val", **common) if val_rows is not None else None
    return train, val


def build_dataset(cfg_data, tokenizer, *, cache_dir: str | Path | None, rank: int = 0,
                  log: Callable[[str], None] = print, **kwargs) -> TokenizedDataset:
    """The training dataset only (see `build_datasets`)."""
    return build_datasets(cfg_data, tokenizer, cache_dir=cache_dir, rank=rank, log=log, **kwargs)[0]
