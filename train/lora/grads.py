"""Gradient reductions for LoRA parameters, matching what megatron's DDP does for base weights.

Order (call after backward, before the optimizer step; use these OR megatron's DDP +
`finalize_model_grads`, never both: the attributes they read are the same):

1. `allreduce_lora_grads`: SUM over TP for replicated halves that saw only a sequence-parallel
   token shard (`lora_tp_allreduce`).
2. data parallel: dense adapters SUM over the data-parallel group, routed-expert adapters
   (`lora_expert`) SUM over the expert-data-parallel group; both then divide by the
   data-parallel size, as megatron's DDP scales expert and dense gradients alike (an expert
   rank already holds the contributions of every DP rank in its EP group). Expert adapters
   are chosen by their own mark, not by megatron's `allreduce` flag (set only when EP > 1):
   with expert-TP 1 < TP the experts are replicated over TP ranks that each route their own
   sequence-parallel tokens, so the expert-data-parallel sum is needed at EP = 1 too.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims


def lora_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable LoRA parameters of `model` as (name, parameter), in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".lora_" in f".{n}"]


def _all_reduce_grads(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup],
                      *, divide_by: int = 1) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or group is None:
        return
    if group.size() == 1 and divide_by == 1:
        return
    # One flat buffer per dtype: a collective per LoRA tensor would be latency-bound.
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(same)
        if group.size() > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if divide_by != 1:
            flat.div_(divide_by)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


def allreduce_lora_grads(model: torch.nn.Module, *, dims: ParallelDims | None = None) -> None:
    """SUM over the tensor-parallel group the grads of LoRA halves marked `lora_tp_allreduce`."""
    dims = dims or groups.current()
    marked = [p for _, p in lora_parameters(model) if getattr(p, "lora_tp_allreduce", False)]
    if marked:
        _all_reduce_grads(marked, dims.groups.tp)


def reduce_lora_grads(model: torch.nn.Module, *, dims: ParallelDims | None = None) -> None:
    """All LoRA gradient reductions: TP (sequence-parallel halves), then DP / expert-DP average.
    `dims`: the layout (default: `groups.current()`)."""
    dims = dims or groups.current()
    allreduce_lora_grads(model, dims=dims)
    # Context parallel is 1: the data-parallel group is megatron's with or without it.
    dp_group, dp_size = dims.groups.dp, dims.dp
    params = [p for _, p in lora_parameters(model)]
    dense = [p for p in params if not getattr(p, "lora_expert", False)]
    expert = [p for p in params if getattr(p, "lora_expert", False)]
    _all_reduce_grads(dense, dp_group, divide_by=dp_size)
    if expert:
        _all_reduce_grads(expert, dims.groups.expert_dp, divide_by=dp_size)
