"""The one path from an HF folder to the trainable model: base model, LoRA, adapter weights.

    dims = groups.initialize(tp=2, ep=2)
    model, info = build_lora_model(model_dir, lora=LoraSpec.from_section(cfg.lora), dims=dims)

Training (and its resume), `megalora verify --adapter`, export's verify and the PEFT import
all build here, in these ordered steps (`info.steps` records which ran):

1. `build`: this rank's shard of the megatron model with its slice of the HF weights
   (`megalora.train.model.build.build_model`), moved to `dims.device`;
2. `apply_lora`: the spec's targets wrapped, everything else frozen; the spec is `lora`, or
   what `checkpoint`'s meta.json recorded, or what the PEFT `adapter` declares;
3. `split_fused_adapters`: with `per_projection`, one adapter per HF projection inside the
   fused layers (A `[k*r, in]`, B block-diagonal, kept so by a gradient mask); a checkpoint's
   tensors come in that shape already, so loading one skips this step (and the masks);
4. `load_peft_adapter` (`adapter`, a PEFT folder) or `load_checkpoint` (`checkpoint`, a
   training checkpoint folder: its full-shape LoRA tensors, sharded for `dims`).

A resumed run builds like a new one; the step loop then loads the optimizer state and the
LoRA weights of the checkpoint it resumes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from megalora.config import ConfigError
from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.lora.apply import LoraReport, apply_lora
from megalora.train.lora.layout import lora_layout
from megalora.train.lora.peft_import import (
    load_megatron_lora, load_peft_adapter, lora_spec_of_peft_adapter)
from megalora.train.lora.per_projection import split_fused_adapters
from megalora.train.lora.spec import LoraSpec, read_trained_model
from megalora.train.model.build import ModelInfo, build_model


@dataclass
class LoraModelInfo(ModelInfo):
    """`ModelInfo` plus what `build_lora_model` did to add LoRA."""

    lora: LoraSpec = field(default_factory=LoraSpec)
    report: LoraReport = field(default_factory=LoraReport)
    layout: dict[str, str] = field(default_factory=dict)
    num_masked: int = 0  # B tensors kept block-diagonal by `per_projection`
    steps: list[str] = field(default_factory=list)


def build_lora_model(
    model_dir: str | Path,
    *,
    lora: LoraSpec | None = None,
    dims: ParallelDims | None = None,
    adapter: str | Path | None = None,
    checkpoint: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    num_layers: int | None = None,
    experts: str = "grouped",
    expert_impl: str = "grouped",
    seed: int = 42,
    verbose: bool = False,
    **config_overrides: Any,
) -> tuple[torch.nn.Module, LoraModelInfo]:
    """This rank's megatron model of `model_dir` with LoRA, ready to train or run (see the module
    docstring for the steps). Give `lora`, or `checkpoint` (its spec and weights), or `adapter`
    alone (its spec and weights); `lora` with `adapter` starts training from the adapter.
    `dims` is the layout (default: `groups.current()`); `dtype`, `num_layers`, `experts` and
    `config_overrides` go to `build_model`; `expert_impl` and `seed` to `apply_lora` (the
    per-projection split draws from `seed` too); `verbose` prints the LoRA report on rank 0."""
    if checkpoint is not None and (lora is not None or adapter is not None):
        raise ValueError("build_lora_model: a checkpoint brings its own LoRA; give no `lora` or `adapter` with it")
    if lora is None and checkpoint is None and adapter is None:
        raise ValueError("build_lora_model: give `lora`, `checkpoint` or `adapter`")
    dims = dims or groups.current()
    if checkpoint is not None:
        meta_path = Path(checkpoint) / "meta.json"
        if not meta_path.is_file():
            raise ConfigError(f"{checkpoint}: not a megalora checkpoint folder (no meta.json)")
        lora = read_trained_model(json.loads(meta_path.read_text()), where=meta_path).lora
    model, base = build_model(model_dir, dims=dims, dtype=dtype, num_layers=num_layers, experts=experts,
                              **config_overrides)
    steps = ["build"]
    model.to(dims.device)
    if lora is None:
        assert adapter is not None
        lora = lora_spec_of_peft_adapter(adapter, hf_spec=base.spec)
    report = apply_lora(model, lora, seed=seed, expert_impl=expert_impl, verbose=verbose)
    steps.append("apply_lora")
    num_masked = 0
    if lora.per_projection and checkpoint is None:
        num_masked = split_fused_adapters(model, hf_spec=base.spec, lora_options=lora.options, seed=seed, dims=dims)
        steps.append("split_fused_adapters")
    if adapter is not None:
        # Fused layers may get wider LoRA tensors (one block per HF projection): parameters are
        # replaced, so optimizers are built after this.
        load_peft_adapter(model, adapter, hf_spec=base.spec, dims=dims)
        steps.append("load_peft_adapter")
    if checkpoint is not None:
        _load_checkpoint_lora(model, Path(checkpoint), dims=dims)
        steps.append("load_checkpoint")
    info = LoraModelInfo(**{f.name: getattr(base, f.name) for f in fields(ModelInfo)}, lora=lora, report=report,
                         layout=lora_layout(model), num_masked=num_masked, steps=steps)
    return model, info


def _load_checkpoint_lora(model: torch.nn.Module, ckpt: Path, *, dims: ParallelDims) -> None:
    """The checkpoint's full-shape LoRA tensors into `model` (its first layers when the model has
    fewer); every LoRA tensor of the model must be there. Fused layers take the checkpoint's rank
    (k*r with `per_projection`)."""
    layout = lora_layout(model)
    full = load_file(str(ckpt / "adapter_model.safetensors"))
    missing = sorted(set(layout) - set(full))
    if missing:
        raise ConfigError(f"{ckpt}: adapter_model.safetensors lacks {missing[:3]} that the model's LoRA has")
    load_megatron_lora(model, {n: full[n] for n in layout}, dims=dims)
