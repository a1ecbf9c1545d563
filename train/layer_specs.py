"""megatron-core layer specs built from megatron's local (non-Transformer-Engine) modules.

The only substitution is the norm: ``megalora.train.norm.RMSNorm`` stands in for megatron's
local norm (which refuses sequence parallelism), as spec entries for the input, pre-MLP,
final and (optionally) q/k norms.
"""

from __future__ import annotations

import importlib.util

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megalora.train.norm import RMSNorm


def local_gpt_spec(
    config: TransformerConfig,
    *,
    num_experts: int | None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
) -> TransformerBlockSubmodules:
    """Block spec for ``GPTModel(transformer_layer_spec=...)`` with our RMSNorm everywhere.

    ``num_experts=None`` (or 0) gives a dense MLP; otherwise megatron's MoE layer with
    ``SequentialMLP`` experts, or its ``GroupedMLP`` with ``moe_grouped_gemm=True``
    (which needs the ``grouped_gemm`` package, not shipped and not exercised by any test here;
    the model megalora trains uses its own grouped experts, see ``train.model.spec``). A block
    spec, not a layer spec, so that the final norm is ours too.
    """
    if config.normalization != "RMSNorm":
        raise ValueError(
            f"normalization={config.normalization!r}: the local spec supports only 'RMSNorm'"
        )
    if moe_grouped_gemm and importlib.util.find_spec("grouped_gemm") is None:
        raise ValueError(
            "moe_grouped_gemm=true with the local spec needs the 'grouped_gemm' package"
        )
    layer = get_gpt_layer_local_spec(
        num_experts=num_experts or None,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization="RMSNorm",
    )
    sub = layer.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.q_layernorm = RMSNorm if qk_layernorm else IdentityOp
    attn.k_layernorm = RMSNorm if qk_layernorm else IdentityOp
    return TransformerBlockSubmodules(
        layer_specs=[layer] * config.num_layers, layer_norm=RMSNorm
    )
