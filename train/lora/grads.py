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
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


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


def allreduce_lora_grads(model: torch.nn.Module) -> None:
    """SUM over the tensor-parallel group the grads of LoRA halves marked `lora_tp_allreduce`."""
    marked = [p for _, p in lora_parameters(model) if getattr(p, "lora_tp_allreduce", False)]
    if marked:
        _all_reduce_grads(marked, parallel_state.get_tensor_model_parallel_group())


def reduce_lora_grads(model: torch.nn.Module) -> None:
    """All LoRA gradient reductions: TP (sequence-parallel halves), then DP / expert-DP average."""
    allreduce_lora_grads(model)
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_size = dp_group.size()
    params = [p for _, p in lora_parameters(model)]
    dense = [p for p in params if not getattr(p, "lora_expert", False)]
    expert = [p for p in params if getattr(p, "lora_expert", False)]
    _all_reduce_grads(dense, dp_group, divide_by=dp_size)
    if expert:
        _all_reduce_grads(expert, parallel_state.get_expert_data_parallel_group(), divide_by=dp_size)
