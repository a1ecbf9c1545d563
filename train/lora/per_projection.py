"""One LoRA adapter per HF projection inside megatron's fused layers (`lora_per_projection`).

megatron fuses q/k/v (with Qwen3-Next's output gate) into `linear_qkv`, gate/up into
`linear_fc1` and the GDN `in_proj_qkvz`/`in_proj_ba` into `in_proj`; peft adapts each HF
projection separately. This turns every fused adapter of a freshly wrapped model into the
exact per-projection form: A stacks one rank-r block per projection ([k*r, in]), B is
block-diagonal (each projection's output rows use only its own r columns). A gradient mask
keeps B block-diagonal through training, so the trained adapter is k independent rank-r
adapters, exported to peft as such.

The structure comes from the PEFT converters themselves: the fused adapters are written in
peft's per-projection form, given fresh per-projection A's and zero B's, and read back.
"""
from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.lora.layout import gather_full_lora, lora_layout, shard_lora_state
from megalora.train.lora.options import kaiming_uniform_full
from megalora.train.lora.peft_format import megatron_to_peft
from megalora.train.lora.peft_import import load_megatron_lora, peft_to_megatron


def _full_lora(model: torch.nn.Module, layout: dict[str, str], dims: ParallelDims) -> dict[str, torch.Tensor]:
    """Every rank gets the full-shape LoRA tensors of `model` (gathered over the layout)."""
    named = {n: p.data for n, p in model.named_parameters() if n in layout}
    full = gather_full_lora(named, layout, dims=dims)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [full]
        dist.broadcast_object_list(box, src=0)
        full = box[0]
    return full


def split_fused_adapters(model: torch.nn.Module, *, hf_spec: Any, lora_options: Any, seed: int,
                         dims: ParallelDims | None = None) -> int:
    """Give every fused layer one adapter per HF projection; returns how many B tensors are masked.
    `dims`: the layout `model` was built on (default: `groups.current()`)."""
    dims = dims or groups.current()
    layout = lora_layout(model)
    full = _full_lora(model, layout, dims)
    tensors, config = megatron_to_peft(full, hf_spec=hf_spec, lora_options=lora_options)
    fresh, ones = {}, {}
    for key, value in tensors.items():
        if ".lora_A." in key:
            # peft's own init per projection: each projection its own A
            a = kaiming_uniform_full(value.shape[0], value.shape[1], seed=seed ^ zlib.crc32(key.encode()))
            fresh[key] = ones[key] = a.to(value.dtype)
        else:
            fresh[key] = torch.zeros_like(value)
            ones[key] = torch.ones_like(value)
    scaling = lora_options.scaling
    load_megatron_lora(model, peft_to_megatron(fresh, config, hf_spec=hf_spec, scaling=scaling), dims=dims)
    pattern = peft_to_megatron(ones, config, hf_spec=hf_spec, scaling=scaling)
    layout = lora_layout(model)
    params = dict(model.named_parameters())
    b_names = [n for n in layout if n.endswith("lora_B") and n in pattern and not bool((pattern[n] != 0).all())]
    if not b_names:
        return 0
    masks = shard_lora_state({n: (pattern[n] != 0).to(params[n].dtype) for n in b_names},
                             {n: layout[n] for n in b_names},
                             tp_rank=dims.tp_rank, tp_size=dims.tp, ep_rank=dims.ep_rank, ep_size=dims.ep)
    for name in b_names:
        mask = masks[name].to(params[name].device)
        params[name].lora_block_mask = mask
        params[name].register_hook(lambda grad, mask=mask: grad * mask)
    return len(b_names)
