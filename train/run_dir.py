"""The run folder: checkpoints written atomically, `latest`, keep-last-K.

    runs/<name>/
      config.yaml            resolved config of the run
      metrics.jsonl          one line per logged step
      checkpoint-<step>/     adapter + optimizer + scheduler + RNG + sampler state + meta.json
      latest                 name of the newest complete checkpoint
A checkpoint is built in `.tmp-checkpoint-<step>/` and renamed when complete, so a crash
mid-save never leaves a checkpoint that looks whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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


def prune_checkpoints(run_dir: Path, keep: int | None) -> list[Path]:
    if keep is None:
        return []
    removed = list_checkpoints(run_dir)[:-keep] if keep > 0 else []
    for p in removed:
        shutil.rmtree(p)
    return removed


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """`latest` (in the run folder) or a checkpoint folder; a clear error otherwise."""
    if resume == "latest":
        pointer = Path(run_dir) / "latest"
        if pointer.is_file():
            path = Path(run_dir) / pointer.read_text().strip()
            if (path / "meta.json").is_file():
                return path
        found = list_checkpoints(run_dir)
        if not found:
            raise ValueError(f"`resume`=latest: no checkpoint in {run_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ValueError(f"`resume`={resume}: not a megalora checkpoint folder (no meta.json)")
    return path


def fingerprint_model(model_dir: Path) -> str:
    """A cheap identity of the base weights: config.json and the safetensors names and sizes."""
    h = hashlib.sha256()
    model_dir = Path(model_dir)
    h.update((model_dir / "config.json").read_bytes())
    for p in sorted(model_dir.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
