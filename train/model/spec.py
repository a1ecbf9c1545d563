"""Per-layer megatron module specs for the supported architectures (CPU-capable modules).

Each layer gets full attention (megatron `SelfAttention`, QK-norm, optional output gate)
or our `GatedDeltaNet`, and a dense SwiGLU MLP or a megatron `MoELayer` (our grouped-GEMM
experts or megatron's loop experts, optional gated shared expert), following `HFModelSpec.layer_types` / `moe_layers`.
Norms are a spec entry (`norm`), so one module serves every norm including QK-norm.
"""

from __future__ import annotations

from typing import Any

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megalora.train.model.experts import GroupedExperts
from megalora.train.model.gdn import GatedDeltaNet
from megalora.train.model.hf_config import FULL_ATTENTION, HFModelSpec


def attention_spec(*, norm: Any, core_attention: Any) -> ModuleSpec:
    """Causal self-attention with QK-norm (the output gate is a config switch)."""
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention,
            linear_proj=RowParallelLinear,
            q_layernorm=norm,
            k_layernorm=norm,
        ),
    )


def gdn_spec() -> ModuleSpec:
    """Our Gated DeltaNet with megatron's column/row parallel projections."""
    return ModuleSpec(
        module=GatedDeltaNet,
        submodules=GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
    )


EXPERT_IMPLS = ("grouped", "sequential")


def block_spec(spec: HFModelSpec, *, norm: Any, core_attention: Any, experts: str = "grouped") -> TransformerBlockSubmodules:
    """Decoder block spec: one `TransformerLayer` spec per layer of `spec`.

    `experts`: `grouped` (our `GroupedExperts`, grouped GEMMs over stacked frozen weights) or
    `sequential` (megatron's `SequentialMLP`, a loop over experts: the reference, and the one
    whose base expert weights can take gradients)."""
    if experts not in EXPERT_IMPLS:
        raise ValueError(f"experts={experts!r}: expected one of {', '.join(EXPERT_IMPLS)}")
    backend = LocalSpecProvider()
    dense = get_mlp_module_spec_for_backend(backend=backend, num_experts=None)
    moe = None
    if spec.is_moe:
        moe = get_moe_module_spec_for_backend(backend=backend, num_experts=spec.num_experts, moe_grouped_gemm=False)
        if experts == "grouped":
            moe.submodules.experts.module = GroupedExperts
    full = attention_spec(norm=norm, core_attention=core_attention)
    linear = gdn_spec() if spec.model_type == "qwen3_next" else None
    layers = []
    for layer in range(spec.num_layers):
        layers.append(
            ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm,
                    self_attention=full if spec.layer_types[layer] == FULL_ATTENTION else linear,
                    self_attn_bda=get_bias_dropout_add,
                    pre_mlp_layernorm=norm,
                    mlp=moe if spec.moe_layers[layer] else dense,
                    mlp_bda=get_bias_dropout_add,
                ),
            )
        )
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm)
