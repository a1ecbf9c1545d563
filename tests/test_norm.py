"""Our RMSNorm against the transformers Qwen3 / Qwen3-Next norms; the built model uses it everywhere."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

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


def test_built_model_uses_our_norm_everywhere(tmp_path) -> None:
    """Every norm of a built Qwen3-Next (input, pre-MLP, q/k, final) is ours (megatron's refuses SP)."""
    from megalora.parallel import groups
    from megalora.train.model.build import build_model
    from megalora.train.model.tiny import make_tiny_checkpoint

    groups.initialize(tp=1)
    try:
        model, _ = build_model(make_tiny_checkpoint("qwen3_next_a", tmp_path / "hf"), load_weights=False)
    finally:
        groups.destroy()
    # (megatron's placeholder for a cross-attention norm is an identity: decoders have none)
    norms = {name: module for name, module in model.named_modules()
             if name.endswith("layernorm") and not isinstance(module, IdentityOp)}
    kinds = {name.rpartition(".")[2] for name in norms}
    assert kinds == {"input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm", "final_layernorm"}
    assert all(isinstance(module, RMSNorm) for module in norms.values()), \
        {name: type(module).__name__ for name, module in norms.items() if not isinstance(module, RMSNorm)}
