"""Gated DeltaNet torch kernels (megalora.train.ops) against independent oracles.

Oracles: our token-by-token reference (itself checked against transformers' Qwen3-Next
reference and megatron-core's torch chunked rule), running packed segments one by one,
and ``F.conv1d`` with explicit left padding for the causal conv.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from megalora.train.ops import (
    causal_conv1d,
    chunk_gated_delta_rule,
    gated_delta_rule,
    l2norm,
    recurrent_gated_delta_rule,
    torch_causal_conv1d,
)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def make_inputs(
    batch: int, seq_len: int, *, num_k_heads: int = 2, num_v_heads: int = 4, k_dim: int = 8, v_dim: int = 6,
    dtype: torch.dtype = torch.float32, seed: int = 0,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(batch, seq_len, num_k_heads, k_dim, generator=gen).to(dtype),
        "k": torch.randn(batch, seq_len, num_k_heads, k_dim, generator=gen).to(dtype),
        "v": torch.randn(batch, seq_len, num_v_heads, v_dim, generator=gen).to(dtype),
        # the model's g = -exp(A_log) * softplus(a + dt_bias) is <= 0
        "g": (-F.softplus(torch.randn(batch, seq_len, num_v_heads, generator=gen)) * 0.5).to(dtype),
        "beta": torch.rand(batch, seq_len, num_v_heads, generator=gen).to(dtype),
    }


def make_state(num: int, *, num_v_heads: int = 4, k_dim: int = 8, v_dim: int = 6, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, num_v_heads, k_dim, v_dim, generator=gen)


def run_with_grads(fn, inputs: dict[str, torch.Tensor], state: torch.Tensor, **kwargs):
    """Run fn, backprop a random projection of output and final state; return (out, state, grads)."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items()}
    leaves["initial_state"] = state.clone().requires_grad_(True)
    out, final = fn(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(7)
    loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    loss.backward()
    return out.detach(), final.detach(), {name: t.grad for name, t in leaves.items()}


# ---- chunked vs recurrent -------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 37, 64, 130])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunk_matches_recurrent_outputs_states_and_grads(seq_len: int, dtype: torch.dtype, tol: float) -> None:
    inputs = make_inputs(2, seq_len, dtype=dtype)
    state = make_state(2).to(dtype)
    ref_out, ref_state, ref_grads = run_with_grads(recurrent_gated_delta_rule, inputs, state, use_qk_l2norm=True)
    out, final, grads = run_with_grads(chunk_gated_delta_rule, inputs, state, use_qk_l2norm=True)
    assert out.shape == (2, seq_len, 4, 6) and out.dtype == dtype
    assert final.shape == (2, 4, 8, 6)
    assert rel_err(out, ref_out) < tol
    assert rel_err(final, ref_state) < tol
    for name in ("q", "k", "v", "g", "beta", "initial_state"):
        assert rel_err(grads[name], ref_grads[name]) < tol, name


@pytest.mark.parametrize("chunk_size", [1, 16, 50])
def test_chunk_size_does_not_change_result(chunk_size: int) -> None:
    inputs = make_inputs(1, 70, num_k_heads=2, num_v_heads=2, dtype=torch.float64, seed=3)
    ref, ref_state = recurrent_gated_delta_rule(**inputs, output_final_state=True, scale=0.3)
    out, state = chunk_gated_delta_rule(**inputs, output_final_state=True, scale=0.3, chunk_size=chunk_size)
    assert rel_err(out, ref) < 1e-10 and rel_err(state, ref_state) < 1e-10


def test_bf16_inputs_accumulate_in_fp32() -> None:
    inputs = make_inputs(1, 100, dtype=torch.bfloat16, seed=4)
    out, state = chunk_gated_delta_rule(**inputs, output_final_state=True, use_qk_l2norm=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    # Oracle: the fp64 reference on the very same (bf16-rounded) numbers; only the final
    # rounding of the output to bf16 (relative 2^-8) may separate them.
    ref, ref_state = recurrent_gated_delta_rule(
        **{n: t.double() for n, t in inputs.items()}, output_final_state=True, use_qk_l2norm=True
    )
    assert rel_err(out, ref) < 8e-3
    assert rel_err(state, ref_state) < 1e-5


def test_no_final_state_unless_asked() -> None:
    inputs = make_inputs(1, 5)
    for fn in (recurrent_gated_delta_rule, chunk_gated_delta_rule, gated_delta_rule):
        out, state = fn(**inputs)
        assert state is None and out.shape == (1, 5, 4, 6)


# ---- packed sequences (cu_seqlens) ---------------------------------------------------------

SEGMENTS = [5, 70, 0, 1, 37]


def pack(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p[name] for p in parts], dim=1) for name in parts[0]}


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_packed_equals_each_segment_alone(fn) -> None:
    parts = [make_inputs(1, n, dtype=torch.float64, seed=10 + i) for i, n in enumerate(SEGMENTS)]
    states = make_state(len(SEGMENTS)).double()
    cu_seqlens = torch.tensor([0] + SEGMENTS).cumsum(0)
    out, final = fn(
        **pack(parts), cu_seqlens=cu_seqlens, initial_state=states, output_final_state=True, use_qk_l2norm=True
    )
    start = 0
    for i, (n, part) in enumerate(zip(SEGMENTS, parts)):
        # the oracle is always the plain reference, run on the segment as its own batch
        ref, ref_state = recurrent_gated_delta_rule(
            **part, initial_state=states[i : i + 1], output_final_state=True, use_qk_l2norm=True
        )
        if n:
            assert rel_err(out[:, start : start + n], ref) < 1e-10
        assert rel_err(final[i : i + 1], ref_state) < 1e-10  # an empty segment passes its state through
        start += n


