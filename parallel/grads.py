"""Gradient reductions that a plain (non-DDP) megatron-core model needs after backward.

These are the reductions megatron's DDP wrapper and ``finalize_model_grads`` perform,
written for a bare model so the trainer (and the parity tests) can run without DDP's
buffers. Each acts on ``param.main_grad`` when present, else ``param.grad``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def _all_reduce(grads: list[torch.Tensor], group: dist.ProcessGroup, *, scale: float) -> None:
    """All-reduce (sum) a list of gradients as one flat buffer, then scale in place."""
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def _named_trainable(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Sum, over the TP group, the gradients of parameters replicated across TP ranks
    whose ranks each saw only part of the work.

    These are (as in megatron's ``finalize_model_grads``): parameters marked
    ``sequence_parallel = True`` (norms, router, shared-expert gate under SP: each TP rank
    saw only its slice of the tokens) and q/k layernorm weights (each TP rank normalised
    only its heads). Parameters marked ``average_gradients_across_tp_domain`` are averaged.
    No-op when the TP group has one rank.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return
    summed, averaged = [], []
    for name, param in _named_trainable(model):
        grad = _grad_of(param)
        if grad is None:
            continue
        if getattr(param, "average_gradients_across_tp_domain", False):
            averaged.append(grad)
        elif getattr(param, "sequence_parallel", False) or (
            "q_layernorm" in name or "k_layernorm" in name
        ):
            summed.append(grad)
    _all_reduce(summed, group, scale=1.0)
    _all_reduce(averaged, group, scale=1.0 / size)


def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of routed experts (inside megatron's expert modules, adapters included)."""
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP

    found: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (SequentialMLP, GroupedMLP, TEGroupedMLP)):
            found.update((id(p), p) for p in module.parameters())
    return list(found.values())


def allreduce_data_parallel_grads(model: torch.nn.Module) -> None:
    """Average gradients over data-parallel replicas, as megatron's DDP does.

    Each rank's loss is the mean over its own micro-batch; the global loss is their mean
    over the DP group. Dense parameters: sum over the DP group, divided by its size.
    Routed-expert parameters (everything under megatron's expert modules): sum over the
    expert-data-parallel group, also divided by the *DP* size, because through the token
    dispatcher each expert's gradient already sums the losses of its whole EP group.

    Experts are found by module type, not by megatron's ``allreduce`` flag: that flag is
    set only when EP > 1, yet with expert tensor parallel 1 < TP the experts are
    replicated over the TP ranks, which each route their own sequence-parallel tokens,
    so their gradients must be summed over the expert-data-parallel group there too.
    """
    from megatron.core import parallel_state

    dense_group = parallel_state.get_data_parallel_group()
    expert_group = parallel_state.get_expert_data_parallel_group()
    scale = 1.0 / dist.get_world_size(dense_group)
    expert_ids = {id(p) for p in expert_parameters(model)}
    dense, expert = [], []
    for _, param in _named_trainable(model):
        grad = _grad_of(param)
        if grad is None:
            continue
        (expert if id(param) in expert_ids else dense).append(grad)
    for grads, group in ((dense, dense_group), (expert, expert_group)):
        if dist.get_world_size(group) > 1:
            _all_reduce(grads, group, scale=scale)
        elif scale != 1.0:
            for grad in grads:
                grad.mul_(scale)
