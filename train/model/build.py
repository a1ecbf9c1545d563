"""Build a megatron-core `GPTModel` from an HF folder (config.json + safetensors).

    model, info = build_model("Qwen3-Coder-Next/", dtype=torch.bfloat16)

megatron's parallel state must be initialised first (`megalora.parallel.groups.initialize`);
a one-process world is set up if it is not. Each rank builds only its shard and reads
only its slice of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megalora.train.model.hf_config import HFModelSpec, padded_vocab_size, read_hf_config, to_transformer_config
from megalora.train.model.loader import LoadReport, ParallelRank, load_hf_weights
from megalora.train.model.spec import block_spec


@dataclass
class ModelInfo:
    """What `build_model` built: the HF architecture, megatron config and layout."""

    spec: HFModelSpec
    config: Any
    where: ParallelRank
    vocab_size: int
    padded_vocab_size: int
    sequence_parallel: bool
    load: LoadReport | None


def _ensure_parallel_state() -> None:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        from megalora.parallel import groups

        groups.initialize(tp=1, ep=1)


def _mask_padded_vocab(model: torch.nn.Module, *, vocab_size: int, padded: int, where: ParallelRank) -> None:
    """Give the padding columns of the logits a huge negative value so that softmax and
    cross entropy over the padded vocab equal those over the real vocab."""
    if padded == vocab_size:
        return
    per_rank = padded // where.tp_size

    def hook(_module: torch.nn.Module, _inputs: Any, output: tuple[Tensor, Any]) -> tuple[Tensor, Any]:
        logits, bias = output
        # Gathered logits span the padded vocab; local ones this rank's shard of it.
        first = 0 if logits.shape[-1] == padded else where.tp_rank * per_rank
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
    dtype: torch.dtype = torch.float32,
    num_layers: int | None = None,
    sequence_parallel: bool = False,
    load_weights: bool = True,
    experts: str = "grouped",
    **config_overrides: Any,
) -> tuple[torch.nn.Module, ModelInfo]:
    """Build this rank's `GPTModel` for the HF checkpoint in `hf_dir` and load its weights.

    `num_layers` keeps only the first layers (quick checks); `experts` picks the routed-expert
    implementation (`grouped`, or the `sequential` loop reference; see `block_spec`); `config_overrides` go to
    megatron's `TransformerConfig` (e.g. `recompute_granularity`). TP and EP degrees come
    from megatron's parallel state. Logits over the padded vocab are masked so only the
    first `info.vocab_size` columns matter."""
    from megatron.core.models.gpt import GPTModel

    from megalora.train.model.attention import SDPACoreAttention
    from megalora.train.norm import RMSNorm

    _ensure_parallel_state()
    where = ParallelRank.from_megatron()
    spec = read_hf_config(hf_dir)
    if num_layers is not None:
        spec = spec.truncated(num_layers)
    sequence_parallel = sequence_parallel and where.tp_size > 1
    config = to_transformer_config(
        spec, dtype=dtype, tp=where.tp_size, ep=where.ep_size, sequence_parallel=sequence_parallel, **config_overrides
    )
    padded = padded_vocab_size(spec.vocab_size, tp=where.tp_size)
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
        report = load_hf_weights(model, hf_dir, spec, where=where, padded_vocab_size=padded)
    _mask_padded_vocab(model, vocab_size=spec.vocab_size, padded=padded, where=where)
    info = ModelInfo(
        spec=spec,
        config=config,
        where=where,
        vocab_size=spec.vocab_size,
        padded_vocab_size=padded,
        sequence_parallel=sequence_parallel,
        load=report,
    )
    return model, info
