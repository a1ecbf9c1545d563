"""Tiny random HF checkpoints made by transformers itself: the small models the tests, the
GPU check and quick trials run on (never downloaded).

Every checkpoint is created with seeded random weights and written with `save_pretrained`,
so the files on disk have exactly the layout transformers writes for real models (one
tensor per routed expert, `model.safetensors` or a sharded set with
`model.safetensors.index.json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

# Each shape exercises different config fields that change the math: head_dim that
# differs from hidden/heads, GQA ratios, partial rotary, layer patterns, expert counts,
# norm_topk_prob both ways, dense layers inside MoE models, tied embeddings, and vocab
# sizes that no tensor-parallel degree divides.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_next_a": {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "vocab_size": 251,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        "full_attention_interval": 2,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
    },
    "qwen3_next_b": {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "vocab_size": 317,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
        "full_attention_interval": 3,
        "linear_conv_kernel_dim": 3,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 12,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 2,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 16,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "tie_word_embeddings": True,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 301,
        "hidden_size": 64,
        "intermediate_size": 72,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "tie_word_embeddings": False,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": True,
    },
}


def make_tiny_checkpoint(
    name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Create and save a tiny random HF checkpoint for one of `TINY_CONFIGS`.

    Weights are transformers' own init plus seeded noise on every tensor, so norms,
    router, A_log and dt_bias are all non-trivial and a wrong mapping shows in the
    logits. `max_shard_size` (e.g. "20KB") writes a multi-file checkpoint with an index.
    """
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny checkpoint {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    fields = dict(TINY_CONFIGS[name])
    fields.update(overrides or {})
    model_type = fields.pop("model_type")
    fields.pop("architectures")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    out = Path(out_dir)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    return out
