"""HF `config.json` -> a typed model description -> megatron-core `TransformerConfig`.

Only the fields that change the math are read; anything this toolkit cannot reproduce
exactly (sliding windows, rope scaling, biases in MoE layers, ...) is refused with a
`ValueError` that names the key, instead of being silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.config import ConfigError, ModelShape, check_parallel_sizes
from megalora.train.model.quant import BlockFP8, parse_quantization, refuse_modelopt_sidecar

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "qwen3": "Qwen3ForCausalLM (dense Qwen3)",
    "qwen3_moe": "Qwen3MoeForCausalLM (Qwen3-MoE, e.g. Qwen3-30B-A3B / Qwen3-Coder-30B-A3B)",
    "qwen3_next": "Qwen3NextForCausalLM (Qwen3-Next / Qwen3-Coder-Next)",
}

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class HFModelSpec:
    """Everything about an HF checkpoint's architecture that the megatron model needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    rotary_percent: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    zero_centered_norm: bool
    attention_output_gate: bool
    layer_types: tuple[str, ...]
    moe_layers: tuple[bool, ...]
    num_experts: int | None = None
    moe_topk: int = 0
    moe_ffn_hidden_size: int | None = None
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.0
    shared_expert_ffn_hidden_size: int | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int | None = None
    quantization: BlockFP8 | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        """True when at least one layer routes tokens to experts."""
        return any(self.moe_layers)

    def truncated(self, num_layers: int) -> "HFModelSpec":
        """The same model with only its first `num_layers` decoder layers."""
        if not 1 <= num_layers <= self.num_layers:
            raise ConfigError(f"num_layers must be in [1, {self.num_layers}], got {num_layers}")
        return replace(
            self,
            num_layers=num_layers,
            layer_types=self.layer_types[:num_layers],
            moe_layers=self.moe_layers[:num_layers],
        )

    def shape(self, source: str | None = None) -> ModelShape:
        """The sizes a parallel layout must divide (see `megalora.config.check_parallel_sizes`)."""
        return ModelShape(
            num_experts=int(self.num_experts or 0) if self.is_moe else 0,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            num_linear_key_heads=int(self.linear_num_key_heads or 0),
            num_linear_value_heads=int(self.linear_num_value_heads or 0),
            ffn_hidden_size=self.ffn_hidden_size,
            moe_ffn_hidden_size=int(self.moe_ffn_hidden_size or 0) if self.is_moe else 0,
            shared_expert_ffn_hidden_size=int(self.shared_expert_ffn_hidden_size or 0) if self.is_moe else 0,
            source=source or self.model_type,
        )


def _require(cfg: dict[str, Any], key: str, path: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"{path}: missing key {key!r}")
    return cfg[key]


def _rope(cfg: dict[str, Any], path: str, *, default_partial: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from either the new `rope_parameters` dict or the
    older top-level keys; any rope scaling is refused because megatron's plain RoPE would
    silently compute something else."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", rope_type))
    if rope_type != "default":
        raise ConfigError(f"{path}: rope type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{path}: missing key 'rope_theta' (or rope_parameters.rope_theta)")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_partial))
    return float(theta), float(partial)


