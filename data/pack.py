"""Packing (best-fit decreasing) and collation into micro-batches.

A micro-batch is a dict of torch tensors:

    input_ids           int64 [B, S]  token ids; each row is one sample, or several packed samples
    labels              int64 [B, S]  ALIGNED WITH input_ids, NOT SHIFTED: labels[b, t] is the target of the
                                      token at t itself (-100 where not trained). The loss code shifts:
                                      logits[b, t] are scored against labels[b, t + 1].
    position_ids        int64 [B, S]  0, 1, 2, ... restarting at every sample (and at the padding)
    cu_seqlens          int32 [K+1]   boundaries of the K segments of the flattened batch (B*S tokens):
                                      every sample is a segment and so is each row's padding, so
                                      cu_seqlens[0] == 0 and cu_seqlens[-1] == B*S; attention restricted
                                      to segments never crosses samples
    max_seqlen          int32 []      longest segment
    num_trained_tokens  int64 []      number of loss terms after the shift, i.e. (labels != -100).sum()
                                      (the first token of a sample is never a target, so a shift never
                                      reaches into the next packed sample)

S is the longest row rounded up to `pad_to_multiple_of` (e.g. the TP size under sequence
parallelism); rows are right-padded with `pad_token_id` and label -100. Samples are never split.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack sample indices into bins of `capacity` tokens: longest first, each into the fullest bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    free: list[tuple[int, int]] = []  # (free tokens, bin), sorted: the first fit by bisect is the best fit
    bins: list[list[int]] = []
    for i in order:
        size = int(lengths[i])
        if size > capacity:
            raise ValueError(f"sample {i} has {size} tokens, more than the packing length {capacity}")
        k = bisect.bisect_left(free, (size, -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - size, len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - size, b))
    return bins


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], capacity: int) -> float:
    """Share of the packed sequences' `capacity` tokens filled with sample tokens."""
    if not bins:
        return 0.0
    return float(sum(int(x) for x in lengths)) / (len(bins) * capacity)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(rows: list[list[tuple[np.ndarray, np.ndarray]]], *, pad_token_id: int = 0,
            pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Build a micro-batch: each row is a list of (input_ids, labels) samples laid end to end."""
    if pad_to_multiple_of < 1:
        raise ValueError(f"`pad_to_multiple_of` must be >= 1; got {pad_to_multiple_of}")
    assert rows and all(rows), "a micro-batch needs at least one sample per row"
    row_lengths = [sum(len(ids) for ids, _ in row) for row in rows]
    seq = _round_up(max(row_lengths), pad_to_multiple_of)
    batch = len(rows)
    input_ids = np.full((batch, seq), pad_token_id, dtype=np.int64)
    labels = np.full((batch, seq), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((batch, seq), dtype=np.int64)
    bounds = [0]
    for b, row in enumerate(rows):
        t = 0
        for ids, lab in row:
            assert len(ids) == len(lab) and len(ids) > 0
            n = len(ids)
            input_ids[b, t:t + n] = ids
            labels[b, t:t + n] = lab
            position_ids[b, t:t + n] = np.arange(n)
            t += n
            bounds.append(b * seq + t)
        if t < seq:
            position_ids[b, t:] = np.arange(seq - t)
            bounds.append((b + 1) * seq)
    cu = np.asarray(bounds, dtype=np.int32)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": torch.tensor(int(np.diff(cu).max()), dtype=torch.int32),
        "num_trained_tokens": torch.tensor(int((labels != IGNORE_INDEX).sum()), dtype=torch.int64),
    }
