"""The CUDA paths of the two hot token mixers are chosen only on CUDA, receive what their
kernels expect, and leave the torch references as the CPU path.

No GPU here: CUDA is reported by patching each module's `_on_cuda`, and the GPU kernel is a
recording stand-in that computes with our torch reference from the arguments in the kernel's
own convention (heads, layouts, dtypes of `cu_seqlens`), so a wrong translation shows as a
wrong value. The real kernels against the references: `launch/gpu_check.sh` on a GPU.
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.train.model import attention
from megalora.train.model.attention import SDPACoreAttention, segment_causal_mask
from megalora.train.ops import chunk_gated_delta_rule, torch_causal_conv1d
from test_gdn_ops import make_inputs

# The package re-exports functions under the modules' names: import the modules themselves.
conv_mod = importlib.import_module("megalora.train.ops.causal_conv1d")
gdr_mod = importlib.import_module("megalora.train.ops.gated_delta_rule")
CU = torch.tensor([0, 5, 12, 20], dtype=torch.int32)


def _never(*_, **__):
    raise AssertionError("a GPU kernel was consulted off CUDA")


# ---- Gated DeltaNet -------------------------------------------------------------------------


def test_gdn_off_cuda_never_consults_the_kernel(monkeypatch):
    monkeypatch.setattr(gdr_mod, "_gpu_kernel", _never)
    inputs = make_inputs(1, 20, dtype=torch.bfloat16, seed=3)
    out, _ = gdr_mod.gated_delta_rule(**inputs, cu_seqlens=CU, use_qk_l2norm=True)
    expected, _ = chunk_gated_delta_rule(**inputs, cu_seqlens=CU, use_qk_l2norm=True)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("packed", [False, True])
def test_gdn_on_cuda_calls_the_kernel_library(monkeypatch, packed):
    calls = []

    def kernel(q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
               cu_seqlens):
        calls.append(dict(q=q.shape, v=v.shape, cu=cu_seqlens))
        return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm_in_kernel,
                                      cu_seqlens=cu_seqlens)

    monkeypatch.setattr(gdr_mod, "_on_cuda", lambda t: True)
    monkeypatch.setattr(gdr_mod, "_gpu_kernel", lambda: kernel)
    inputs = make_inputs(1, 20, dtype=torch.bfloat16, seed=4)
    cu = CU if packed else None
    out, state = gdr_mod.gated_delta_rule(**inputs, cu_seqlens=cu, use_qk_l2norm=True, output_final_state=True)
    (call,) = calls
    assert call["q"][2] == call["v"][2], "key heads repeated to the value heads"
    if packed:
        assert call["cu"].dtype == torch.long and call["cu"].tolist() == CU.tolist()
    else:
        assert call["cu"] is None
    expected, expected_state = chunk_gated_delta_rule(**inputs, cu_seqlens=cu, use_qk_l2norm=True,
                                                      output_final_state=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(state, expected_state)
    # fp32 on CUDA is outside the kernel's dtypes: the torch path runs.
    calls.clear()
    fp32 = make_inputs(1, 20, seed=4)
    gdr_mod.gated_delta_rule(**fp32, cu_seqlens=cu)
    assert not calls


# ---- causal conv ----------------------------------------------------------------------------


def _conv_inputs():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(1, 6, 20, generator=gen), torch.randn(6, 4, generator=gen)


def test_conv_off_cuda_is_torch(monkeypatch):
    monkeypatch.setattr(conv_mod, "_gpu_kernel", _never)
    monkeypatch.setattr(conv_mod, "_fla_kernel", _never)
    x, w = _conv_inputs()
    assert torch.equal(conv_mod.causal_conv1d(x, w, cu_seqlens=CU), torch_causal_conv1d(x, w, cu_seqlens=CU))


def test_conv_on_cuda_without_the_package_uses_the_kernel_librarys_conv(monkeypatch):
    calls = []

    def fla_conv(x, weight, bias, *, activation, cu_seqlens):
        calls.append(dict(shape=x.shape, cu=cu_seqlens))
        # The library's layout is channels-last [B, T, D]; it returns (out, final_state).
        out = torch_causal_conv1d(x.transpose(1, 2), weight, bias, activation=activation, cu_seqlens=cu_seqlens)
        return out.transpose(1, 2), None

    monkeypatch.setattr(conv_mod, "_on_cuda", lambda t: True)
    monkeypatch.setattr(conv_mod, "_gpu_kernel", lambda: None)
    monkeypatch.setattr(conv_mod, "_fla_kernel", lambda: fla_conv)
    x, w = _conv_inputs()
    out = conv_mod.causal_conv1d(x, w, cu_seqlens=CU)
    (call,) = calls
    assert call["shape"] == (1, 20, 6) and call["cu"].dtype == torch.long
    torch.testing.assert_close(out, torch_causal_conv1d(x, w, cu_seqlens=CU))
    # An initial state is not passed to the library's conv: the torch path takes it.
    state = torch.randn(1, 6, 3)
    conv_mod.causal_conv1d(x, w, initial_state=state)
    assert len(calls) == 1


# ---- packed attention -----------------------------------------------------------------------

HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def _core(dropout: float = 0.0) -> SDPACoreAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, attention_dropout=dropout,
                               hidden_dropout=0.0)
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


def _packed(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(6)
    total = int(CU[-1])
    q = torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(total, GROUPS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=CU, cu_seqlens_kv=CU, max_seqlen_q=8, max_seqlen_kv=8)
    return q, k, v, params


def _segment_reference(q, k, v, cu, scale):
    """Causal attention inside each segment, [t, np, hn] in, kv heads already matching q."""
    mask = segment_causal_mask(cu, total=q.shape[0], device=q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).double(), k.transpose(0, 1).double(), v.transpose(0, 1).double(), attn_mask=mask,
        scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def varlen_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """Stand-in with torch 2.12/2.13's signature."""
    assert window_size == (-1, 0) and enable_gqa and cu_seq_q.dtype == torch.int32
    assert max_q >= int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    varlen_213.calls += 1
    return _segment_reference(query, key, value, cu_seq_q, scale)


