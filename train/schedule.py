"""Learning-rate schedule: linear warmup, then cosine / linear decay to `min_lr` (or constant)."""
from __future__ import annotations

import math


def warmup_steps(*, total_steps: int, warmup_fraction: float | None, warmup_iters: int) -> int:
    if warmup_fraction is not None:
        return int(round(warmup_fraction * total_steps))
    return min(warmup_iters, total_steps)


def lr_at(step: int, *, lr: float, min_lr: float, total_steps: int, warmup: int, style: str) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses step 0)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if style == "constant":
        return lr
    decay_steps = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    if style == "linear":
        return lr - (lr - min_lr) * progress
    if style == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"`lr_decay_style` must be cosine, linear or constant; got {style!r}")