def test_packed_segments_do_not_leak() -> None:
    parts = [make_inputs(1, n, seed=20 + i) for i, n in enumerate(SEGMENTS)]
    cu_seqlens = torch.tensor([0] + SEGMENTS).cumsum(0)
    packed = pack(parts)
    out = chunk_gated_delta_rule(**packed, cu_seqlens=cu_seqlens)[0]
    changed = dict(packed)
    bounds = cu_seqlens.tolist()
    for name in changed:  # rewrite everything of segment 1 (tokens 5:75)
        changed[name] = changed[name].clone()
        changed[name][:, bounds[1] : bounds[2]] = make_inputs(1, SEGMENTS[1], seed=99)[name]
    out_changed = chunk_gated_delta_rule(**changed, cu_seqlens=cu_seqlens)[0]
    inside = torch.zeros(out.shape[1], dtype=torch.bool)
    inside[bounds[1] : bounds[2]] = True
    assert torch.equal(out[:, ~inside], out_changed[:, ~inside])
    assert not torch.allclose(out[:, inside], out_changed[:, inside])
    # and no gradient path from segment 1 into the last segment's outputs
    leaves = {n: t.clone().requires_grad_(True) for n, t in packed.items()}
    chunk_gated_delta_rule(**leaves, cu_seqlens=cu_seqlens)[0][:, bounds[4] :].sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad[:, bounds[1] : bounds[2]].abs().max() == 0, name
        assert leaf.grad[:, bounds[4] :].abs().max() > 0, name


# ---- independent oracles: transformers and megatron-core ------------------------------------