def varlen_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """Stand-in with torch 2.10's signature: no scale, no GQA."""
    assert is_causal and query.shape[1] == key.shape[1]
    varlen_210.calls += 1
    return _segment_reference(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)


@pytest.mark.parametrize("kernel", [varlen_213, varlen_210])
def test_packed_attention_on_cuda_takes_the_varlen_kernel(monkeypatch, kernel):
    kernel.calls = 0
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: kernel)
    q, k, v, params = _packed()
    out = _core().eval()(q, k, v, None, packed_seq_params=params)
    assert kernel.calls == 1
    monkeypatch.setattr(attention, "_on_cuda", lambda t: False)
    reference = _core().eval()(q, k, v, None, packed_seq_params=params)
    assert kernel.calls == 1, "off CUDA the reference runs"
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)


def test_varlen_is_chosen_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: varlen_213)
    q = torch.zeros(4, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    assert not attention.use_varlen(q, dropout=0.0), "CPU tensor"
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    assert attention.use_varlen(q, dropout=0.0)
    assert not attention.use_varlen(q.float(), dropout=0.0), "flash takes bf16/fp16 only"
    assert not attention.use_varlen(q, dropout=0.1), "varlen_attn has no dropout"
    assert not attention.use_varlen(torch.zeros(4, 2, 512, dtype=torch.bfloat16), dropout=0.0), "head dim > 256"
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: None)
    assert not attention.use_varlen(q, dropout=0.0), "a torch without varlen_attn"


def test_this_torchs_varlen_signature_is_one_the_adapter_knows():
    kernel = attention._varlen_kernel()
    assert kernel is not None, "torch >= 2.10 ships torch.nn.attention.varlen"
    params = inspect.signature(kernel).parameters
    assert "window_size" in params or "is_causal" in params
    assert list(params)[:7] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
