"""HF <-> megatron weight mapping: one table per architecture, pure functions over dicts.

A `Rule` says how one megatron parameter is made from HF tensors and back. Loading and
export both use these tables (loading reads each rank's slice of the sources; export
applies `to_hf` to each rank's shard and writes the pieces at `source_slices`).

Sharding: every source names the dim along which its rank-local piece is a contiguous
block (`dim`), optionally in several `segments` that are each split separately (GDN's
conv channels are [q; k; v] and each part is split by head). The rank's local megatron
tensor is `to_megatron(local pieces)`, for every layout including one rank.
`group` says which parallel group splits the rule: "tp" (attention, dense MLP, shared
expert, vocab) or "etp" (routed experts; experts are also spread over EP by `expert`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from megalora.train.model import layouts
from megalora.train.model.hf_config import FULL_ATTENTION, HFModelSpec


@dataclass(frozen=True)
class Source:
    """One HF tensor feeding a rule, and how a parallel rank's piece of it is cut."""

    name: str
    dim: int | None = None
    segments: tuple[int, ...] | None = None
    vocab: bool = False


@dataclass(frozen=True)
class Rule:
    """How megatron parameter `megatron` is computed from `sources` and back."""

    megatron: str
    sources: tuple[Source, ...]
    to_megatron: Callable[..., Tensor]
    to_hf: Callable[[Tensor], tuple[Tensor, ...]]
    group: str | None = None
    expert: int | None = None


def _identity(t: Tensor) -> Tensor:
    return t


def _single(t: Tensor) -> tuple[Tensor, ...]:
    return (t,)


