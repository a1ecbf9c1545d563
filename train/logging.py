"""Metrics sinks. The loop calls `log(step, metrics)` on one object whichever backends are on.

Rank 0 writes a JSONL metrics file and, when asked, wandb; other ranks get a null sink, so
logging calls never branch.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class NullSink:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends one JSON object per logged step; flushed at once so a crash loses nothing."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._file.close()


class WandbSink:
    def __init__(self, *, project: str, name: str, mode: str, config: dict, folder: Path):
        import wandb

        self._run = wandb.init(project=project, name=name, mode=mode, config=config, dir=str(folder))

    def log(self, step: int, metrics: dict) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class Sinks:
    def __init__(self, sinks: list):
        self._sinks = sinks

    def log(self, step: int, metrics: dict) -> None:
        for sink in self._sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def make_sinks(*, rank: int, run_dir: Path, report_to: str, wandb_project: str, wandb_mode: str,
               wandb_name: str | None, config: dict) -> Sinks:
    if rank != 0:
        return Sinks([NullSink()])
    sinks = [JsonlSink(run_dir / "metrics.jsonl")]
    if report_to == "wandb" and wandb_mode != "disabled":
        sinks.append(WandbSink(project=wandb_project, name=wandb_name or run_dir.name, mode=wandb_mode,
                               config=config, folder=run_dir))
    return Sinks(sinks)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A one-line progress report per logged step on rank 0: loss, lr, grad norm, tokens/s, ETA."""

    def __init__(self, *, total_steps: int, start_step: int, rank: int, stream=None):
        self.total, self.start, self.rank, self.stream = total_steps, start_step, rank, stream
        self.t0 = time.perf_counter()

    def update(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}"]
        for key, fmt in (("loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"), ("tokens_per_s", ".0f"),
                         ("eval_loss", ".4f"), ("eval_acc", ".3f")):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:{fmt}}")
        parts.append(f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)
