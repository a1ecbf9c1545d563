"""Adapter files for the servers: `vllm` (default), `sglang` and `peft` layouts of one checkpoint.

All three hold the same model (exact: re-imported by `peft_import`, the logits equal the
checkpoint's). They differ in how routed experts, ranks and scales are written:

- `peft`: transformers 5 + peft's form (`peft_format.megatron_to_peft`): routed experts as fused
  parameters (`mlp.experts.gate_up_proj` / `down_proj`, `target_parameters`), the router and on
  Qwen3-MoE / Qwen3-Next the dense and shared-expert MLP as parameter targets, modules whose rank
  differs from the run's in `rank_pattern` / `alpha_pattern` (keyed as peft matches them: module
  names for module targets, parameter names for parameter targets).
- `vllm`: one 2D adapter per routed expert and projection,
  `base_model.model.model.layers.L.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight`
  (gate/up: A [R, H] = fc1's A, B [F, R] = fc1's B rows of that projection; down: A [R, F],
  B [H, R]); every expert with all three projections (zeros where untrained); q/k/v and gate/up
  split into HF projections, each with its own copy of A (q keeps its output-gate half); GDN
  `in_proj_qkvz`, `in_proj_ba`, `out_proj` as HF names them. One rank R for every module (the
  largest; smaller ones padded with zero rows of A / columns of B, exact), rsLoRA folded into
  `lora_alpha` (alpha = scale * R, so alpha/R is the checkpoint's scale), `target_modules` as leaf
  names, no `target_parameters`, no patterns. vLLM loads it with no extra switches.
- `sglang`: the `vllm` layout without the router (SGLang has no router LoRA).

What a format cannot hold (`lm_head` on Qwen3-Next for vLLM: its model has no embedding modules;
the router for SGLang) is dropped with one line when its delta B·A is exactly zero, and refused
otherwise: a served adapter that silently differs from the trained model is worse than an error
that points to `--merge` or another format.

`server_checks` states, per server, whether the written files meet its known constraints (vLLM:
rank within `--max-lora-rank` {1, 8, 16, 32, 64, 128, 256, 320, 512}, target modules its model
classes have, 2D experts; SGLang: one rank, no patterns, leaf-name targets, no router, 2D experts,
and no Qwen3-Next at all).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from megalora.train.lora.options import LoraOptions
from megalora.train.lora.peft_format import (
    _PEFT_RENAMES_MLP,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    _rule_index,
    _targets,
    megatron_to_peft,
    read_checkpoint_lora,
    save_adapter,
)
from megalora.train.lora.peft_import import peft_to_megatron
from megalora.train.model.hf_config import HFModelSpec

FORMATS = ("vllm", "sglang", "peft")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_FUSED_EXPERTS = re.compile(r"\.experts(\.base_layer)?\.lora_[AB]\.weight$")
# HF leaf names vLLM's model classes take LoRA on (linear layers, packed modules unpacked, embedding
# modules); routed experts come as `experts.{e}.{gate,up,down}_proj`.
_VLLM_LEAVES = {
    "qwen3_next": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate",
                             "shared_expert_gate", "gate_proj", "up_proj", "down_proj"}),
    "qwen3_moe": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate", "gate_proj", "up_proj", "down_proj",
                            "lm_head"}),
    "qwen3": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}),
}


def _unservable(adapter_format: str, spec: HFModelSpec, hf_module: str) -> str | None:
    """Why `adapter_format` cannot hold an adapter on `hf_module` (None when it can)."""
    leaf = hf_module.rpartition(".")[2]
    if adapter_format == "vllm" and leaf == "lm_head" and spec.model_type == "qwen3_next":
        return "vLLM's Qwen3NextForCausalLM takes no lm_head LoRA"
    if adapter_format == "sglang" and leaf == "gate" and ".mlp." in hf_module:
        return "SGLang takes no router LoRA"
    return None


def _expert_adapters(full: Mapping[str, Tensor], spec: HFModelSpec) -> dict[str, tuple[Tensor, Tensor]]:
    """HF module (`model.layers.L.mlp.experts.e.gate_proj`) -> (A, B) for every routed expert of every
    module with expert LoRA, all three projections (zero A and B for a projection not trained)."""
    rules = _rule_index(spec)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for target in _targets(sorted(full), rules):
        if not target.hf_container:
            continue
        fc1 = (full.get(f"{target.module}.lora_fc1_A"), full.get(f"{target.module}.lora_fc1_B"))
        fc2 = (full.get(f"{target.module}.lora_fc2_A"), full.get(f"{target.module}.lora_fc2_B"))
        if fc1[0] is not None:
            num_experts, rank, hidden = fc1[0].shape
            ffn = fc1[1].shape[1] // 2
        else:
            assert fc2[0] is not None
            num_experts, rank, ffn = fc2[0].shape
            hidden = fc2[1].shape[1]
        for e in range(num_experts):
            stem = f"{target.hf_container}.{e}"
            if fc1[0] is not None:
                rule = rules[f"{target.module}.local_experts.{e}.linear_fc1.weight"]
                for source, piece in zip(rule.sources, rule.to_hf(fc1[1][e])):
                    out[source.name.removesuffix(".weight")] = (fc1[0][e], piece)
            else:
                for proj in ("gate_proj", "up_proj"):
                    out[f"{stem}.{proj}"] = (fc2[0].new_zeros(rank, hidden), fc2[0].new_zeros(ffn, rank))
            if fc2[0] is not None:
                out[f"{stem}.down_proj"] = (fc2[0][e], fc2[1][e])
            else:
                out[f"{stem}.down_proj"] = (fc1[0].new_zeros(rank, ffn), fc1[0].new_zeros(hidden, rank))
    return out


def megatron_to_serving(full_lora: Mapping[str, Tensor], *, hf_spec: HFModelSpec, lora_options: Any,
                        adapter_format: str = "vllm", base_model_name_or_path: str = "",
                        log: Callable[[str], None] = print) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full-shape megatron LoRA tensors -> (tensors, adapter_config) in `adapter_format` (see the
    module docstring). Raises ValueError naming the module when the format cannot hold a non-zero
    adapter."""
    if adapter_format not in FORMATS:
        raise ValueError(f"adapter_format: expected one of {FORMATS}, got {adapter_format!r}")
    peft_tensors, config = megatron_to_peft(full_lora, hf_spec=hf_spec, lora_options=lora_options,
                                            base_model_name_or_path=base_model_name_or_path)
    if adapter_format == "peft":
        return peft_tensors, config
    # every non-expert peft key is already a 2D module adapter; fused expert parameters are
    # rewritten per expert
    adapters = {key[len(PEFT_PREFIX): -len(".lora_A.weight")]:
                (value, peft_tensors[key.replace(".lora_A.", ".lora_B.")])
                for key, value in peft_tensors.items()
                if key.endswith(".lora_A.weight") and not _FUSED_EXPERTS.search(key)}
    adapters.update(_expert_adapters(full_lora, hf_spec))
    kept: dict[str, tuple[Tensor, Tensor]] = {}
    for hf_module, (a, b) in sorted(adapters.items()):
        reason = _unservable(adapter_format, hf_spec, hf_module)
        if reason is None:
            kept[hf_module] = (a, b)
        elif bool((b.double() @ a.double()).any()):
            raise ValueError(f"--adapter_format {adapter_format}: {reason}, and the LoRA on {hf_module} is not zero "
                             "(dropping it would change the model); export --merge, or pick another --adapter_format")
        else:
            log(f"export: {adapter_format} format drops the (all-zero) LoRA on {hf_module}: {reason}")
    rank = max(a.shape[0] for a, _ in kept.values()) if kept else int(lora_options.rank)
    tensors: dict[str, Tensor] = {}
    for hf_module, (a, b) in kept.items():
        pad = rank - a.shape[0]
        # zero rows of A / columns of B: same delta at the common rank
        tensors[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)],
                                                                       dim=1).contiguous()
    config.update({
        "r": rank,
        "lora_alpha": float(lora_options.scaling * rank),  # alpha/r is the checkpoint's scale (rsLoRA folded in)
        "use_rslora": False,
        "lora_dropout": float(lora_options.dropout),
        "target_modules": sorted({m.rpartition(".")[2] for m in kept}),
        "target_parameters": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
    return tensors, config


def server_checks(tensors: Mapping[str, Tensor], config: Mapping[str, Any], *, hf_spec: HFModelSpec) -> list[str]:
    """One line per server: whether the adapter (`tensors`, `config`) meets its known constraints."""
    stems = sorted({k[len(PEFT_PREFIX):].rsplit(".", 2)[0] for k in tensors})
    fused_experts = sorted({k[len(PEFT_PREFIX): -len(".lora_A.weight")] for k in tensors if _FUSED_EXPERTS.search(k)})
    ranks = {k[len(PEFT_PREFIX): -len(".lora_A.weight")]: v.shape[0] for k, v in tensors.items()
             if k.endswith(".lora_A.weight")}
    num_experts = hf_spec.num_experts or 1
    ranks = {s: r // num_experts if s in fused_experts else r for s, r in ranks.items()}
    top = max([int(config["r"]), *ranks.values()])

    def leaf(stem: str) -> str:
        return stem.rpartition(".")[2]

    vllm: list[str] = []
    if fused_experts:
        vllm.append("routed experts as fused 3D parameters load only with enable_mixed_moe_lora_format and "
                    "is_3d_lora_weight=True (write --adapter_format vllm for 2D per-expert keys)")
    known = _VLLM_LEAVES.get(hf_spec.model_type)
    unknown = sorted({leaf(s) for s in stems if s not in fused_experts and known is not None and leaf(s) not in known})
    if unknown:
        vllm.append(f"modules its {hf_spec.model_type} model takes no LoRA on: {unknown}")
    if any(k.endswith(".weight") for k in config.get("rank_pattern") or {}):
        vllm.append("rank_pattern keys ending in .weight match no vLLM module name")
    allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= top]
    if not allowed:
        vllm.append(f"rank {top} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    vllm_line = (f"vllm: ok, serve with --enable-lora --max-lora-rank {allowed[0]}" if not vllm
                 else "vllm: no: " + "; ".join(vllm))

    sglang: list[str] = []
    if hf_spec.model_type == "qwen3_next":
        sglang.append("SGLang serves no Qwen3-Next adapter (use megalora export --merge)")
    if len(set(ranks.values()) | {int(config["r"])}) > 1 or config.get("rank_pattern") or config.get("alpha_pattern"):
        sglang.append("needs one rank and no rank_pattern / alpha_pattern")
    if config.get("use_rslora"):
        sglang.append("scales by alpha/r only (use_rslora is ignored)")
    if config.get("target_parameters") or fused_experts:
        sglang.append("reads target_modules leaf names only (no target_parameters, no fused experts)")
    if any("." in t for t in config.get("target_modules") or []):
        sglang.append("target_modules must be leaf names")
    if any(leaf(s) == "gate" and ".mlp." in s for s in stems):
        sglang.append("takes no router LoRA")
    sglang_line = (f"sglang: ok, serve with --enable-lora --max-lora-rank {top}" if not sglang
                   else "sglang: no: " + "; ".join(sglang))
    return [vllm_line, sglang_line]


def write_adapter(checkpoint_dir: str | Path, out_dir: str | Path, *, adapter_format: str = "vllm",
                  log: Callable[[str], None] = print) -> Path:
    """Write the checkpoint's adapter in `adapter_format` to `out_dir`; logs the format and, per
    server, whether its constraints hold."""
    full, spec, options, base = read_checkpoint_lora(checkpoint_dir)
    tensors, config = megatron_to_serving(full, hf_spec=spec, lora_options=options, adapter_format=adapter_format,
                                          base_model_name_or_path=base, log=log)
    out = save_adapter(tensors, config, out_dir)
    log(f"export: wrote a {adapter_format}-format adapter (rank {config['r']}, {len(tensors)} tensors) to {out}")
    for line in server_checks(tensors, config, hf_spec=spec):
        log(f"export: {line}")
    return out


def peft_readable(adapter_dir: str | Path, *, hf_spec: HFModelSpec, work_dir: str | Path) -> Path:
    """`adapter_dir` itself when peft (on transformers 5) reads it as written; otherwise the same
    adapter converted to peft's form in `work_dir`. On Qwen3-MoE / Qwen3-Next peft turns the MLP leaf
    names of `target_modules` (gate_proj, up_proj, down_proj, gate) into the fused expert parameters,
    so a `vllm` / `sglang` adapter would lose its shared-expert, dense-MLP and router adapters there."""
    folder = Path(adapter_dir)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as handle:
        keys = list(handle.keys())
    if hf_spec.model_type not in _PEFT_RENAMES_MLP or config.get("target_parameters") or \
            not any(".mlp." in k for k in keys):
        return folder
    options = LoraOptions(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          use_rslora=bool(config.get("use_rslora", False)))
    full = peft_to_megatron(load_file(str(folder / ADAPTER_WEIGHTS)), config, hf_spec=hf_spec)
    tensors, peft_config = megatron_to_peft(full, hf_spec=hf_spec, lora_options=options,
                                            base_model_name_or_path=str(config.get("base_model_name_or_path", "")))
    return save_adapter(tensors, peft_config, work_dir)
