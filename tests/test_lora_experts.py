"""Routed-expert LoRA: grouped path == loop reference == hand-written per-expert math."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.parallel import groups
from megalora.train.lora.experts import LoraExperts, expert_lora_delta_grouped, expert_lora_delta_loop
from megalora.train.ops.grouped_gemm import grouped_mm, grouped_mm_cpu, grouped_mm_cuda, grouped_mm_padded
from megalora.train.lora.options import LoraOptions

H, FFN, E = 16, 8, 6
TOKENS = [3, 0, 5, 1, 0, 7]  # experts 1 and 4 receive nothing


@pytest.fixture(autouse=True, scope="module")
def _one_process_groups():
    groups.initialize(tp=1)
    yield
    groups.destroy()


def _experts(impl: str, dtype: torch.dtype = torch.float32) -> LoraExperts:
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, num_moe_experts=E,
                            ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN, gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
                            use_cpu_initialization=True, hidden_dropout=0.0)
    torch.manual_seed(0)
    base = SequentialMLP(E, cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                         pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    lora = LoraExperts(base, options=LoraOptions(rank=3, alpha=6.0, dtype=dtype), init_seed=5,
                       first_global_expert=0, impl=impl)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero B: otherwise the adapters contribute nothing to check
        lora.lora_fc1_B.copy_(torch.randn(lora.lora_fc1_B.shape, generator=gen))
        lora.lora_fc2_B.copy_(torch.randn(lora.lora_fc2_B.shape, generator=gen))
    return lora


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    n = sum(TOKENS)
    return torch.randn(n, H, generator=gen), torch.tensor(TOKENS), torch.rand(n, generator=gen)


def _run(lora: LoraExperts):
    x, tpe, probs = _inputs()
    x.requires_grad_(True)
    out, bias = lora(x, tpe, probs)
    assert bias is None
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}
    return out.detach(), x.grad.clone(), grads


def _hand_reference(lora: LoraExperts):
    """Per expert, with full weights: fc1 + delta -> swiglu * prob -> fc2 + delta."""
    x, tpe, probs = _inputs()
    s = lora.scaling
    outs = []
    for e, (xe, pe) in enumerate(zip(torch.split(x, TOKENS), torch.split(probs, TOKENS))):
        mlp = lora.base_layer.local_experts[e]
        a1, b1 = lora.lora_fc1_A[e].float(), lora.lora_fc1_B[e].float()
        a2, b2 = lora.lora_fc2_A[e].float(), lora.lora_fc2_B[e].float()
        h = xe @ mlp.linear_fc1.weight.T + s * (xe @ a1.T) @ b1.T
        act = F.silu(h[:, :FFN]) * h[:, FFN:] * pe[:, None]
        outs.append(act @ mlp.linear_fc2.weight.T + s * (act @ a2.T) @ b2.T)
    return torch.cat(outs)


def test_grouped_equals_loop_forward_and_backward_with_empty_experts() -> None:
    grouped, loop = _experts("grouped"), _experts("loop")
    assert torch.equal(grouped.lora_fc1_A, loop.lora_fc1_A)
    out_g, dx_g, grads_g = _run(grouped)
    out_l, dx_l, grads_l = _run(loop)
    torch.testing.assert_close(out_g, out_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_g, dx_l, rtol=1e-5, atol=1e-5)
    assert set(grads_g) == {"lora_fc1_A", "lora_fc1_B", "lora_fc2_A", "lora_fc2_B"}
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_l[name], rtol=1e-5, atol=1e-5)
        # experts without tokens get exactly zero gradient, the others a real one
        for e, n in enumerate(TOKENS):
            assert (grads_g[name][e].abs().sum() > 0) == (n > 0), (name, e)
    with torch.no_grad():
        torch.testing.assert_close(out_g, _hand_reference(grouped), rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in grouped.base_layer.parameters())


def test_bf16_adapters_on_fp32_experts() -> None:
    lora = _experts("grouped", torch.bfloat16)
    assert lora.lora_fc1_A.dtype == torch.bfloat16
    out, dx, grads = _run(lora)
    assert out.dtype == torch.float32 and grads["lora_fc2_B"].dtype == torch.bfloat16
    with torch.no_grad():
        want = _hand_reference(lora)
    assert ((out - want).norm() / want.norm()).item() < 2e-2


def test_all_tokens_to_no_local_expert() -> None:
    lora = _experts("grouped")
    x = torch.zeros(0, H, requires_grad=True)
    out, _ = lora(x, torch.zeros(E, dtype=torch.long), torch.zeros(0))
    assert out.shape == (0, H)
    out.sum().backward()
    assert lora.lora_fc1_A.grad is not None and torch.count_nonzero(lora.lora_fc1_A.grad) == 0


def test_grouped_lora_delta_matches_the_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    tpe = torch.tensor([4, 0, 2, 9])
    x = torch.randn(15, 5, generator=gen)
    a = torch.randn(4, 2, 5, generator=gen)
    b = torch.randn(4, 3, 2, generator=gen)
    torch.testing.assert_close(expert_lora_delta_grouped(x, a, b, tpe),
                               expert_lora_delta_loop(x, a, b, tpe.tolist()))


@pytest.mark.parametrize("impl", [grouped_mm, grouped_mm_cpu, grouped_mm_padded])
def test_each_cpu_grouped_mm_matches_per_expert_matmul_values_and_gradients(impl) -> None:
    """The dispatcher, CPU `torch._grouped_mm` with our backward (fp32/bf16) and the padded `bmm`
    (any dtype): unaligned K=5, N=3, empty experts, gradients for x and w."""
    gen = torch.Generator().manual_seed(2)
    tpe = torch.tensor([0, 6, 1, 0, 9])
    x = torch.randn(16, 5, generator=gen, requires_grad=True)
    w = torch.randn(5, 5, 3, generator=gen, requires_grad=True)
    y = impl(x, w, tpe)
    ref = torch.cat([xe @ w[e] for e, xe in enumerate(torch.split(x, tpe.tolist()))])
    torch.testing.assert_close(y, ref)
    g = torch.randn(y.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(torch.autograd.grad(impl(x, w, tpe), w, g)[0][[0, 3]]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_kernel_path_pads_unaligned_dims(dtype: torch.dtype) -> None:
    """The `torch._grouped_mm` path (CUDA's) pads K=5, N=3 to 16 bytes; its forward runs on CPU too."""
    gen = torch.Generator().manual_seed(1)
    tpe = torch.tensor([4, 0, 2, 9, 0])
    x = torch.randn(15, 5, generator=gen).to(dtype)
    w = torch.randn(5, 5, 3, generator=gen).to(dtype)
    ref = torch.cat([xe.float() @ w[e].float() for e, xe in enumerate(torch.split(x, tpe.tolist()))])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(grouped_mm_cuda(x, w, tpe).float(), ref, rtol=tol, atol=tol)


def test_rejects_unknown_impl() -> None:
    with pytest.raises(ValueError, match="impl"):
        _experts("fast")
