"""Build a megatron-core `GPTModel` from an HF folder (config.json + safetensors).

    dims = groups.initialize(tp=2)
    model, info = build_model("Qwen3-Coder-Next/", dims=dims, dtype=torch.bfloat16)

The layout is the `ParallelDims` that `megalora.parallel.groups.initialize` returned (without
one, that of the last `initialize`, or a one-process world). Each rank builds only its shard
and reads only its slice of the weights. LoRA is added by `megalora.train.lora.build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.model.attention import SDPACoreAttention
from megalora.train.model.hf_config import HFModelSpec, padded_vocab_size, read_hf_config, to_transformer_config
from megalora.train.model.loader import LoadReport, load_hf_weights
from megalora.train.model.spec import block_spec
from megalora.train.norm import RMSNorm


@dataclass
class ModelInfo:
    """What `build_model` built: the HF architecture, megatron config and layout."""

    spec: HFModelSpec
    config: Any
    dims: ParallelDims
    vocab_size: int
    padded_vocab_size: int
    load: LoadReport | None


def _mask_padded_vocab(model: torch.nn.Module, *, vocab_size: int, padded: int, dims: ParallelDims) -> None:
    """Give the padding columns of the logits a huge negative value so that softmax and
    cross entropy over the padded vocab equal those over the real vocab."""
    if padded == vocab_size:
        return
    per_rank = padded // dims.tp

    def hook(_module: torch.nn.Module, _inputs: Any, output: tuple[Tensor, Any]) -> tuple[Tensor, Any]:
        logits, bias = output
        # Gathered logits span the padded vocab; local ones this rank's shard of it.
        first = 0 if logits.shape[-1] == padded else dims.tp_rank * per_rank
        cut = max(vocab_size - first, 0)
        if cut >= logits.shape[-1]:
            return output
        keep = torch.arange(logits.shape[-1], device=logits.device) < cut
        logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        return logits, bias

    model.output_layer.register_forward_hook(hook)


def build_model(
    hf_dir: str | Path,
    *,
    dims: ParallelDims | None = None,
    dtype: torch.dtype = torch.float32,
    num_layers: int | None = None,
    load_weights: bool = True,
    experts: str = "grouped",
    **config_overrides: Any,
) -> tuple[torch.nn.Module, ModelInfo]:
    """Build this rank's `GPTModel` for the HF checkpoint in `hf_dir` and load its weights.

    `num_layers` keeps only the first layers (quick checks); `experts` picks the routed-expert
    implementation (`grouped`, or the `sequential` loop reference; see `block_spec`); `config_overrides` go to
    megatron's `TransformerConfig` (e.g. `recompute_granularity`). TP, EP and sequence parallel
    come from `dims` (default: `groups.current()`). Logits over the padded vocab are masked so
    only the first `info.vocab_size` columns matter. The model stays on the CPU."""
    if dims is None:
        dims = groups.current()
    spec = read_hf_config(hf_dir)
    if num_layers is not None:
        spec = spec.truncated(num_layers)
    config = to_transformer_config(
        spec, dtype=dtype, tp=dims.tp, ep=dims.ep, sequence_parallel=dims.sequence_parallel, **config_overrides
    )
    padded = padded_vocab_size(spec.vocab_size, tp=dims.tp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(spec, norm=RMSNorm, core_attention=SDPACoreAttention, experts=experts),
        vocab_size=padded,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=spec.rotary_percent,
        rotary_base=spec.rope_theta,
    )
    report = None
    if load_weights:
        report = load_hf_weights(model, hf_dir, spec, dims=dims, padded_vocab_size=padded)
    _mask_padded_vocab(model, vocab_size=spec.vocab_size, padded=padded, dims=dims)
    info = ModelInfo(
        spec=spec,
        config=config,
        dims=dims,
        vocab_size=spec.vocab_size,
        padded_vocab_size=padded,
        load=report,
    )
    return model, info