def source_slices(source: Source, *, size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """Index ranges along `source.dim` (of a tensor `size` long there) that rank `rank`
    of `world` owns, in the order they are concatenated (vocab sources: see `vocab_rows`)."""
    if source.dim is None or world == 1:
        return [(0, size)]
    segments = source.segments or (size,)
    assert sum(segments) == size, (source.name, segments, size)
    ranges = []
    start = 0
    for seg in segments:
        assert seg % world == 0, f"{source.name}: {seg} rows cannot be split over {world} ranks"
        step = seg // world
        ranges.append((start + rank * step, start + (rank + 1) * step))
        start += seg
    return ranges


def vocab_rows(*, vocab_size: int, padded_vocab_size: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, pad): the real vocab rows [start, stop) a rank holds and how many zero
    rows follow them to fill its padded shard."""
    per_rank = padded_vocab_size // world
    start = min(rank * per_rank, vocab_size)
    stop = min((rank + 1) * per_rank, vocab_size)
    return start, stop, per_rank - (stop - start)


def _replicated(megatron: str, hf: str) -> Rule:
    return Rule(megatron, (Source(hf),), _identity, _single)


def _split(megatron: str, hf: str, dim: int, *, group: str = "tp", expert: int | None = None) -> Rule:
    return Rule(megatron, (Source(hf, dim),), _identity, _single, group=group, expert=expert)


def _fc1(megatron: str, hf_gate: str, hf_up: str, *, group: str = "tp", expert: int | None = None) -> Rule:
    return Rule(
        megatron,
        (Source(hf_gate, 0), Source(hf_up, 0)),
        layouts.gate_up_to_megatron,
        layouts.gate_up_to_hf,
        group=group,
        expert=expert,
    )


def _mlp_rules(m: str, h: str) -> list[Rule]:
    return [
        _fc1(f"{m}linear_fc1.weight", f"{h}gate_proj.weight", f"{h}up_proj.weight"),
        _split(f"{m}linear_fc2.weight", f"{h}down_proj.weight", 1),
    ]


def _moe_rules(spec: HFModelSpec, m: str, h: str) -> list[Rule]:
    rules = [_replicated(f"{m}router.weight", f"{h}gate.weight")]
    for e in range(spec.num_experts or 0):
        me, he = f"{m}experts.local_experts.{e}.", f"{h}experts.{e}."
        rules.append(
            _fc1(f"{me}linear_fc1.weight", f"{he}gate_proj.weight", f"{he}up_proj.weight", group="etp", expert=e)
        )
        rules.append(_split(f"{me}linear_fc2.weight", f"{he}down_proj.weight", 1, group="etp", expert=e))
    if spec.shared_expert_ffn_hidden_size:
        rules += _mlp_rules(f"{m}shared_experts.", f"{h}shared_expert.")
        rules.append(_replicated(f"{m}shared_experts.gate_weight", f"{h}shared_expert_gate.weight"))
    return rules


def _attention_rules(spec: HFModelSpec, m: str, h: str) -> list[Rule]:
    gated = spec.attention_output_gate
    heads_per_group = spec.num_attention_heads // spec.num_key_value_heads
    to_megatron = partial(layouts.qkv_to_megatron, head_dim=spec.head_dim, gated=gated)
    to_hf = partial(layouts.qkv_to_hf, head_dim=spec.head_dim, heads_per_group=heads_per_group, gated=gated)
    rules = [
        Rule(
            f"{m}linear_qkv.weight",
            tuple(Source(f"{h}{p}_proj.weight", 0) for p in "qkv"),
            to_megatron,
            to_hf,
            group="tp",
        ),
        _split(f"{m}linear_proj.weight", f"{h}o_proj.weight", 1),
        _replicated(f"{m}q_layernorm.weight", f"{h}q_norm.weight"),
        _replicated(f"{m}k_layernorm.weight", f"{h}k_norm.weight"),
    ]
    return rules


def _gdn_rules(spec: HFModelSpec, m: str, h: str) -> list[Rule]:
    assert spec.linear_num_key_heads and spec.linear_num_value_heads
    dims = dict(
        key_head_dim=spec.linear_key_head_dim,
        value_head_dim=spec.linear_value_head_dim,
        value_per_key=spec.linear_num_value_heads // spec.linear_num_key_heads,
    )
    key_dim = spec.linear_num_key_heads * spec.linear_key_head_dim
    value_dim = spec.linear_num_value_heads * spec.linear_value_head_dim
    return [
        Rule(
            f"{m}in_proj.weight",
            (Source(f"{h}in_proj_qkvz.weight", 0), Source(f"{h}in_proj_ba.weight", 0)),
            partial(layouts.gdn_in_proj_to_megatron, **dims),
            partial(layouts.gdn_in_proj_to_hf, **dims),
            group="tp",
        ),
        Rule(
            f"{m}conv1d.weight",
            (Source(f"{h}conv1d.weight", 0, segments=(key_dim, key_dim, value_dim)),),
            _identity,
            _single,
            group="tp",
        ),
        _split(f"{m}A_log", f"{h}A_log", 0),
        _split(f"{m}dt_bias", f"{h}dt_bias", 0),
        _replicated(f"{m}out_norm.weight", f"{h}norm.weight"),
        _split(f"{m}out_proj.weight", f"{h}out_proj.weight", 1),
    ]


def _embedding_rules(spec: HFModelSpec) -> list[Rule]:
    rules = [
        Rule("embedding.word_embeddings.weight", (Source("model.embed_tokens.weight", 0, vocab=True),),
             _identity, _single, group="tp"),
        _replicated("decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if not spec.tie_word_embeddings:
        rules.append(
            Rule("output_layer.weight", (Source("lm_head.weight", 0, vocab=True),), _identity, _single, group="tp")
        )
    return rules


def _layer_prefixes(layer: int) -> tuple[str, str]:
    return f"decoder.layers.{layer}.", f"model.layers.{layer}."


def qwen3_rules(spec: HFModelSpec) -> list[Rule]:
    """Dense Qwen3: QK-norm attention and a SwiGLU MLP in every layer."""
    rules = _embedding_rules(spec)
    for layer in range(spec.num_layers):
        m, h = _layer_prefixes(layer)
        rules += [
            _replicated(f"{m}input_layernorm.weight", f"{h}input_layernorm.weight"),
            _replicated(f"{m}pre_mlp_layernorm.weight", f"{h}post_attention_layernorm.weight"),
        ]
        rules += _attention_rules(spec, f"{m}self_attention.", f"{h}self_attn.")
        rules += _mlp_rules(f"{m}mlp.", f"{h}mlp.")
    return rules


def qwen3_moe_rules(spec: HFModelSpec) -> list[Rule]:
    """Qwen3-MoE: QK-norm attention; routed experts (no shared expert) except in dense layers."""
    rules = _embedding_rules(spec)
    for layer in range(spec.num_layers):
        m, h = _layer_prefixes(layer)
        rules += [
            _replicated(f"{m}input_layernorm.weight", f"{h}input_layernorm.weight"),
            _replicated(f"{m}pre_mlp_layernorm.weight", f"{h}post_attention_layernorm.weight"),
        ]
        rules += _attention_rules(spec, f"{m}self_attention.", f"{h}self_attn.")
        if spec.moe_layers[layer]:
            rules += _moe_rules(spec, f"{m}mlp.", f"{h}mlp.")
        else:
            rules += _mlp_rules(f"{m}mlp.", f"{h}mlp.")
    return rules


def qwen3_next_rules(spec: HFModelSpec) -> list[Rule]:
    """Qwen3-Next: gated full attention or Gated DeltaNet per layer; routed experts plus a
    sigmoid-gated shared expert; all norms (1+w) zero-centred except GDN's gated norm,
    whose weight is copied as-is (our GDN module applies it as a plain scale)."""
    rules = _embedding_rules(spec)
    for layer in range(spec.num_layers):
        m, h = _layer_prefixes(layer)
        rules += [
            _replicated(f"{m}input_layernorm.weight", f"{h}input_layernorm.weight"),
            _replicated(f"{m}pre_mlp_layernorm.weight", f"{h}post_attention_layernorm.weight"),
        ]
        if spec.layer_types[layer] == FULL_ATTENTION:
            rules += _attention_rules(spec, f"{m}self_attention.", f"{h}self_attn.")
        else:
            rules += _gdn_rules(spec, f"{m}self_attention.", f"{h}linear_attn.")
        if spec.moe_layers[layer]:
            rules += _moe_rules(spec, f"{m}mlp.", f"{h}mlp.")
        else:
            rules += _mlp_rules(f"{m}mlp.", f"{h}mlp.")
    return rules


MAPPING_TABLES: dict[str, Callable[[HFModelSpec], list[Rule]]] = {
    "qwen3": qwen3_rules,
    "qwen3_moe": qwen3_moe_rules,
    "qwen3_next": qwen3_next_rules,
}


def rules_for(spec: HFModelSpec) -> list[Rule]:
    """The mapping table for `spec`'s architecture."""
    return MAPPING_TABLES[spec.model_type](spec)


def hf_to_megatron(hf: dict[str, Tensor], spec: HFModelSpec, *, padded_vocab_size: int | None = None) -> dict[str, Tensor]:
    """Full HF state dict (on-disk names) -> full megatron state dict (one-rank layout).

    Vocab tensors get zero rows up to `padded_vocab_size`."""
    out = {}
    for rule in rules_for(spec):
        tensor = rule.to_megatron(*(hf[s.name] for s in rule.sources))
        if rule.sources[0].vocab and padded_vocab_size and padded_vocab_size > tensor.shape[0]:
            pad = tensor.new_zeros(padded_vocab_size - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, pad], dim=0)
        out[rule.megatron] = tensor
    return out


