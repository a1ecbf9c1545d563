"""The run folder: checkpoints written atomically, `latest`, keep-last-K.

    runs/<name>/
      config.yaml            resolved config of the run (secret keys left out)
      run.json               the run id of the run this folder holds
      metrics.jsonl          one line per logged step
      checkpoint-<step>/     adapter + optimizer + scheduler + RNG + sampler state + meta.json
      latest                 name of the newest complete checkpoint
A checkpoint is built in `.tmp-checkpoint-<step>/` and renamed when complete on every rank;
`latest` is replaced (atomically) only after that, so it always names a whole checkpoint, and
it is the one truth: `--resume latest` takes what it names, after checking the checksums
meta.json records for every file and the run id. Rotation keeps the last K checkpoints of this
run (by run id, in the order they were saved) and never deletes the one `latest` names.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path

from megalora.config import ConfigError


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_FILE = "run.json"
PARTIAL_PREFIXES = (".tmp-checkpoint-", ".latest.tmp")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def tmp_checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".tmp-{checkpoint_name(step)}"


def commit_checkpoint(run_dir: Path, step: int) -> Path:
    """Rename the finished temporary folder into place and point `latest` at it."""
    tmp, final = tmp_checkpoint_dir(run_dir, step), run_dir / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = run_dir / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, run_dir / "latest")
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    found = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    return Path(run_dir) / pointer.read_text().strip() if pointer.is_file() else None


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path / 'meta.json'}: unreadable checkpoint metadata ({e})") from None


def prune_checkpoints(run_dir: Path, keep: int | None, *, run_id: str) -> list[Path]:
    """Delete this run's checkpoints beyond the last `keep` saved; never the one `latest` names,
    never another run's."""
    if keep is None:
        return []
    latest = read_latest(run_dir)
    mine = []
    for p in list_checkpoints(run_dir):
        meta = _read_meta(p)
        if meta.get("run_id") == run_id:
            mine.append((meta.get("saved_at", 0.0), meta.get("step", 0), p))
    mine.sort()
    removed = [p for _, _, p in (mine[:-keep] if keep > 0 else mine) if latest is None or p.name != latest.name]
    for p in removed:
        shutil.rmtree(p)
    return removed


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but meta.json, by relative path."""
    sums = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != "meta.json":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            sums[p.relative_to(folder).as_posix()] = h.hexdigest()
    return sums


def verify_checkpoint(path: Path) -> dict:
    """meta.json of a checkpoint whose files are all present with the checksums it records."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"{path}: not a megalora checkpoint folder (no meta.json)")
    meta = _read_meta(path)
    for rel, digest in meta.get("checksums", {}).items():
        if not (path / rel).is_file():
            raise ConfigError(f"{path}: checkpoint file {rel} is missing; resume from an earlier checkpoint")
    actual = file_checksums(path)
    for rel, digest in meta.get("checksums", {}).items():
        if actual[rel] != digest:
            raise ConfigError(f"{path / rel}: checksum differs from the one recorded in meta.json (the file changed "
                              "after it was saved); resume from an earlier checkpoint")
    return meta


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """`latest` (what the run folder's `latest` names) or a checkpoint folder, verified; a one-line
    error otherwise."""
    if resume == "latest":
        path = read_latest(run_dir)
        if path is None:
            found = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
            partial = sorted(p.name for p in Path(run_dir).glob(".tmp-checkpoint-*"))
            cut = f"; {', '.join(partial)} is what a save cut short left (removed at the next start)" if partial else ""
            raise ConfigError(f"`resume`=latest: {run_dir} has no `latest` file: no checkpoint of it was completed "
                              f"(complete checkpoint folders: {found}{cut}); start without --resume, or pass a "
                              "checkpoint folder")
        if not path.is_dir():
            raise ConfigError(f"`resume`=latest: {run_dir / 'latest'} names {path.name}, which does not exist")
        meta = verify_checkpoint(path)
        owner = read_run_id(run_dir)
        if owner is not None and meta.get("run_id") not in (None, owner):
            raise ConfigError(f"`resume`=latest: {path} belongs to run {meta.get('run_id')}, not to the run "
                              f"{owner} of {run_dir / RUN_FILE}")
        return path
    path = Path(resume)
    verify_checkpoint(path)
    return path


def read_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def start_run(run_dir: Path, run_id: str | None) -> str:
    """Record the run id this folder's checkpoints carry (a new one unless continuing `run_id`)."""
    run_id = run_id or uuid.uuid4().hex[:12]
    write_json(Path(run_dir) / RUN_FILE, {"run_id": run_id})
    return run_id


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what a save killed half-way left behind (`.tmp-checkpoint-*`, `.latest.tmp`)."""
    removed = []
    for p in sorted(Path(run_dir).iterdir()):
        if p.name.startswith(PARTIAL_PREFIXES):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Drop metrics.jsonl rows after `step` (a resumed run logs those steps again); returns how many."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a kill mid-write
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def fingerprint_model(model_dir: Path) -> str:
    """A cheap content identity of the base weights: config.json, each safetensors file's name,
    size and header, and 64 bytes at the start, middle and end of every tensor's data (so a
    weight changed in place, same size, changes it too). Reads ~200 bytes per tensor."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    h.update((model_dir / "config.json").read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")):
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            raw = f.read(8)
            header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            if len(raw) < 8 or header_len > size - 8:
                raise ConfigError(f"{p}: not a safetensors file (truncated or corrupt header)")
            header = f.read(header_len)
            h.update(header)
            try:
                spans = [v["data_offsets"] for k, v in json.loads(header).items() if k != "__metadata__"]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{p}: not a safetensors file (corrupt header)") from None
            for begin, end in sorted(spans):
                for at in {begin, (begin + end) // 2, max(begin, end - 64)}:
                    f.seek(8 + header_len + at)
                    h.update(f.read(min(64, end - at)))
    return h.hexdigest()[:16]


def check_base_model(meta: dict, model_dir: Path, *, where: str, allow_change: bool,
                     fingerprint: str | None = None) -> str:
    """The fingerprint of `model_dir` (computed unless given), after checking it is the base `meta`
    was trained on (a one-line error naming both otherwise, unless `allow_change`)."""
    fingerprint = fingerprint or fingerprint_model(model_dir)
    recorded = meta.get("base_model_fingerprint")
    if recorded is not None and recorded != fingerprint and not allow_change:
        raise ConfigError(f"{where}: trained on base model {meta.get('base_model')} (fingerprint {recorded}); "
                          f"{Path(model_dir).resolve()} has different weights (fingerprint {fingerprint}); "
                          "use the same base, or --allow_base_model_change true to go on knowingly")
    return fingerprint


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
