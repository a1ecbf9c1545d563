"""Which rank holds which slice of a megatron-core state dict: a plan and two pure functions.

A *plan* (``rules``) maps a regular expression over parameter names to a *kind*; the first
pattern that matches (``re.search``) decides. Kinds:

- ``replicated``  every rank holds the whole tensor (norms, router, row-parallel bias).
- ``column``      split along dim 0 over TP (column-parallel weight and bias; the attention
                  ``linear_qkv`` weight is laid out per query group, so this splits it by
                  query group).
- ``row``         split along dim 1 over TP (row-parallel weight).
- ``glu_column``  dim 0 holds ``[gate; up]``; each half is split along dim 0 over TP and
                  a rank holds ``[gate_r; up_r]`` (fused gated ``linear_fc1``).
- ``vocab``       split along dim 0 over TP (word embedding, output layer).

Routed-expert parameters are recognised by name, whatever their kind: megatron numbers
experts locally on each EP rank (``...experts.local_experts.{i}...`` for ``SequentialMLP``,
``...experts.linear_fc1.weight{i}`` for the grouped form), so EP rank ``e`` with ``n``
local experts holds global experts ``e*n .. e*n+n-1`` renumbered ``0..n-1``. Their TP
split (by kind) runs over the *expert* tensor-parallel group (``etp_*``), not over TP.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch

KINDS = ("replicated", "column", "row", "glu_column", "vocab")

# Expert-parameter names: SequentialMLP and the grouped-GEMM layout.
_EXPERT_PATTERNS = (
    re.compile(r"^(?P<prefix>.*\.experts\.local_experts\.)(?P<idx>\d+)(?P<suffix>\..+)$"),
    re.compile(
        r"^(?P<prefix>.*\.experts\.linear_fc[12]\.(?:weight|bias))(?P<idx>\d+)(?P<suffix>)$"
    ),
)


def gpt_rules(*, gated_linear_unit: bool = True) -> dict[str, str]:
    """The plan for megatron-core's ``GPTModel`` built from the local (non-Transformer-Engine) layer specs."""
    fc1 = "glu_column" if gated_linear_unit else "column"
    return {
        r"(^|\.)embedding\.word_embeddings\.weight$": "vocab",
        r"(^|\.)output_layer\.weight$": "vocab",
        r"\.self_attention\.linear_qkv\.(weight|bias)$": "column",
        r"\.self_attention\.linear_proj\.weight$": "row",
        r"\.self_attention\.linear_proj\.bias$": "replicated",
        r"\.mlp\.router\.": "replicated",
        r"\.mlp\.shared_experts\.gate_weight$": "replicated",
        r"\.linear_fc1\.(weight|bias)\d*$": fc1,
        r"\.linear_fc2\.weight\d*$": "row",
        r"\.linear_fc2\.bias\d*$": "replicated",
        r"(layernorm|layer_norm|_norm)\.(weight|bias)$": "replicated",
        r"\._extra_state$": "replicated",
    }


def kind_of(key: str, rules: Mapping[str, str]) -> str:
    """The kind of ``key`` under ``rules``; ``ValueError`` when no rule matches."""
    for pattern, kind in rules.items():
        if re.search(pattern, key):
            if kind not in KINDS:
                raise ValueError(f"rule {pattern!r}: unknown kind {kind!r} (allowed: {KINDS})")
            return kind
    raise ValueError(f"no sharding rule matches parameter {key!r}")


def _expert_match(key: str) -> re.Match[str] | None:
    for pattern in _EXPERT_PATTERNS:
        match = pattern.match(key)
        if match:
            return match
    return None


def _split(value: Any, kind: str, rank: int, size: int, key: str) -> Any:
    """This rank's slice of ``value`` (a full tensor) for ``kind``."""
    if size == 1 or kind == "replicated" or not isinstance(value, torch.Tensor):
        return value
    dim = 1 if kind == "row" else 0
    if value.dim() <= dim or value.shape[dim] % (2 * size if kind == "glu_column" else size):
        raise ValueError(
            f"{key}: shape {tuple(value.shape)} cannot be split {size} ways as {kind!r}"
        )
    if kind == "glu_column":
        gate, up = value.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]]).clone()
    return value.chunk(size, dim=dim)[rank].clone()


def _join(parts: Sequence[Any], kind: str, key: str) -> Any:
    """Inverse of ``_split``: the full tensor from the slices of ranks ``0..size-1``."""
    if len(parts) == 1 or kind == "replicated" or not isinstance(parts[0], torch.Tensor):
        return parts[0]
    if kind == "glu_column":
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([*gates, *ups])
    return torch.cat(list(parts), dim=1 if kind == "row" else 0)


