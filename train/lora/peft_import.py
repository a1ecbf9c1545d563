"""Import a peft LoRA adapter (made on the transformers model) into our megatron LoRA modules.

peft keeps one adapter per HF projection; megatron fuses q/k/v (linear_qkv), GDN
in_proj_qkvz/in_proj_ba (in_proj) and gate/up (linear_fc1). The fused megatron adapter gets rank
sum(r_i): A = [A_1; ...; A_k] stacked, B block-diagonal (projection i's B rows in its own r_i
columns, then the mapping table's `to_megatron` puts the rows in megatron's order), each block
scaled by s_i / s so that `s * B @ A` equals the sum of the per-projection deltas exactly (s_i =
peft's alpha_i/r_i or alpha_i/sqrt(r_i), s = the megatron module's scaling). A projection that
peft did not adapt inside a fused module contributes zero rows. See `peft_format` for the forms.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor

from megalora.config import ConfigError
from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.lora.experts import LoraExperts
from megalora.train.lora.gates import LoraGate
from megalora.train.lora.layers import LoraLinear
from megalora.train.lora.layout import lora_layout, shard_lora_state
from megalora.train.lora.peft_format import (
    _EXPERT_KEYS,
    _EXPERT_PARAMS,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    _rule_index,
    scaling_for,
)
from megalora.train.lora.spec import LoraSpec
from megalora.train.model.hf_config import HFModelSpec
from megalora.train.model.mapping import Rule

_LORA_MODULES = ("linear_qkv", "linear_proj", "in_proj", "out_proj", "linear_fc1", "linear_fc2", "output_layer",
                 "router", "gate_weight")
_UNSUPPORTED = {"use_dora": True, "lora_bias": True, "fan_in_fan_out": True}


def _matches(targets: list[str], key: str) -> bool:
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup (first key matching the end of `key`)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _megatron_module(rule: Rule) -> str | None:
    """The LoRA module adapting a rule's megatron weight (None when nothing can adapt it)."""
    name = rule.megatron
    if ".local_experts." in name:
        return None
    if name.endswith(".router.weight"):
        return name[: -len(".weight")] + ".lora"
    if name.endswith(".shared_experts.gate_weight"):
        return name[: -len(".gate_weight")] + ".gate_lora"
    module = name.removesuffix(".weight")
    return module if module.rpartition(".")[2] in _LORA_MODULES and name.endswith(".weight") else None


def _hf_rows(spec: HFModelSpec, hf_name: str, present: Mapping[str, Tensor]) -> int:
    """Output rows of an HF projection that peft left without an adapter inside a fused module."""
    leaf = hf_name.rsplit(".", 2)[-2]
    if leaf in ("gate_proj", "up_proj"):
        return next(iter(present.values())).shape[0]  # gate and up have the same width
    if leaf == "q_proj":
        return spec.num_attention_heads * spec.head_dim * (2 if spec.attention_output_gate else 1)
    if leaf in ("k_proj", "v_proj"):
        return spec.num_key_value_heads * spec.head_dim
    assert spec.linear_num_key_heads and spec.linear_num_value_heads and spec.linear_key_head_dim
    if leaf == "in_proj_qkvz":
        key_dim = spec.linear_num_key_heads * spec.linear_key_head_dim
        return 2 * key_dim + 2 * spec.linear_num_value_heads * spec.linear_value_head_dim
    if leaf == "in_proj_ba":
        return 2 * spec.linear_num_value_heads
    raise AssertionError(hf_name)


