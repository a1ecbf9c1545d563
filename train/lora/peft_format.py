"""PEFT-format adapters: our megatron LoRA <-> `peft` LoRA on the transformers model.

Export (`megatron_to_peft`, `write_peft_adapter`) writes what `PeftModel.from_pretrained` loads
onto the transformers model, exactly (same logits):

- a fused megatron adapter (linear_qkv, GDN in_proj, gated linear_fc1) becomes one adapter per HF
  projection, each with the same A and the matching rows of B (the row split is the mapping
  table's own `to_hf`; B's rows are the output dim, exactly like the base weight's);
- a per-projection adapter (`lora_per_projection`: rank k*r over k projections, B block-diagonal)
  gives each projection its own rank-r block instead (`per_projection_blocks`, exact);
- row-parallel targets (linear_proj/o_proj, linear_fc2/down_proj, GDN out_proj) map 1:1: their
  mapping rules do not permute the input dim, so A and B are copied as they are;
- routed experts use peft's fused-parameter form on transformers' `mlp.experts.gate_up_proj`
  [E, 2F, H] / `down_proj` [E, H, F]: `lora_A` [E*r, in] with expert e's rows at e*r:(e+1)*r and
  `lora_B` [out, E*r] with expert e's columns at e::E. With both targeted, peft nests the two
  parameter wrappers: gate_up_proj (registered first) is the inner one, saved under
  `experts.base_layer.lora_*`, down_proj the outer one, saved under `experts.lora_*`;
- the router (`mlp.gate`, a custom module in transformers 5) and, on Qwen3-MoE / Qwen3-Next, the
  dense and shared-expert `gate_proj/up_proj/down_proj` are targeted as *parameters*
  (`target_parameters=["model.layers.L.mlp.shared_expert.gate_proj.weight", ...]`): peft renames
  `target_modules` entries ending in gate_proj/up_proj/down_proj/gate on these architectures to
  the fused expert parameters, so as target_modules they would silently adapt the wrong tensors;
- the output layer's B loses its vocab padding rows; lm_head with tied embeddings works in peft
  (LoRA on the output projection only, as ours) with a tying warning.

Every target of our model has a peft form; limits on the peft side: parameter targets refuse
`lora_dropout != 0`, so the written config has `lora_dropout: 0.0` whenever it has
`target_parameters` (dropout only matters in training). A module whose rank differs from the
run's `lora_rank` (a fused module after an import) gets exact-name `rank_pattern` /
`alpha_pattern` entries that give peft the module's own scale.

Import (`peft_to_megatron`, `load_peft_adapter`) is exact too: where megatron fuses k HF
projections, the fused adapter gets rank sum(r_i): A = [A_1; ...; A_k], B block-diagonal (each
projection's B rows in its own r_i columns), each block scaled by s_i / s_megatron so the delta is
exactly the sum of the per-projection deltas. Our LoRA modules are built with one rank for all
(`LoraOptions.rank`), so `load_peft_adapter` replaces the lora_A / lora_B Parameters of a module
whose rank differs with new ones of the right shape, carrying over every attribute the gradient
and TP machinery reads (`tensor_model_parallel`, `partition_dim`, `sequence_parallel`,
`lora_tp_allreduce`, `allreduce`, `lora_expert`). The module keeps its `scaling`; B absorbs the
difference. Optimizers and DDP wrappers must be built after loading. Adapters made on
transformers 4 (one adapter per routed expert, `mlp.experts.E.gate_proj`) import as well.

The serving layouts (vLLM, SGLang) are built on this one in `adapter_formats`.

Entry points: `write_peft_adapter(checkpoint_dir, out_dir)` (export), `megatron_to_peft` (pure),
`load_peft_adapter(model, dir, hf_spec=)` (model already wrapped by `apply_lora`),
`peft_to_megatron` (pure); a model with the adapter's own targets, rank and alpha is built by
`megalora.train.lora.build.build_lora_model(..., adapter=dir)`. The import side lives in `peft_import` (with
`load_megatron_lora`, which resizes and loads a full megatron LoRA dict, e.g. before resuming).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from megalora.config import ConfigError
from megalora.train.lora.spec import read_trained_model
from megalora.train.model.hf_config import HFModelSpec, read_hf_config
from megalora.train.model.mapping import Rule, Source, rules_for

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Architectures where peft rewrites target_modules named like the v4 expert projections.
_PEFT_RENAMES_MLP = frozenset({"qwen3_moe", "qwen3_next"})
_MLP_LEAVES = frozenset({"gate_proj", "up_proj", "down_proj", "gate"})
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers' registration order (peft's nesting order)
_EXPERT_KEYS = {"gate_up_proj": ("lora_fc1_A", "lora_fc1_B"), "down_proj": ("lora_fc2_A", "lora_fc2_B")}


def scaling_for(alpha: float, rank: int, *, use_rslora: bool) -> float:
    """peft's (and our) factor on B·A: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class _Target:
    """One adapted megatron module and the HF tensors its base weight maps to."""

    module: str  # megatron module holding lora_A / lora_B (or the expert adapters)
    rule: Rule  # mapping rule of the base weight (routed experts: expert 0's linear_fc1)
    hf_container: str = ""  # routed experts only: transformers' `...mlp.experts` module


