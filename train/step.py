"""One optimizer step: token-weighted loss over the global batch, gradient reduction, norm.

The loss of a step is the mean over every trained token of the global batch (all
micro-batches of all data-parallel ranks), not a mean of per-micro-batch means: each
micro-batch contributes `sum(token losses) / global_trained_tokens`. Gradients are then
summed over micro-batches and reduced over data-parallel ranks by `reduce_lora_grads`,
which averages over DP; the loss is scaled by the DP size so that the result is exactly
the gradient of the global mean.

Where each collective's tensors live (the default group is `cpu:gloo,cuda:nccl` on GPUs, so
CPU tensors go over gloo and CUDA tensors over NCCL; tests/test_collectives.py records one
step and checks it against this plan):
- bookkeeping, on the CPU on purpose (a few scalars; a device copy would only add syncs):
  the global trained-token count and loss sum (`dp_all_reduce`, float64), the grad-norm
  partial sums (`lora_grad_norm`, float64), the stop flag (`StopRequest`, int32), eval sums;
- LoRA gradients (`train.lora.grads`): flat buffers on the model's device, in the LoRA dtype;
- megatron's own (TP/SP mappings, MoE token dispatch): on the model's device;
- checkpoint tensors, and a failed save's or run folder's error (`checkpoint.first_error`), travel
  as objects (`gather_object`, `all_gather_object`), which torch sends over gloo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megalora.data.errors import DataError
from megalora.parallel.dims import ParallelDims

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels aligned with input ids -> next-token targets and their mask, as megatron expects."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    # megatron's vocab-parallel cross entropy needs an index in range everywhere.
    return shifted.masked_fill(~mask, 0), mask


def packed_seq_params(batch: dict):
    """THD boundaries for the model when the batch holds packed samples (batch size 1 rows)."""
    cu = batch["cu_seqlens"].to(torch.int32)
    max_len = int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


def forward_loss(model, batch: dict, *, device: torch.device, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses [B, S] and the mask of trained tokens."""
    targets, mask = shift_labels(batch["labels"])
    ids, pos = batch["input_ids"], batch["position_ids"]
    kwargs = {}
    if packed:
        # THD: the rows of the micro-batch become one token stream; cu_seqlens (over the
        # flattened batch) keep every sample to itself.
        ids, pos, targets, mask = (t.reshape(1, -1) for t in (ids, pos, targets, mask))
        kwargs["packed_seq_params"] = packed_seq_params(batch)
    losses = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=None,
                   labels=targets.to(device), **kwargs)
    return losses.double(), mask.to(device)


def dp_all_reduce(values: torch.Tensor, *, dims: ParallelDims) -> torch.Tensor:
    """SUM over the data-parallel group (ranks that see different samples)."""
    if dims.dp > 1:
        dist.all_reduce(values, group=dims.groups.dp)
    return values


def lora_grad_norm(model, layout: dict[str, str], *, dims: ParallelDims) -> float:
    """Global L2 norm of the LoRA gradients, each full-model element counted exactly once.

    TP-split halves are summed over TP, routed-expert adapters over EP, replicated ones
    counted once (every rank holds the same reduced copy)."""
    sums = torch.zeros(3, dtype=torch.float64)
    for name, p in model.named_parameters():
        if p.grad is None or name not in layout:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        kind = layout[name]
        # Kinds other than these two (column, row, glu_column, segments:...) are TP splits.
        sums[1 if kind == "replicated" else 2 if kind == "expert" else 0] += sq
    if dims.tp > 1:
        part = sums[0:1].clone()
        dist.all_reduce(part, group=dims.groups.tp)
        sums[0] = part[0]
    if dims.ep > 1:
        part = sums[2:3].clone()
        dist.all_reduce(part, group=dims.groups.ep)
        sums[2] = part[0]
    return math.sqrt(float(sums.sum()))


def clip_grads(params: list[torch.nn.Parameter], *, norm: float, max_norm: float) -> None:
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)


@dataclass
class StepResult:
    loss: float
    trained_tokens: int
    tokens: int
    grad_norm: float


def train_step(model, micro_batches: list[dict], *, dims: ParallelDims, packed: bool, layout: dict[str, str],
               params: list[torch.nn.Parameter], clip_grad: float, reduce_grads) -> StepResult:
    """Forward/backward over the micro-batches of one step on `dims.device`; grads reduced
    (`reduce_grads(model, dims=dims)`) and clipped."""
    device, dp_size = dims.device, dims.dp
    local = torch.tensor([float(sum(int(b["num_trained_tokens"]) for b in micro_batches))], dtype=torch.float64)
    global_tokens = float(dp_all_reduce(local.clone(), dims=dims)[0])
    if global_tokens == 0:
        raise DataError("a global batch without any trained token: check the label masks of the data")
    # MoE auxiliary loss: mean over micro-batches and DP ranks, as megatron scales it.
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(micro_batches), device=device))
    for p in params:
        p.grad = None
    loss_sum = torch.zeros(1, dtype=torch.float64)
    tokens = 0
    for batch in micro_batches:
        losses, mask = forward_loss(model, batch, device=device, packed=packed)
        masked = (losses * mask).sum()
        (masked * (dp_size / global_tokens)).backward()
        loss_sum += masked.detach().double().cpu()
        tokens += batch["input_ids"].numel()
    reduce_grads(model, dims=dims)
    norm = lora_grad_norm(model, layout, dims=dims)
    clip_grads(params, norm=norm, max_norm=clip_grad)
    total = dp_all_reduce(loss_sum, dims=dims)
    return StepResult(loss=float(total[0]) / global_tokens, trained_tokens=int(global_tokens),
                      tokens=tokens, grad_norm=norm)


@torch.no_grad()
def eval_step(model, batch: dict, *, device: torch.device, packed: bool) -> tuple[float, int, int]:
    """(sum of token losses, trained tokens, correctly predicted trained tokens) of one micro-batch."""
    targets, mask = shift_labels(batch["labels"])
    ids, pos = batch["input_ids"], batch["position_ids"]
    kwargs = {}
    if packed:
        ids, pos, targets, mask = (t.reshape(1, -1) for t in (ids, pos, targets, mask))
        kwargs["packed_seq_params"] = packed_seq_params(batch)
    logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=None, **kwargs)
    logits = gather_from_tensor_model_parallel_region(logits)
    # Padded vocabulary columns are masked to the dtype's minimum by the model builder.
    logits = logits.float()
    mask = mask.to(device)
    targets = targets.to(device)
    log_probs = torch.log_softmax(logits, dim=-1)
    token_loss = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    correct = (logits.argmax(-1) == targets) & mask
    return float((token_loss * mask).sum()), int(mask.sum()), int(correct.sum())
