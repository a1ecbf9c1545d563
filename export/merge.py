"""Merging LoRA into HF weights: pure functions over tensors, no I/O.

A mapping `Rule` (`megalora.train.model.mapping`) says how one megatron parameter is made
from HF tensors and back. LoRA lives on megatron parameters, so a merge is

    W_megatron = rule.to_megatron(*hf_sources)
    merged     = cast(W_megatron (fp32) + scale * B @ A, base dtype)
    hf_pieces  = rule.to_hf(merged)

which splits fused megatron layouts (q/gate/k/v in `linear_qkv`, gate/up in `linear_fc1`,
GDN qkvz/ba in `in_proj`) back into HF tensors with the one mapping table. Rules without
an adapter pass their HF tensors through untouched (bit-exact).

Checkpoint LoRA names (see `megalora.train.lora.apply`) for the megatron weight `X.weight`:
`X.lora_A` [r, in] / `X.lora_B` [out, r] (dense targets and the output layer, whose B rows
cover the padded vocab), `X.lora.lora_A/B` (router), `<shared_experts>.gate_lora.lora_A/B`
(for `gate_weight`), and routed experts `<experts>.lora_fc{1,2}_A` [E, r, in] /
`lora_fc{1,2}_B` [E, out, r] indexed by the global expert id.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Collection, Sequence

import torch
from torch import Tensor

from megalora.train.model.mapping import Rule

_EXPERT_WEIGHT_RE = re.compile(r"^(?P<experts>.*\.experts)\.local_experts\.(?P<e>\d+)\.linear_(?P<fc>fc[12])\.weight$")


@dataclass(frozen=True)
class LoraKeys:
    """Where the adapter of one megatron weight sits in the checkpoint: the A and B tensor
    names and, for routed experts, the index along their leading expert dim."""

    a: str
    b: str
    expert: int | None = None


def lora_keys_for(megatron_name: str, available: Collection[str]) -> LoraKeys | None:
    """The checkpoint LoRA tensors that adapt megatron weight `megatron_name`, or None when
    `available` (the checkpoint's tensor names) holds none for it."""
    m = _EXPERT_WEIGHT_RE.match(megatron_name)
    if m:
        prefix = f"{m['experts']}.lora_{m['fc']}_"
        keys = LoraKeys(prefix + "A", prefix + "B", int(m["e"]))
        return keys if keys.a in available else None
    if megatron_name.endswith(".gate_weight"):
        stem = megatron_name[: -len("gate_weight")] + "gate_lora"
    elif megatron_name.endswith(".weight"):
        stem = megatron_name[: -len(".weight")]
    else:
        return None
    for prefix in (f"{stem}.", f"{stem}.lora."):
        if prefix + "lora_A" in available:
            return LoraKeys(prefix + "lora_A", prefix + "lora_B")
    return None


def lora_delta_factors(a: Tensor, b: Tensor, keys: LoraKeys, *, out_rows: int) -> tuple[Tensor, Tensor]:
    """(B, A) of one weight from the checkpoint tensors `a`, `b` (per expert when stacked);
    B rows beyond `out_rows` (vocab padding of the output layer) are dropped."""
    if keys.expert is not None:
        a, b = a[keys.expert], b[keys.expert]
    if b.shape[0] < out_rows:
        raise ValueError(f"LoRA tensor {keys.b} has {b.shape[0]} rows, the base weight {out_rows}")
    return b[:out_rows], a


def merge_weight(weight: Tensor, b: Tensor, a: Tensor, *, scale: float) -> Tensor:
    """`weight + scale * b @ a` computed in fp32 and cast back to `weight`'s dtype (a new
    tensor; `weight` is not modified)."""
    if weight.dim() != 2 or b.shape[0] != weight.shape[0] or a.shape[1] != weight.shape[1] or b.shape[1] != a.shape[0]:
        raise ValueError(f"LoRA B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit weight {tuple(weight.shape)}")
    merged = weight.to(torch.float32, copy=True)
    merged.addmm_(b.to(torch.float32), a.to(torch.float32), alpha=scale)
    return merged.to(weight.dtype)


def merge_rule(rule: Rule, sources: Sequence[Tensor], lora: tuple[Tensor, Tensor] | None, *,
               scale: float) -> tuple[Tensor, ...]:
    """Merged HF tensors (in `rule.sources` order) for one mapping rule.

    `sources` are the rule's full HF tensors; `lora` is (B, A) for the rule's megatron
    weight or None (the sources come back unchanged)."""
    assert len(sources) == len(rule.sources), (rule.megatron, len(sources))
    if lora is None:
        return tuple(sources)
    fused = rule.to_megatron(*sources)
    b, a = lora
    merged = merge_weight(fused, b, a, scale=scale)
    del fused
    # Back to each source's own dtype (a fused weight is one dtype; its sources need not be).
    pieces = tuple(p.to(s.dtype).contiguous() for p, s in zip(rule.to_hf(merged), sources))
    for piece, source in zip(pieces, sources):
        assert piece.shape == source.shape, (rule.megatron, piece.shape, source.shape)
    return pieces
