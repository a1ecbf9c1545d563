"""Our RMSNorm against the transformers Qwen3 / Qwen3-Next norms; the local spec uses it."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

from megalora.train.layer_specs import local_gpt_spec
from megalora.train.norm import RMSNorm

H = 16


def _config(**kwargs: object) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=2,
                             normalization="RMSNorm", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_centered", [False, True], ids=["qwen3", "qwen3_next"])
def test_matches_transformers_norms(zero_centered: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(H, generator=gen).to(dtype)
    x = (torch.randn(3, 5, H, generator=gen) * 4).to(dtype)
    ours = RMSNorm(_config(layernorm_zero_centered_gamma=zero_centered, params_dtype=dtype),
                   H, eps=1e-6)
    oracle = Qwen3NextRMSNorm(H, eps=1e-6) if zero_centered else Qwen3RMSNorm(H, eps=1e-6)
    oracle = oracle.to(dtype)
    # the initial weights are the identity in both forms
    torch.testing.assert_close(ours.weight.detach(), oracle.weight.detach())
    with torch.no_grad():
        ours.weight.copy_(weight)
        oracle.weight.copy_(weight)
    torch.testing.assert_close(ours(x), oracle(x), rtol=0, atol=0)


def test_weight_is_marked_for_the_sequence_parallel_grad_reduction() -> None:
    assert RMSNorm(_config(), H).weight.sequence_parallel is False
    sp = _config(sequence_parallel=True, tensor_model_parallel_size=2)
    assert RMSNorm(sp, H).weight.sequence_parallel is True


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_local_spec_puts_our_norm_everywhere(qk_layernorm: bool) -> None:
    spec = local_gpt_spec(_config(), num_experts=4, qk_layernorm=qk_layernorm)
    assert spec.layer_norm is RMSNorm
    assert len(spec.layer_specs) == 2
    layer = spec.layer_specs[0].submodules
    assert layer.input_layernorm is RMSNorm and layer.pre_mlp_layernorm is RMSNorm
    attn = layer.self_attention.submodules
    assert (attn.q_layernorm is RMSNorm) is qk_layernorm
    assert (attn.k_layernorm is RMSNorm) is qk_layernorm


def test_local_spec_rejects_other_norms() -> None:
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2)
    with pytest.raises(ValueError, match="normalization='LayerNorm'"):
        local_gpt_spec(config, num_experts=None)