def _read_peft(peft_tensors: Mapping[str, Tensor], config: Mapping[str, Any],
               num_experts: int) -> dict[str, tuple[Tensor, Tensor, float]]:
    """HF weight name (`...q_proj.weight`, `...mlp.experts.gate_up_proj`) -> (A, B, peft scale)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{ADAPTER_CONFIG}: peft_type={config.get('peft_type')!r}; only LORA adapters import")
    for key, bad in _UNSUPPORTED.items():
        if config.get(key) == bad:
            raise ConfigError(f"{ADAPTER_CONFIG}: {key}={bad} has no megatron LoRA equivalent")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ConfigError(f"{ADAPTER_CONFIG}: bias / modules_to_save (full-weight training) do not import as LoRA")
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    params = list(config.get("target_parameters") or [])
    stems: dict[str, dict[str, Tensor]] = {}
    for key, value in peft_tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ConfigError(f"{ADAPTER_WEIGHTS}: key {key!r} does not start with {PEFT_PREFIX!r}")
        for half in ("lora_A", "lora_B"):
            if key.endswith(f".{half}.weight"):
                stems.setdefault(key[len(PEFT_PREFIX): -len(f".{half}.weight")], {})[half] = value
                break
        else:
            if ".lora_" in key:
                raise ConfigError(f"{ADAPTER_WEIGHTS}: {key!r} is not a plain LoRA tensor (DoRA, embedding LoRA?)")
            # base weights peft saves next to adapters on embedding-like layers carry no adapter
    out: dict[str, tuple[Tensor, Tensor, float]] = {}
    for stem, halves in stems.items():
        if set(halves) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{ADAPTER_WEIGHTS}: {stem} has only {sorted(halves)}")
        # fold scales in at least fp32 (bf16 adapters would round twice)
        a, b = (halves[h].to(torch.promote_types(halves[h].dtype, torch.float32)) for h in ("lora_A", "lora_B"))
        container, depth = stem, 0
        while container.endswith(".base_layer"):
            container, depth = container[: -len(".base_layer")], depth + 1
        expert_params = [p for p in _EXPERT_PARAMS if _matches(params, f"{container}.{p}")]
        if container.endswith(".experts") and expert_params:
            # peft nests one wrapper per targeted parameter, the first registered innermost
            if depth >= len(expert_params):
                raise ConfigError(f"{ADAPTER_WEIGHTS}: {stem} nests deeper than the targeted expert parameters")
            name = key_name = f"{container}.{expert_params[len(expert_params) - 1 - depth]}"
            per = num_experts
        elif depth:
            raise ConfigError(f"{ADAPTER_WEIGHTS}: {stem}: nested adapter on a module that is not routed experts")
        else:
            name = f"{stem}.weight"
            key_name = name if _matches(params, name) else stem
            per = 1
        rank = int(_pattern_value(ranks, key_name, r))
        if a.shape[0] != rank * per or b.shape[1] != rank * per:
            raise ConfigError(f"{ADAPTER_WEIGHTS}: {stem}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                              f"rank {rank}{f' x {per} experts' if per > 1 else ''}")
        out[name] = (a, b, scaling_for(float(_pattern_value(alphas, key_name, alpha)), rank, use_rslora=rslora))
    return out


def _layer_of(hf_name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", hf_name)
    return int(match.group(1)) if match else None


def _fuse(rule: Rule, adapters: Mapping[str, tuple[Tensor, Tensor, float]], used: set[str], *,
          spec: HFModelSpec, scaling: float) -> tuple[Tensor, Tensor] | None:
    """(A, B) of the megatron adapter on `rule`'s weight from peft's per-projection adapters:
    A stacked, B block-diagonal with each block rescaled to `scaling`; None if none present."""
    names = [s.name for s in rule.sources]
    present = {n: adapters[n] for n in names if n in adapters}
    if not present:
        return None
    used.update(present)
    total = sum(a.shape[0] for a, _, _ in present.values())
    blocks, column = [], 0
    for name in names:
        if name not in present:  # a projection peft left alone inside the fused module
            rows = _hf_rows(spec, name, {n: b for n, (_, b, _) in present.items()})
            blocks.append(torch.zeros(rows, total, dtype=next(iter(present.values()))[1].dtype))
            continue
        a, b, peft_scale = present[name]
        block = b.new_zeros(b.shape[0], total)
        block[:, column: column + a.shape[0]] = b * (peft_scale / scaling)
        blocks.append(block)
        column += a.shape[0]
    a_full = torch.cat([present[n][0] for n in names if n in present], dim=0)
    return a_full.contiguous(), rule.to_megatron(*blocks).contiguous()


def peft_to_megatron(peft_tensors: Mapping[str, Tensor], adapter_config: Mapping[str, Any], *,
                     hf_spec: HFModelSpec, scaling: float | None = None) -> dict[str, Tensor]:
    """peft tensors + adapter_config -> full-shape megatron LoRA tensors (names as `apply_lora`
    makes them) whose deltas at megatron scale `scaling` equal peft's. `scaling` defaults to the
    adapter's own alpha/r. The output layer's B has the real vocab rows (no TP padding).
    Routed experts import from peft's fused-parameter form or from the per-expert form that
    adapters made on transformers 4 hold (`mlp.experts.E.gate_proj` ...)."""
    num_experts = hf_spec.num_experts or 0
    adapters = _read_peft(peft_tensors, adapter_config, num_experts)
    if scaling is None:
        scaling = scaling_for(float(adapter_config["lora_alpha"]), int(adapter_config["r"]),
                              use_rslora=bool(adapter_config.get("use_rslora", False)))
    used: set[str] = set()
    full: dict[str, Tensor] = {}
    rules = _rule_index(hf_spec)
    for rule in rules.values():
        if ".local_experts.0.linear_fc1." in rule.megatron:
            _import_experts(rule, rules, adapters, full, used, spec=hf_spec, scaling=scaling)
            continue
        module = _megatron_module(rule)
        fused = _fuse(rule, adapters, used, spec=hf_spec, scaling=scaling) if module else None
        if fused is not None:
            full[f"{module}.lora_A"], full[f"{module}.lora_B"] = fused
    # a spec truncated to its first layers (quick checks) leaves later layers' adapters out
    unused = sorted(n for n in set(adapters) - used if _layer_of(n) is None or _layer_of(n) < hf_spec.num_layers)
    if unused:
        raise ConfigError(f"{ADAPTER_WEIGHTS}: adapters on {unused[:3]} have no megatron LoRA target "
                          "(not a linear layer megatron adapts)")
    return full


def _import_experts(fc1_rule: Rule, rules: Mapping[str, Rule], adapters: Mapping[str, tuple[Tensor, Tensor, float]],
                    full: dict[str, Tensor], used: set[str], *, spec: HFModelSpec, scaling: float) -> None:
    module = fc1_rule.megatron.split(".local_experts.")[0]
    container = fc1_rule.sources[0].name.rsplit(".", 3)[0]
    num_experts = spec.num_experts or 0
    for param, proj in zip(_EXPERT_PARAMS, ("linear_fc1", "linear_fc2")):
        a_key, b_key = _EXPERT_KEYS[param]
        name = f"{container}.{param}"
        if name in adapters:
            used.add(name)
            a, b, peft_scale = adapters[name]
            rank = a.shape[0] // num_experts
            a_ErK = a.reshape(num_experts, rank, a.shape[1])
            b_ENr = b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1) * (peft_scale / scaling)
            if param == "gate_up_proj":
                b_ENr = torch.stack([fc1_rule.to_megatron(*b_e.chunk(2, dim=0)) for b_e in b_ENr])
            full[f"{module}.{a_key}"], full[f"{module}.{b_key}"] = a_ErK.contiguous(), b_ENr.contiguous()
            continue
        per_expert = [_fuse(rules[f"{module}.local_experts.{e}.{proj}.weight"], adapters, used, spec=spec,
                            scaling=scaling) for e in range(num_experts)]
        given = [pair for pair in per_expert if pair is not None]
        if not given:
            continue
        if len({(a.shape, b.shape) for a, b in given}) != 1:
            raise ConfigError(f"{ADAPTER_WEIGHTS}: the per-expert adapters of {container} ({proj}) differ in rank")
        a0, b0 = given[0]
        pairs = [pair or (torch.zeros_like(a0), torch.zeros_like(b0)) for pair in per_expert]
        full[f"{module}.{a_key}"] = torch.stack([a for a, _ in pairs])
        full[f"{module}.{b_key}"] = torch.stack([b for _, b in pairs])


def _rank_dim(name: str, ndim: int) -> int:
    """Dim of a LoRA tensor that holds the rank."""
    if name.endswith("_A"):
        return 0 if ndim == 2 else 1
    return ndim - 1


def _put(module: torch.nn.Module, attr: str, old: torch.nn.Parameter, value: Tensor, *, name: str) -> None:
    """Copy `value` into `old`, or replace `old` by a Parameter of `value`'s shape when only the rank
    differs, keeping every attribute set on `old` (TP split, SP partial-grad, allreduce, expert marks)."""
    if old.shape == value.shape:
        old.data.copy_(value.to(old.dtype))
        return
    dim = _rank_dim(name, old.ndim)
    same_elsewhere = old.ndim == value.ndim and all(
        o == v for i, (o, v) in enumerate(zip(old.shape, value.shape)) if i != dim)
    if not same_elsewhere:
        raise ConfigError(f"{ADAPTER_WEIGHTS}: {name} has shape {tuple(value.shape)} on this rank, the model expects "
                          f"{tuple(old.shape)} (another base model or layout?)")
    new = torch.nn.Parameter(value.to(device=old.device, dtype=old.dtype).clone(), requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    setattr(module, attr, new)


def load_peft_adapter(model: torch.nn.Module, adapter_dir: str | Path, *, hf_spec: HFModelSpec,
                      dims: ParallelDims | None = None) -> dict[str, int]:
    """Load the peft adapter in `adapter_dir` into `model` (already wrapped by `apply_lora`, on the
    layout `dims`, default `groups.current()`). Fused modules get rank sum(r_i) (their
    lora_A / lora_B Parameters are replaced); modules the adapter does not cover get B = 0. Build
    optimizers and DDP after this call. Returns the rank of every imported adapter, keyed by the
    name of its A parameter."""
    folder = Path(adapter_dir)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / file).is_file():
            raise ConfigError(f"{folder}: not a peft adapter folder (no {file})")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    scalings = {float(m.scaling) for m in model.modules() if isinstance(m, (LoraLinear, LoraExperts, LoraGate))}
    if len(scalings) != 1:
        raise ValueError(f"load_peft_adapter: the model's LoRA modules have scalings {sorted(scalings)}; "
                         "apply_lora (one LoraOptions for all) first")
    full = peft_to_megatron(load_file(str(folder / ADAPTER_WEIGHTS)), config, hf_spec=hf_spec,
                            scaling=scalings.pop())
    extra = sorted(set(full) - set(lora_layout(model)))
    if extra:
        raise ConfigError(f"{folder}: the adapter adapts {extra[:3]}, where the model has no LoRA; "
                          "add those targets to lora.target_modules")
    return load_megatron_lora(model, full, dims=dims)


def load_megatron_lora(model: torch.nn.Module, full: Mapping[str, Tensor], *,
                       dims: ParallelDims | None = None) -> dict[str, int]:
    """Load full-shape megatron LoRA tensors into `model` (wrapped by `apply_lora`, any layout),
    resizing the lora_A / lora_B Parameters of modules whose rank differs (attributes kept); a
    module missing from `full` gets B = 0. The output layer's B may lack the vocab padding rows.
    Use it before `load_checkpoint` when resuming a run whose ranks came from an import.
    Returns the rank of every loaded adapter, keyed by the name of its A parameter. `dims`: the
    layout `model` was built on (default: `groups.current()`)."""
    dims = dims or groups.current()
    layout = lora_layout(model)
    extra = sorted(set(full) - set(layout))
    if extra:
        raise ValueError(f"LoRA tensors {extra[:3]} have no LoRA module in the model")
    full = dict(full)
    params = dict(model.named_parameters())
    tp_size = dims.tp
    for name in layout:
        if name in full and name.startswith("output_layer.") and name.endswith("lora_B"):
            rows = params[name].shape[0] * tp_size  # the padded vocab of this layout (padding rows carry nothing)
            value = full[name][:rows]
            full[name] = torch.cat([value, value.new_zeros(rows - value.shape[0], value.shape[1])])
    names = [n for n in layout if n in full]
    shards = shard_lora_state({n: full[n] for n in names}, {n: layout[n] for n in names},
                              tp_rank=dims.tp_rank, tp_size=tp_size, ep_rank=dims.ep_rank, ep_size=dims.ep)
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name in layout:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if name not in shards:
                if not name.endswith("_A"):
                    params[name].zero_()  # B of a module the adapter leaves alone: zero delta
                continue
            _put(module, attr, params[name], shards[name], name=name)
            if name.endswith("_A"):
                ranks[name] = shards[name].shape[_rank_dim(name, shards[name].ndim)]
    return ranks


_TARGET_OF_LEAF = {"lora_fc1_A": "linear_fc1", "lora_fc2_A": "linear_fc2"}


def megatron_targets(full_lora: Mapping[str, Tensor]) -> list[str]:
    """`lora.target_modules` names that cover every adapter of a full megatron LoRA dict."""
    targets = set()
    for name in full_lora:
        module, _, leaf = name.rpartition(".")
        if leaf in _TARGET_OF_LEAF:
            targets.add(_TARGET_OF_LEAF[leaf])
        elif leaf == "lora_A":
            short = module.rpartition(".")[2]
            targets.add({"lora": "router", "gate_lora": "shared_expert_gate"}.get(short, short))
    return sorted(targets)


def lora_spec_of_peft_adapter(adapter_dir: str | Path, *, hf_spec: HFModelSpec) -> LoraSpec:
    """The `LoraSpec` that gives a megatron model of `hf_spec` a LoRA module for every adapter in the
    peft folder `adapter_dir`, at the adapter's rank and alpha (fused modules are widened when
    the adapter is loaded)."""
    folder = Path(adapter_dir)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"{folder}: not a peft adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    full = peft_to_megatron(load_file(str(folder / ADAPTER_WEIGHTS)), config, hf_spec=hf_spec)
    if not full:
        raise ConfigError(f"{folder}: the adapter has no tensor on this model's first {hf_spec.num_layers} layers")
    return LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                    use_rslora=bool(config.get("use_rslora", False)), target_modules=tuple(megatron_targets(full)))