def test_recurrent_matches_transformers_reference() -> None:
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    inputs = make_inputs(2, 45, num_k_heads=2, num_v_heads=4, seed=5)
    state = make_state(2)
    # Same layout on both sides: [B, T, H, D] in, [B, H, K, V] state; transformers repeats
    # key heads with repeat_interleave, l2-normalises in fp32 and scales q by K^-0.5.
    positional = [inputs[n] for n in ("q", "k", "v")]  # named query/key/value there
    ref, ref_state = qwen3_next.torch_recurrent_gated_delta_rule(
        *positional, g=inputs["g"], beta=inputs["beta"], initial_state=state, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    out, final = recurrent_gated_delta_rule(
        **inputs, initial_state=state, output_final_state=True, use_qk_l2norm=True
    )
    assert rel_err(out, ref) < 1e-5 and rel_err(final, ref_state) < 1e-5
    ref_chunk, _ = qwen3_next.torch_chunk_gated_delta_rule(
        *positional, g=inputs["g"], beta=inputs["beta"], use_qk_l2norm_in_kernel=True
    )
    assert rel_err(chunk_gated_delta_rule(**inputs, use_qk_l2norm=True)[0], ref_chunk) < 1e-5


def test_chunk_matches_megatron_torch_rule() -> None:
    gdn = pytest.importorskip("megatron.core.ssm.gated_delta_net")
    inputs = make_inputs(2, 90, num_k_heads=2, num_v_heads=4, seed=6)
    # megatron's GatedDeltaNet l2-normalises and repeats q/k to the value heads itself, then
    # calls the kernel with equal head counts and the l2norm flag off; mirror that.
    q, k = (l2norm(inputs[n]).repeat_interleave(2, dim=2) for n in ("q", "k"))
    ref, _ = gdn.torch_chunk_gated_delta_rule(q, k, inputs["v"], g=inputs["g"], beta=inputs["beta"])
    out, _ = chunk_gated_delta_rule(**inputs, use_qk_l2norm=True)
    assert rel_err(out, ref) < 1e-5


def test_l2norm_matches_transformers() -> None:
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    x = torch.randn(3, 5, 16, dtype=torch.float64) * torch.tensor([1e-4, 1.0, 30.0], dtype=torch.float64)[:, None, None]
    assert rel_err(l2norm(x), qwen3_next.l2norm(x)) < 1e-12
    assert l2norm(x.bfloat16()).dtype == torch.bfloat16


# ---- dispatch and argument checks -----------------------------------------------------------


def test_dispatchers_use_torch_on_cpu_without_importing_gpu_libraries() -> None:
    inputs = make_inputs(1, 40, dtype=torch.bfloat16, seed=8)
    out, _ = gated_delta_rule(**inputs, use_qk_l2norm=True)
    expected, _ = chunk_gated_delta_rule(**inputs, use_qk_l2norm=True)
    assert torch.equal(out, expected)
    x = torch.randn(1, 6, 20)
    w = torch.randn(6, 4)
    assert torch.equal(causal_conv1d(x, w), torch_causal_conv1d(x, w))
    assert "fla" not in sys.modules and "causal_conv1d" not in sys.modules


def test_bad_arguments_raise_value_error() -> None:
    inputs = make_inputs(2, 10)
    with pytest.raises(ValueError, match="batch size 1"):
        chunk_gated_delta_rule(**inputs, cu_seqlens=torch.tensor([0, 10]))
    one = make_inputs(1, 10)
    with pytest.raises(ValueError, match="end at the sequence length"):
        chunk_gated_delta_rule(**one, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule(**one, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=make_state(1))
    with pytest.raises(ValueError, match="multiple of key heads"):
        chunk_gated_delta_rule(**make_inputs(1, 4, num_k_heads=3, num_v_heads=4))
    with pytest.raises(ValueError, match="activation"):
        torch_causal_conv1d(torch.randn(1, 4, 5), torch.randn(4, 3), activation="gelu")


# ---- causal conv ----------------------------------------------------------------------------


def conv_oracle(x: torch.Tensor, weight: torch.Tensor, bias, context: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """F.conv1d over explicitly left-padded input (zeros, or the given context)."""
    width = weight.shape[-1]
    padded = F.pad(x, (width - 1, 0)) if context is None else torch.cat([context, x], dim=2)
    out = F.conv1d(padded, weight.reshape(weight.shape[0], 1, width), bias, groups=x.shape[1])
    return F.silu(out) if silu else out


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv_matches_padded_conv1d(width: int, activation: str | None) -> None:
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(2, 6, 11, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 1, width, generator=gen, dtype=torch.float64)  # nn.Conv1d's depthwise layout
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    silu = activation is not None
    out = torch_causal_conv1d(x, weight, bias, activation=activation)
    assert rel_err(out, conv_oracle(x, weight, bias, None, silu)) < 1e-12
    context = torch.randn(2, 6, width - 1, generator=gen, dtype=torch.float64)
    out = causal_conv1d(x, weight.squeeze(1), None, activation=activation, initial_state=context)
    assert rel_err(out, conv_oracle(x, weight, None, context, silu)) < 1e-12
    # the module transformers and megatron run: nn.Conv1d(padding=W-1) sliced to the first T steps
    module = torch.nn.Conv1d(6, 6, width, groups=6, padding=width - 1, bias=False).double()
    with torch.no_grad():
        module.weight.copy_(weight)
    sliced = module(x)[..., : x.shape[2]]
    assert rel_err(torch_causal_conv1d(x, module.weight, activation=None), sliced) < 1e-12


def test_causal_conv_packed_respects_boundaries() -> None:
    gen = torch.Generator().manual_seed(9)
    lengths = [3, 0, 8, 1, 5]
    x = torch.randn(1, 6, sum(lengths), generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    contexts = torch.randn(len(lengths), 6, 3, generator=gen, dtype=torch.float64)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
    for ctx in (None, contexts):
        out = causal_conv1d(x, weight, bias, cu_seqlens=cu_seqlens, initial_state=ctx)
        assert out.shape == x.shape
        start = 0
        for i, n in enumerate(lengths):
            if n == 0:  # an empty segment has no outputs (and F.conv1d rejects it)
                continue
            seg_ctx = None if ctx is None else ctx[i : i + 1]
            ref = conv_oracle(x[:, :, start : start + n], weight, bias, seg_ctx, True)
            assert torch.allclose(out[:, :, start : start + n], ref, rtol=1e-12, atol=1e-12)
            start += n
    # gradients: only the segment's own tokens feed its outputs
    leaf = x.clone().requires_grad_(True)
    causal_conv1d(leaf, weight, bias, cu_seqlens=cu_seqlens)[:, :, 11:12].sum().backward()  # segment [11, 12)
    touched = leaf.grad.abs().sum(dim=(0, 1)) > 0
    assert touched.nonzero().flatten().tolist() == [11]