def _num_experts(cfg: dict[str, Any]) -> int:
    # Hub configs say num_experts; transformers 5 writes its alias num_local_experts.
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def _moe_layers(cfg: dict[str, Any], num_layers: int, path: str) -> tuple[bool, ...]:
    num_experts = _num_experts(cfg)
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    bad = sorted(i for i in dense if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(f"{path}: mlp_only_layers holds layer indices outside [0, {num_layers}): {bad}")
    return tuple(num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def parse_hf_config(cfg: dict[str, Any], *, path: str = "config.json") -> HFModelSpec:
    """Turn a config.json dict into an `HFModelSpec`; `path` names the file in errors."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ConfigError(f"{path}: model_type {model_type!r} is not supported. Supported architectures: {supported}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported (only 'silu')")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{path}: use_sliding_window=true is not supported")
    if cfg.get("attention_bias"):
        # HF puts the bias on q/k/v *and* o_proj; megatron's qkv bias covers only q/k/v.
        raise ConfigError(f"{path}: attention_bias=true is not supported")
    num_layers = int(_require(cfg, "num_hidden_layers", path))
    hidden = int(_require(cfg, "hidden_size", path))
    heads = int(_require(cfg, "num_attention_heads", path))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    is_next = model_type == "qwen3_next"
    theta, partial = _rope(cfg, path, default_partial=0.25 if is_next else 1.0)

    if is_next:
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            interval = int(cfg.get("full_attention_interval", 4))
            layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(num_layers)]
        if len(layer_types) != num_layers or set(layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION}:
            raise ConfigError(
                f"{path}: layer_types must list {num_layers} entries of "
                f"{FULL_ATTENTION!r}/{LINEAR_ATTENTION!r}, got {layer_types}"
            )
    else:
        layer_types = [FULL_ATTENTION] * num_layers
    moe_layers = _moe_layers(cfg, num_layers, path) if model_type != "qwen3" else (False,) * num_layers
    fields: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(_require(cfg, "vocab_size", path)),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(_require(cfg, "intermediate_size", path)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rotary_percent=partial,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        zero_centered_norm=is_next,
        attention_output_gate=is_next,
        layer_types=tuple(layer_types),
        moe_layers=moe_layers,
        quantization=parse_quantization(cfg, path=path),
        raw=dict(cfg),
    )
    if any(moe_layers):
        fields.update(
            num_experts=_num_experts(cfg),
            moe_topk=int(_require(cfg, "num_experts_per_tok", path)),
            moe_ffn_hidden_size=int(_require(cfg, "moe_intermediate_size", path)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0)),
        )
        if is_next:
            shared = int(_require(cfg, "shared_expert_intermediate_size", path))
            fields["shared_expert_ffn_hidden_size"] = shared or None
    if is_next:
        for key in (
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
        ):
            fields[key] = int(_require(cfg, key, path))
        if fields["linear_num_value_heads"] % fields["linear_num_key_heads"]:
            raise ConfigError(f"{path}: linear_num_value_heads must be a multiple of linear_num_key_heads")
    return HFModelSpec(**fields)


def read_hf_config(model_dir: str | Path) -> HFModelSpec:
    """Read `<model_dir>/config.json` into an `HFModelSpec`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the model folder {model_dir}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from err
    refuse_modelopt_sidecar(model_dir, cfg)
    return parse_hf_config(cfg, path=str(path))


def padded_vocab_size(vocab_size: int, *, tp: int, divisible_by: int = 1) -> int:
    """Smallest size >= vocab_size that tensor parallelism can split evenly.

    Kept minimal (a multiple of `tp * divisible_by`): padded rows are zero and their
    logits are masked (see build.py), so padding costs only memory."""
    multiple = tp * divisible_by
    return -(-vocab_size // multiple) * multiple


def to_transformer_config(
    spec: HFModelSpec,
    *,
    dtype: torch.dtype = torch.float32,
    tp: int = 1,
    ep: int = 1,
    sequence_parallel: bool = False,
    **overrides: Any,
):
    """Megatron `TransformerConfig` that computes what transformers computes for `spec`.

    `overrides` are passed to `TransformerConfig` last (e.g. recompute settings,
    `moe_token_dispatcher_type`, `moe_aux_loss_coeff`)."""
    check_parallel_sizes(tp=tp, ep=ep, model=spec.shape())
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        layernorm_zero_centered_gamma=spec.zero_centered_norm,
        qk_layernorm=True,
        attention_output_gate=spec.attention_output_gate,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        # Qwen configs mean no dropout; megatron's defaults are 0.1.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,
        transformer_impl="local",
    )
    if spec.is_moe:
        kwargs.update(
            num_moe_experts=spec.num_experts,
            moe_router_topk=spec.moe_topk,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
            moe_layer_freq=[1 if m else 0 for m in spec.moe_layers],
            moe_router_score_function="softmax",
            # softmax over all experts then top-k (no renormalisation) when
            # norm_topk_prob is false; softmax over the top-k logits (== renormalised
            # top-k probabilities) when it is true.
            moe_router_pre_softmax=not spec.norm_topk_prob,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_router_dtype="fp32",
        )
        if spec.shared_expert_ffn_hidden_size:
            kwargs.update(
                moe_shared_expert_intermediate_size=spec.shared_expert_ffn_hidden_size,
                moe_shared_expert_gate=True,
                moe_shared_expert_overlap=False,
            )
    if spec.model_type == "qwen3_next":
        kwargs.update(
            linear_num_key_heads=spec.linear_num_key_heads,
            linear_num_value_heads=spec.linear_num_value_heads,
            linear_key_head_dim=spec.linear_key_head_dim,
            linear_value_head_dim=spec.linear_value_head_dim,
            linear_conv_kernel_dim=spec.linear_conv_kernel_dim,
        )
    if overrides.get("moe_aux_loss_coeff") and "moe_router_load_balancing_type" not in overrides:
        # A coefficient alone does nothing in megatron while balancing is "none".
        kwargs["moe_router_load_balancing_type"] = "aux_loss"
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)

