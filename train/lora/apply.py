"""Select LoRA targets in a built megatron GPTModel by module name, wrap them, freeze the rest.

Target names (`lora.target_modules`), matched against the last component of a module name:

| name                 | modules                                                              |
|----------------------|----------------------------------------------------------------------|
| `linear_qkv`         | attention QKV (column-parallel)                                      |
| `linear_proj`        | attention output (row-parallel)                                      |
| `in_proj`/`out_proj` | gated-delta-net input / output projections                           |
| `linear_fc1`/`_fc2`  | dense MLP, shared expert, and every routed expert's fc1 / fc2        |
| `router`             | MoE router logits (only on request)                                  |
| `shared_expert_gate` | shared-expert sigmoid gate (only on request)                         |
| `output_layer`       | LM head (only on request)                                            |

`all-linear` = the first five rows. `target_regex` adds modules whose full name matches
(`re.search`); routed experts count as `<experts>.linear_fc1` / `<experts>.linear_fc2`.
`exclude_modules` entries are substrings of full names that never get LoRA.

Module names after wrapping (for export): a dense target `X` becomes `X.base_layer` (the
frozen base) plus `X.lora_A` [r, in_local] and `X.lora_B` [out_local, r]; routed experts
`...mlp.experts` become `...mlp.experts.base_layer` plus `lora_fc1_A` [E_local, r, H],
`lora_fc1_B` [E_local, 2F, r], `lora_fc2_A` [E_local, r, F], `lora_fc2_B` [E_local, H, r];
the router gets `router.lora.lora_A/B`, the shared expert `shared_experts.gate_lora.lora_A/B`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.transformer_block import TransformerBlock

from megalora.config import ConfigError
from megalora.train.lora.experts import LoraExperts
from megalora.train.lora.gates import add_router_lora, add_shared_expert_gate_lora
from megalora.train.lora.layers import LoraLinear
from megalora.train.lora.spec import LoraSpec

ALL_LINEAR = ("linear_qkv", "linear_proj", "in_proj", "out_proj", "linear_fc1", "linear_fc2")
ON_REQUEST = ("router", "shared_expert_gate", "output_layer")
KNOWN_TARGETS = ("all-linear",) + ALL_LINEAR + ON_REQUEST


@dataclass
class LoraReport:
    """What `apply_lora` wrapped and the parameter counts per module kind (this rank)."""

    wrapped: dict[str, str] = field(default_factory=dict)  # adapter module name -> kind
    trainable: dict[str, int] = field(default_factory=dict)  # kind -> LoRA parameters
    frozen: dict[str, int] = field(default_factory=dict)  # kind -> base parameters they adapt
    total_trainable: int = 0
    total_params: int = 0

    def format(self) -> str:
        """Per module kind: modules, trainable LoRA and frozen base parameters; then the totals."""
        lines = [f"{'kind':<26}{'modules':>8}{'trainable':>14}{'frozen base':>14}"]
        for kind in sorted(self.trainable):
            count = sum(1 for k in self.wrapped.values() if k == kind)
            lines.append(f"{kind:<26}{count:>8}{self.trainable[kind]:>14,}{self.frozen[kind]:>14,}")
        rest = self.total_params - self.total_trainable - sum(self.frozen.values())
        lines.append(f"{'(not adapted)':<26}{'':>8}{0:>14,}{rest:>14,}")
        frac = self.total_trainable / max(self.total_params, 1)
        lines.append(f"trainable {self.total_trainable:,} of {self.total_params:,} parameters ({100 * frac:.4f}%)")
        return "\n".join(lines)


def _seed_for(seed: int, name: str) -> int:
    """A per-module seed from the run seed and the module's name (the same on every rank)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _resolve_targets(target_modules: Any) -> set[str]:
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [n for n in names if n not in KNOWN_TARGETS]
    if unknown:
        raise ConfigError(f"lora.target_modules: unknown {unknown}; allowed: {', '.join(KNOWN_TARGETS)}")
    chosen = set(names)
    if "all-linear" in chosen:
        chosen.discard("all-linear")
        chosen.update(ALL_LINEAR)
    return chosen


def check_targets(lora_cfg: Any) -> None:
    """Raise ConfigError naming a bad `target_modules` entry or `target_regex` (needs no model)."""
    _Selector(lora_cfg)


class _Selector:
    def __init__(self, cfg: Any) -> None:
        self.targets = _resolve_targets(cfg.target_modules)
        try:
            self.regex = re.compile(cfg.target_regex) if cfg.target_regex else None
        except re.error as err:
            raise ConfigError(f"lora.target_regex: invalid regular expression ({err})") from None
        self.exclude = list(cfg.exclude_modules or [])

    def wants(self, name: str, short: str) -> bool:
        if any(ex in name for ex in self.exclude):
            return False
        return short in self.targets or bool(self.regex and self.regex.search(name))