def _identity(t: Tensor) -> Tensor:
    return t


def _single(t: Tensor) -> tuple[Tensor, ...]:
    return (t,)


def _rule_index(spec: HFModelSpec) -> dict[str, Rule]:
    rules = {rule.megatron: rule for rule in rules_for(spec)}
    if "output_layer.weight" not in rules:
        # tied embeddings: the output layer's adapter still belongs on transformers' lm_head
        # (a Linear sharing the embedding's weight), so peft adapts the same product
        rules["output_layer.weight"] = Rule("output_layer.weight", (Source("lm_head.weight", 0, vocab=True),),
                                            _identity, _single, group="tp")
    return rules


def _base_weight(module: str) -> str:
    """Megatron name of the base weight a LoRA module adapts."""
    if module.endswith(".router.lora"):
        return module[: -len(".lora")] + ".weight"
    if module.endswith(".shared_experts.gate_lora"):
        return module[: -len(".gate_lora")] + ".gate_weight"
    return module + ".weight"


def _targets(names: list[str], rules: dict[str, Rule]) -> list[_Target]:
    """Adapted modules in `names` (megatron LoRA tensor names), each with its mapping rule."""
    out: dict[str, _Target] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            weight = _base_weight(module)
            if weight not in rules:
                raise ValueError(f"LoRA tensor {name}: no mapping rule for its base weight {weight}")
            out.setdefault(module, _Target(module, rules[weight]))
        elif leaf in ("lora_fc1_A", "lora_fc1_B", "lora_fc2_A", "lora_fc2_B"):
            first = rules.get(f"{module}.local_experts.0.linear_fc1.weight")
            if first is None:
                raise ValueError(f"LoRA tensor {name}: {module} has no routed experts in the mapping table")
            container = first.sources[0].name.rsplit(".", 3)[0]  # model.layers.L.mlp.experts
            out.setdefault(module, _Target(module, first, container))
        else:
            raise ValueError(f"{name}: not a megatron LoRA tensor name")
    return list(out.values())