def megatron_to_hf(megatron: dict[str, Tensor], spec: HFModelSpec) -> dict[str, Tensor]:
    """Full megatron state dict (one-rank layout) -> HF state dict with on-disk names
    (one tensor per expert); vocab padding is dropped."""
    out = {}
    for rule in rules_for(spec):
        pieces = rule.to_hf(megatron[rule.megatron])
        for source, piece in zip(rule.sources, pieces):
            out[source.name] = piece[: spec.vocab_size] if source.vocab else piece
    return out


def hf_from_shards(rule: Rule, shards: list[Tensor], spec: HFModelSpec) -> dict[str, Tensor]:
    """Full HF tensors of `rule` from its megatron shards of every rank of the splitting
    group, in rank order (one shard for replicated rules); vocab padding is dropped.
    Export gathers each parameter's shards and calls this."""
    if rule.group is None or len(shards) == 1:
        pieces = rule.to_hf(shards[0])
        return {s.name: p[: spec.vocab_size] if s.vocab else p for s, p in zip(rule.sources, pieces)}
    world = len(shards)
    per_rank = [rule.to_hf(shard) for shard in shards]
    out = {}
    for i, source in enumerate(rule.sources):
        parts = [pieces[i] for pieces in per_rank]
        if source.vocab:
            out[source.name] = torch.cat(parts, dim=0)[: spec.vocab_size]
            continue
        assert source.dim is not None
        segments = source.segments or (sum(p.shape[source.dim] for p in parts),)
        # Each rank's piece is its slice of every segment, concatenated: regroup by segment.
        split = [p.split([seg // world for seg in segments], dim=source.dim) for p in parts]
        out[source.name] = torch.cat(
            [split[r][j] for j in range(len(segments)) for r in range(world)], dim=source.dim
        )
    return out


_EXPERT_RE = re.compile(r"(\.local_experts\.)(\d+)(\.)")


def local_expert_name(name: str, *, first_expert: int) -> str:
    """Rename a one-rank expert parameter (global index) to the index local to an EP rank
    whose first expert is `first_expert`."""
    return _EXPERT_RE.sub(lambda m: f"{m.group(1)}{int(m.group(2)) - first_expert}{m.group(3)}", name)