def enable_block_input_grads(model: torch.nn.Module) -> list[Any]:
    """Make each TransformerBlock's input require grad when it does not (returns hook handles).

    With full recomputation megatron wraps each chunk of layers in a checkpoint autograd
    Function; when none of its inputs requires grad (frozen embeddings) the Function's output
    does not either and backward never re-enters the chunk: the LoRA weights inside silently
    get no gradient. Marking the block input as requiring grad keeps the chunk in the graph.
    """
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        if not (module.training and torch.is_grad_enabled()):
            return None
        if "hidden_states" in kwargs:
            h = kwargs["hidden_states"]
            if torch.is_tensor(h) and not h.requires_grad:
                kwargs = {**kwargs, "hidden_states": h.detach().requires_grad_(True)}
                return args, kwargs
        elif args and torch.is_tensor(args[0]) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:]), kwargs
        return None

    return [m.register_forward_pre_hook(hook, with_kwargs=True)
            for m in model.modules() if isinstance(m, TransformerBlock)]


def _kind(name: str, short: str) -> str:
    if short in ("linear_fc1", "linear_fc2"):
        return f"shared_expert.{short}" if ".shared_experts." in f"{name}." else f"mlp.{short}"
    return short


def _adapted_base_params(module: torch.nn.Module, kind: str, projections: tuple[str, ...]) -> int:
    """Base parameters of `module` that the adapter acts on (for the report)."""
    if kind == "routed_experts":
        return sum(p.numel() for expert in module.local_experts for proj in projections
                   for p in expert.get_submodule(proj).parameters())
    if kind == "router":
        return sum(p.numel() for p in (module.weight, module.bias) if p is not None)
    if kind == "shared_expert_gate":
        return module.gate_weight.numel()
    return sum(p.numel() for p in module.parameters())


def _replace(model: torch.nn.Module, name: str, old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Put `new` (which wraps `old`) in `old`'s place.

    Forward hooks others registered on `old` (e.g. the padded-vocab mask on the output layer)
    move to `new`, so they still see the output the parent module receives, delta included.
    """
    for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(new, attr).update(getattr(old, attr))
        getattr(old, attr).clear()
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: torch.nn.Module, lora_cfg: Any, *, seed: int = 42,
               expert_impl: str = "grouped", verbose: bool = True) -> LoraReport:
    """Freeze `model`, add LoRA to the targets chosen by `lora_cfg` (a `LoraSpec`, or a
    `LoraSection` read by `LoraSpec.from_section`). Its `per_projection` is applied by
    `megalora.train.lora.build`, which builds a model with LoRA in one call.

    `seed` fixes every adapter's A (per module name, so all parallel layouts start equal);
    `expert_impl` is `grouped` or `loop` for the routed experts. Returns a `LoraReport`
    (printed on rank 0 when `verbose`). Raises ValueError when nothing matches.
    """
    spec = LoraSpec.from_section(lora_cfg)
    if any(isinstance(m, (LoraLinear, LoraExperts)) or hasattr(m, "gate_lora") or hasattr(m, "lora")
           for m in model.modules()):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    options = spec.options
    select = _Selector(spec)
    for p in model.parameters():
        p.requires_grad_(False)
    report = LoraReport()
    plan: list[tuple[str, str, torch.nn.Module, tuple[str, ...]]] = []
    inside_experts: list[str] = []
    for name, module in model.named_modules():
        short = name.rpartition(".")[2]
        if any(name.startswith(prefix) for prefix in inside_experts):
            continue  # routed experts are handled as one unit by LoraExperts
        if isinstance(module, SequentialMLP):
            inside_experts.append(name + ".")
            projections = [p for p in ("linear_fc1", "linear_fc2") if select.wants(f"{name}.{p}", p)]
            if projections:
                plan.append((name, "routed_experts", module, tuple(projections)))
        elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and select.wants(name, short):
            plan.append((name, _kind(name, short), module, ()))
        elif isinstance(module, TopKRouter) and select.wants(name, "router"):
            plan.append((name, "router", module, ()))
        elif isinstance(module, SharedExpertMLP) and module.use_shared_expert_gate and \
                select.wants(f"{name}.gate", "shared_expert_gate"):
            plan.append((name, "shared_expert_gate", module, ()))
    if not plan:
        raise ConfigError(f"lora.target_modules={list(spec.target_modules)!r} / target_regex="
                          f"{spec.target_regex!r} matched no module of the model")
    for name, kind, module, projections in plan:
        init_seed = _seed_for(seed, name)
        frozen = _adapted_base_params(module, kind, projections)
        if kind == "routed_experts":
            ep_group = module.ep_group
            first = (ep_group.rank() if ep_group is not None else 0) * module.num_local_experts
            new = LoraExperts(module, options=options, init_seed=init_seed, first_global_expert=first,
                              impl=expert_impl, projections=projections)
            _replace(model, name, module, new)
            adapter = new
        elif kind == "router":
            adapter = add_router_lora(module, options=options, init_seed=init_seed)
            name = f"{name}.lora"
        elif kind == "shared_expert_gate":
            adapter = add_shared_expert_gate_lora(module, options=options, init_seed=init_seed)
            name = f"{name}.gate_lora"
        else:
            adapter = LoraLinear(module, options=options, init_seed=init_seed)
            _replace(model, name, module, adapter)
        report.wrapped[name] = kind
        count = sum(p.numel() for n, p in adapter.named_parameters(recurse=False) if "lora_" in n)
        report.trainable[kind] = report.trainable.get(kind, 0) + count
        report.frozen[kind] = report.frozen.get(kind, 0) + frozen
    enable_block_input_grads(model)
    report.total_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.total_params = sum(p.numel() for p in model.parameters())
    if verbose and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(report.format(), flush=True)
    return report