def _as_parameter_target(spec: HFModelSpec, hf_module: str) -> bool:
    leaf = hf_module.rpartition(".")[2]
    return leaf == "gate" or (spec.model_type in _PEFT_RENAMES_MLP and leaf in _MLP_LEAVES)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def megatron_to_peft(full_lora: Mapping[str, Tensor], *, hf_spec: HFModelSpec, lora_options: Any,
                     base_model_name_or_path: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full-shape megatron LoRA tensors -> (peft tensors, adapter_config) for transformers.

    `lora_options` is a `LoraOptions` (rank, alpha, use_rslora, dropout): every megatron module
    scales by `lora_options.scaling`; a module whose rank (read from its A) differs from
    `lora_options.rank` gets rank_pattern / alpha_pattern entries that give peft the same scale.
    """
    rules = _rule_index(hf_spec)
    scale = lora_options.scaling
    tensors: dict[str, Tensor] = {}
    target_modules: list[str] = []
    target_parameters: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}

    def note_rank(key: str, rank: int) -> None:
        if rank != lora_options.rank:
            rank_pattern[re.escape(key)] = rank
            alpha_pattern[re.escape(key)] = scale * (math.sqrt(rank) if lora_options.use_rslora else rank)

    for target in _targets(sorted(full_lora), rules):
        if target.hf_container:
            for key, rank in _export_experts(full_lora, target, tensors).items():
                target_parameters.append(key)
                note_rank(key, rank)
            continue
        a, b = full_lora[f"{target.module}.lora_A"], full_lora[f"{target.module}.lora_B"]
        pieces = target.rule.to_hf(b)
        for source, (a, piece) in zip(target.rule.sources, per_projection_blocks(a, pieces, rank=lora_options.rank)):
            hf_module = source.name.removesuffix(".weight")
            if source.vocab:
                piece = piece[: hf_spec.vocab_size]
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = a.detach().clone().contiguous()
            tensors[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = piece.detach().clone().contiguous()
            if _as_parameter_target(hf_spec, hf_module):
                target_parameters.append(source.name)
                note_rank(source.name, a.shape[0])
            else:
                target_modules.append(hf_module)
                note_rank(hf_module, a.shape[0])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": int(lora_options.rank),
        "lora_alpha": float(lora_options.alpha),
        "use_rslora": bool(lora_options.use_rslora),
        # peft refuses dropout on parameter targets; it only matters during training.
        "lora_dropout": 0.0 if target_parameters else float(lora_options.dropout),
        "target_modules": sorted(target_modules),
        "target_parameters": sorted(target_parameters) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }
    return tensors, config


def per_projection_blocks(a: Tensor, pieces: tuple[Tensor, ...], *, rank: int) -> list[tuple[Tensor, Tensor]]:
    """(A, B) of each HF projection inside one fused megatron adapter (A [R, in], B split by rows
    into `pieces`). A per-projection adapter (R = k*rank for k projections, projection i's B rows
    zero outside its own columns i*rank:(i+1)*rank) gives each projection its own rank-`rank`
    block, exactly; any other adapter gives every projection the whole A and its rows of B."""
    k = len(pieces)
    if k > 1 and a.shape[0] == k * rank:
        blocks = [(a[i * rank:(i + 1) * rank], piece[:, i * rank:(i + 1) * rank]) for i, piece in enumerate(pieces)]
        outside = [torch.cat([piece[:, : i * rank], piece[:, (i + 1) * rank:]], dim=1)
                   for i, piece in enumerate(pieces)]
        if not any(bool(rest.any()) for rest in outside):
            return blocks
    return [(a, piece) for piece in pieces]


def _export_experts(full_lora: Mapping[str, Tensor], target: _Target, tensors: dict[str, Tensor]) -> dict[str, int]:
    """Write one routed-expert module's adapters in peft's fused-parameter form; returns the
    targeted parameter names with their ranks."""
    present = [p for p in _EXPERT_PARAMS if f"{target.module}.{_EXPERT_KEYS[p][0]}" in full_lora]
    ranks: dict[str, int] = {}
    for param in present:
        a_key, b_key = _EXPERT_KEYS[param]
        a_ErK, b_ENr = full_lora[f"{target.module}.{a_key}"], full_lora[f"{target.module}.{b_key}"]
        num_experts, rank, _ = a_ErK.shape
        if param == "gate_up_proj":
            # megatron fc1 rows -> per-expert gate_proj / up_proj rows (the table's split), which
            # transformers stacks as gate_up_proj = [gate; up]
            b_ENr = torch.stack([torch.cat(target.rule.to_hf(b_ENr[e]), dim=0) for e in range(num_experts)])
        # peft: expert e's A rows at e*r:(e+1)*r, its B columns at e::E
        a_peft = a_ErK.reshape(num_experts * rank, -1)
        b_peft = b_ENr.permute(1, 2, 0).reshape(b_ENr.shape[1], rank * num_experts)
        nested = ".base_layer" if param == "gate_up_proj" and len(present) == 2 else ""
        stem = f"{PEFT_PREFIX}{target.hf_container}{nested}"
        tensors[f"{stem}.lora_A.weight"] = a_peft.detach().clone().contiguous()
        tensors[f"{stem}.lora_B.weight"] = b_peft.detach().clone().contiguous()
        ranks[f"{target.hf_container}.{param}"] = rank
    return ranks


def read_checkpoint_lora(checkpoint_dir: str | Path) -> tuple[dict[str, Tensor], HFModelSpec, Any, str]:
    """(full megatron LoRA tensors, HF spec of the trained layers, LoraOptions, base model path) of a
    training checkpoint (adapter_model.safetensors + meta.json)."""
    ckpt = Path(checkpoint_dir)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{ckpt}: not a megalora checkpoint folder (no meta.json)")
    trained = read_trained_model(json.loads(meta_path.read_text()), where=meta_path)
    spec = read_hf_config(trained.base_model)
    if trained.num_layers:
        spec = spec.truncated(trained.num_layers)
    return load_file(str(ckpt / ADAPTER_WEIGHTS)), spec, trained.lora.options, str(trained.base_model)


def save_adapter(tensors: Mapping[str, Tensor], config: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def write_peft_adapter(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Read a training checkpoint (adapter_model.safetensors + meta.json) and write
    `adapter_config.json` + `adapter_model.safetensors` that peft loads onto the base model."""
    full, spec, options, base = read_checkpoint_lora(checkpoint_dir)
    tensors, config = megatron_to_peft(full, hf_spec=spec, lora_options=options, base_model_name_or_path=base)
    return save_adapter(tensors, config, out_dir)


def peft_equivalent_count(model: torch.nn.Module, *, rank: int, vocab_size: int, padded_vocab_size: int) -> int:
    """The trainable count peft reports for the exported adapter of `model` (this rank's share).

    Ours keeps one A per fused layer where peft keeps one per HF projection (q/k/v: 3, gate/up
    and GDN qkvz/ba: 2), and B of the output layer spans the TP-padded vocabulary."""
    count = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        count += p.numel()
        if name.endswith(".linear_qkv.lora_A"):
            count += 2 * p.numel()
        elif name.endswith((".in_proj.lora_A", ".linear_fc1.lora_A")):
            count += p.numel()
    if "output_layer.lora_B" in dict(model.named_parameters()):
        count -= (padded_vocab_size - vocab_size) * rank
    return count