def _count_experts(keys: Sequence[str]) -> dict[str, int]:
    """Number of experts per expert-parameter prefix (one MoE layer's parameter family)."""
    counts: dict[str, int] = {}
    for key in keys:
        match = _expert_match(key)
        if match:
            prefix = match["prefix"]
            counts[prefix] = max(counts.get(prefix, 0), int(match["idx"]) + 1)
    return counts


def shard_state_dict(
    full_sd: Mapping[str, Any],
    *,
    tp_rank: int,
    tp_size: int,
    ep_rank: int,
    ep_size: int,
    rules: Mapping[str, str],
    etp_rank: int = 0,
    etp_size: int = 1,
) -> dict[str, Any]:
    """One rank's slice of the full (single-process) state dict ``full_sd``.

    Dense parameters are split over TP by kind; routed experts are selected by EP rank,
    renumbered locally and split over expert TP by kind.
    """
    counts = _count_experts(list(full_sd))
    out: dict[str, Any] = {}
    for key, value in full_sd.items():
        kind = kind_of(key, rules)
        match = _expert_match(key)
        if match is None:
            out[key] = _split(value, kind, tp_rank, tp_size, key)
            continue
        num_experts = counts[match["prefix"]]
        if num_experts % ep_size:
            raise ValueError(
                f"{match['prefix']}: {num_experts} experts are not divisible by "
                f"expert_model_parallel_size={ep_size}"
            )
        num_local = num_experts // ep_size
        local = int(match["idx"]) - ep_rank * num_local
        if 0 <= local < num_local:
            local_key = f"{match['prefix']}{local}{match['suffix']}"
            out[local_key] = _split(value, kind, etp_rank, etp_size, key)
    return out


def gather_state_dicts(
    shards: Sequence[Mapping[str, Any]],
    *,
    ranks: Sequence[Mapping[str, int]],
    tp_size: int,
    ep_size: int,
    rules: Mapping[str, str],
    etp_size: int = 1,
) -> dict[str, Any]:
    """The full state dict from per-rank slices (the inverse of ``shard_state_dict``).

    ``shards[i]`` was held by the rank described by ``ranks[i]`` (``tp_rank``, ``ep_rank``
    and, with expert TP, ``etp_rank``; rows of ``groups.layout`` fit). Copies held by
    several ranks (data parallel) are read once; every slice must be present.
    """
    if len(shards) != len(ranks):
        raise ValueError(f"gather_state_dicts: {len(shards)} shards but {len(ranks)} rank rows")
    # key -> {(split rank, ep rank): value}
    dense: dict[str, dict[int, Any]] = {}
    experts: dict[tuple[str, str], dict[tuple[int, int, int], Any]] = {}
    num_local: dict[str, int] = {}
    for shard, row in zip(shards, ranks):
        for prefix, count in _count_experts(list(shard)).items():
            if num_local.setdefault(prefix, count) != count:
                raise ValueError(f"{prefix}: ranks hold different numbers of local experts")
        for key, value in shard.items():
            match = _expert_match(key)
            if match is None:
                dense.setdefault(key, {}).setdefault(row["tp_rank"], value)
            else:
                where = (row["ep_rank"], int(match["idx"]), row.get("etp_rank", 0))
                experts.setdefault((match["prefix"], match["suffix"]), {}).setdefault(where, value)
    full: dict[str, Any] = {}
    for key, parts in dense.items():
        kind = kind_of(key, rules)
        size = 1 if kind == "replicated" else tp_size
        full[key] = _join(_in_order(parts, range(size), key), kind, key)
    for (prefix, suffix), parts in experts.items():
        n = num_local[prefix]
        for ep_rank in range(ep_size):
            for local in range(n):
                key = f"{prefix}{ep_rank * n + local}{suffix}"
                kind = kind_of(key, rules)
                size = 1 if kind == "replicated" else etp_size
                wanted = [(ep_rank, local, etp) for etp in range(size)]
                full[key] = _join(_in_order(parts, wanted, key), kind, key)
    return full


def _in_order(parts: Mapping[Any, Any], wanted: Any, key: str) -> list[Any]:
    missing = [w for w in wanted if w not in parts]
    if missing:
        raise ValueError(f"{key}: no shard holds slice(s) {missing}")
    return [parts[w] for w in wanted]
