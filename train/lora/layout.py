"""Which rank holds which slice of each LoRA tensor: a per-name plan, two pure functions, and
the collective that gathers every rank's slices into full tensors on rank 0.

Kinds (the split follows the wrapped base layer):

- `replicated`   whole tensor on every rank (column A, row B, router / gate adapters);
- `column`       split along dim 0 over TP (column-parallel B, also the output layer's);
- `glu_column`   dim 0 holds [gate; up]; each half split over TP, a rank holds [gate_r; up_r]
                 (B of a gated `linear_fc1`, following its base weight);
- `segments:N1,N2,...`  dim 0 is the concatenation of parts of full sizes N1, N2, ...; each
                 part split over TP, a rank holds its piece of every part, in order (B of the
                 gated-delta-net `in_proj`: [q; k; v; z; b; a]);
- `row`          split along dim 1 over TP (row-parallel A);
- `expert`       stacked [E, ...] expert adapters, split along dim 0 over EP (expert TP is 1).

Kinds are plain strings so a plan can be stored as JSON next to a checkpoint; the full tensors
are in the single-rank layout, so a checkpoint gathered under one layout loads under another.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.lora.experts import LoraExperts
from megalora.train.lora.gates import LoraGate
from megalora.train.lora.layers import LoraLinear


def _segments(kind: str) -> list[int] | None:
    """Full part sizes of a `segments:` kind (`glu_column` is two equal parts), else None."""
    if kind.startswith("segments:"):
        return [int(n) for n in kind[len("segments:"):].split(",")]
    return None


def _gdn_in_proj_kind(module: LoraLinear) -> str | None:
    """`segments:` kind of a gated-delta-net in_proj B ([q; k; v; z; b; a]), from the config."""
    cfg = module.base_layer.config
    heads_k, heads_v = getattr(cfg, "linear_num_key_heads", None), getattr(cfg, "linear_num_value_heads", None)
    if not heads_k or not heads_v:
        return None
    key, value = heads_k * cfg.linear_key_head_dim, heads_v * cfg.linear_value_head_dim
    parts = [key, key, value, value, heads_v, heads_v]
    if sum(parts) != module.base_layer.output_size:
        return None
    return "segments:" + ",".join(str(n) for n in parts)


def lora_layout(model: torch.nn.Module) -> dict[str, str]:
    """Kind of every LoRA parameter of a model wrapped by `apply_lora`, keyed by its name."""
    plan: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLinear):
            if module.parallel_mode == "column":
                glu = name.endswith("linear_fc1") and module.base_layer.config.gated_linear_unit
                gdn = _gdn_in_proj_kind(module) if name.endswith("in_proj") else None
                plan[prefix + "lora_A"] = "replicated"
                plan[prefix + "lora_B"] = gdn or ("glu_column" if glu else "column")
            else:
                plan[prefix + "lora_A"] = "row"
                plan[prefix + "lora_B"] = "replicated"
        elif isinstance(module, LoraExperts):
            for pname, _ in module.named_parameters(recurse=False):
                plan[prefix + pname] = "expert"
        elif isinstance(module, LoraGate):
            plan[prefix + "lora_A"] = plan[prefix + "lora_B"] = "replicated"
    return plan


def _split(value: torch.Tensor, kind: str, *, tp_rank: int, tp_size: int, ep_rank: int, ep_size: int) -> torch.Tensor:
    if kind == "replicated":
        return value
    if kind == "expert":
        return value.chunk(ep_size, dim=0)[ep_rank]
    if kind == "glu_column":
        gate, up = value.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    sizes = _segments(kind)
    if sizes is not None:
        parts = torch.split(value, sizes, dim=0)
        return torch.cat([part.chunk(tp_size, dim=0)[tp_rank] for part in parts])
    return value.chunk(tp_size, dim=1 if kind == "row" else 0)[tp_rank]


def shard_lora_state(full: Mapping[str, torch.Tensor], layout: Mapping[str, str], *, tp_rank: int,
                     tp_size: int, ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """This rank's slices of a full LoRA state dict (names as in `layout`)."""
    missing = sorted(set(layout) - set(full))
    if missing:
        raise ValueError(f"LoRA state dict lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return {k: _split(full[k], layout[k], tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank,
                      ep_size=ep_size).contiguous() for k in layout}


def gather_lora_state(parts: Sequence[Mapping[str, torch.Tensor]], layout: Mapping[str, str], *,
                      rows: Sequence[Mapping[str, int]], tp_size: int, ep_size: int) -> dict[str, torch.Tensor]:
    """Join per-rank LoRA tensors back to full shape; `rows[i]` has rank i's tp_rank/ep_rank."""
    by_tp = {row["tp_rank"]: part for row, part in zip(rows, parts)}
    by_ep = {row["ep_rank"]: part for row, part in zip(rows, parts)}
    assert sorted(by_tp) == list(range(tp_size)) and sorted(by_ep) == list(range(ep_size)), rows
    full: dict[str, torch.Tensor] = {}
    for key, kind in layout.items():
        if kind == "replicated":
            full[key] = parts[0][key]
        elif kind == "expert":
            full[key] = torch.cat([by_ep[e][key] for e in range(ep_size)], dim=0)
        elif kind == "glu_column":
            halves = [by_tp[t][key].chunk(2, dim=0) for t in range(tp_size)]
            full[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        elif _segments(kind) is not None:
            local_sizes = [n // tp_size for n in _segments(kind)]
            pieces = [torch.split(by_tp[t][key], local_sizes, dim=0) for t in range(tp_size)]
            full[key] = torch.cat([pieces[t][i] for i in range(len(local_sizes)) for t in range(tp_size)], dim=0)
        else:
            full[key] = torch.cat([by_tp[t][key] for t in range(tp_size)], dim=1 if kind == "row" else 0)
    return full


def rank_coords(dims: ParallelDims | None = None) -> dict:
    """This rank's tp/ep ranks and the tp/ep sizes in `dims` (default: `groups.current()`)."""
    dims = dims or groups.current()
    return {"tp_rank": dims.tp_rank, "ep_rank": dims.ep_rank, "tp_size": dims.tp, "ep_size": dims.ep}


def gather_full_lora(local: dict[str, torch.Tensor], layout: dict[str, str], *,
                     dims: ParallelDims | None = None) -> dict[str, torch.Tensor] | None:
    """Full-shape tensors on rank 0 (None elsewhere) from every rank's shards, sharded on `dims`
    (default: `groups.current()`)."""
    coords = rank_coords(dims)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: v.detach().cpu().clone() for k, v in local.items()}
    payload = ({k: v.detach().cpu() for k, v in local.items()}, coords)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    # One representative rank per (tp_rank, ep_rank) coordinate is enough.
    reps: dict[tuple[int, int], tuple[dict, dict]] = {}
    for part, c in gathered:
        reps.setdefault((c["tp_rank"], c["ep_rank"]), (part, c))
    tp_size, ep_size = coords["tp_size"], coords["ep_size"]
    parts, rows = [], []
    for (tp_rank, ep_rank), (part, c) in sorted(reps.items()):
        parts.append(part)
        rows.append({"tp_rank": tp_rank, "ep_rank": ep_rank})
    return gather_lora_state(parts, {k: layout[k] for k in local}, rows=rows, tp_size=tp_size, ep_size=ep_size)
