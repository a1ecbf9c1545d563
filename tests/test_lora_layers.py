"""LoRA wrappers around megatron's column/row-parallel linears, one process: values and grads."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.parallel import groups
from megalora.train.lora.layers import LoraLinear
from megalora.train.lora.options import LoraOptions


@pytest.fixture(autouse=True, scope="module")
def _one_process_groups():
    groups.initialize(tp=1)
    yield
    groups.destroy()


def _config() -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                             use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)


def _build(kind: str, *, bias: bool = True, skip_bias_add: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    if kind == "column":
        return ColumnParallelLinear(12, 10, config=_config(), init_method=init, bias=bias,
                                    skip_bias_add=skip_bias_add)
    return RowParallelLinear(12, 10, config=_config(), init_method=init, bias=bias,
                             input_is_parallel=True, skip_bias_add=skip_bias_add)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_hand_reference(kind: str, use_rslora: bool) -> None:
    base = _build(kind)
    with torch.no_grad():
        base.bias.normal_()
    opts = LoraOptions(rank=4, alpha=6.0, use_rslora=use_rslora)
    layer = LoraLinear(base, options=opts, init_seed=3)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    # B starts at zero, so the wrapped layer starts equal to the base.
    x = torch.randn(5, 2, 12)
    assert torch.equal(layer(x)[0], base(x)[0])
    with torch.no_grad():
        layer.lora_B.normal_()
    x.requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    scale = 6.0 / (math.sqrt(4) if use_rslora else 4)
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = x_ref @ base.weight.T + base.bias + scale * (x_ref @ a.T) @ b.T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None


def test_init_is_peft_kaiming_and_seeded() -> None:
    base = _build("column")
    one = LoraLinear(base, options=LoraOptions(rank=4), init_seed=11)
    two = LoraLinear(_build("column"), options=LoraOptions(rank=4), init_seed=11)
    ref = torch.empty(4, 12)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=torch.Generator().manual_seed(11))
    assert torch.equal(one.lora_A, ref) and torch.equal(two.lora_A, ref)
    assert one.lora_A.abs().max() <= 1 / math.sqrt(12)
    assert torch.count_nonzero(one.lora_B) == 0


def test_skip_bias_add_contract_and_dropout() -> None:
    base = _build("column", skip_bias_add=True)
    layer = LoraLinear(base, options=LoraOptions(rank=2, alpha=2.0, dropout=0.5), init_seed=0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 1, 12)
    torch.manual_seed(7)
    out, bias = layer(x)
    assert bias is base.bias
    torch.manual_seed(7)
    dropped = F.dropout(x, p=0.5, training=True)
    assert not torch.equal(dropped, x)
    ref = x @ base.weight.T + (dropped @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    layer.eval()
    ref_eval = x @ base.weight.T + (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x)[0], ref_eval, rtol=1e-5, atol=1e-5)


def test_bf16_lora_on_fp32_base_and_attribute_delegation() -> None:
    base = _build("row")
    layer = LoraLinear(base, options=LoraOptions(rank=2, dtype=torch.bfloat16), init_seed=0)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.weight is base.weight
    assert layer.lora_A.tensor_model_parallel and layer.lora_A.partition_dim == 1
    assert not hasattr(layer.lora_B, "lora_tp_allreduce")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 1, 12)
    out = layer(x)[0]
    assert out.dtype == torch.float32
    delta = ((x.bfloat16() @ layer.lora_A.T) @ layer.lora_B.T).float() * layer.scaling
    torch.testing.assert_close(out, x @ base.weight.T + base.bias + delta, rtol=1e-2, atol=1e-2)


def test_rejects_other_modules() -> None:
    with pytest.raises(ValueError, match="ColumnParallelLinear or RowParallelLinear"):
        LoraLinear(torch.nn.Linear(2, 2), options=LoraOptions(), init_seed=0)
    with pytest.raises(ValueError, match="lora_rank"):
        LoraOptions(rank=0)
