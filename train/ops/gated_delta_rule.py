"""Gated delta rule (the linear-attention core of Qwen3-Next's Gated DeltaNet) in plain torch.

Shapes (the layout megatron-core's ``GatedDeltaNet`` and transformers hand to the kernel,
batch-first, heads before the head dim):

    q, k           [B, T, Hk, K]   Hk key heads; Hv % Hk == 0
    v              [B, T, Hv, V]
    g, beta        [B, T, Hv]      g: log of the per-token state decay (<= 0); beta: write strength
    initial_state  [N, Hv, K, V]   N = B, or the number of segments when ``cu_seqlens`` is given
    cu_seqlens     [N + 1]         packed input (B == 1): segment n is tokens cu[n]:cu[n+1]
    output         [B, T, Hv, V]   in q's dtype; final state [N, Hv, K, V] in fp32 (fp64 for fp64)

When Hk < Hv each key head serves Hv/Hk consecutive value heads (``repeat_interleave`` on
the head dim), as in transformers and megatron-core. Per value head, with S of shape [K, V]:

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T
    o_t = S_t^T (scale * q_t)                     scale defaults to K ** -0.5

Three entry points share one signature: ``recurrent_gated_delta_rule`` (token by token, the
reference), ``chunk_gated_delta_rule`` (chunked, vectorised within chunks, the CPU path) and
``gated_delta_rule`` (the GPU kernel library when present and usable, else the chunked path).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from megalora.train.ops.l2norm import l2norm

_GPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 inputs accumulate in fp32; fp64 stays fp64 so tests can check tightly.
    return torch.promote_types(dtype, torch.float32)


def _segment_lengths(cu_seqlens: torch.Tensor, *, total: int) -> list[int]:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [N + 1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
        raise ValueError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {total}, got {bounds}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return lengths


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    scale: float | None,
    use_qk_l2norm: bool,
) -> tuple[list[torch.Tensor], torch.Tensor | None, list[int] | None]:
    """Validate shapes; return (q, k, v, g, beta) in the compute dtype with q/k repeated to the
    value heads, l2-normalised if asked and q scaled; the initial state; the segment lengths."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq_len, num_k_heads, k_dim = q.shape
    if v.dim() != 4 or v.shape[:2] != (batch, seq_len):
        raise ValueError(f"v must be [B, T, Hv, V] with B, T of q {tuple(q.shape)}, got {tuple(v.shape)}")
    num_v_heads, v_dim = v.shape[2], v.shape[3]
    if num_v_heads % num_k_heads != 0:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (batch, seq_len, num_v_heads):
            raise ValueError(f"{name} must be [B, T, Hv] = {(batch, seq_len, num_v_heads)}, got {tuple(t.shape)}")
    lengths = None
    num_states = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs packed input with batch size 1, got batch size {batch}")
        lengths = _segment_lengths(cu_seqlens, total=seq_len)
        num_states = len(lengths)
    dtype = _compute_dtype(q.dtype)
    if initial_state is not None:
        expected = (num_states, num_v_heads, k_dim, v_dim)
        if initial_state.shape != expected:
            raise ValueError(f"initial_state must be [N, Hv, K, V] = {expected}, got {tuple(initial_state.shape)}")
        initial_state = initial_state.to(dtype)

    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if num_v_heads != num_k_heads:
        group = num_v_heads // num_k_heads
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    q = q * (k_dim**-0.5 if scale is None else scale)
    return [q, k, v, g, beta], initial_state, lengths


def _recurrent_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token rule on [B, T, H, D] inputs; returns (out [B, T, H, V], state [B, H, K, V])."""
    outs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        delta = (v[:, t] - predicted) * beta[:, t, :, None]
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], delta)
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    out = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)
    return out, state


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slow, obvious reference: one state update per token (and per segment when packed).

    Returns ``(out [B, T, Hv, V] in q's dtype, final_state [N, Hv, K, V] or None)``.
    See the module docstring for shapes and the recurrence.
    """
    out_dtype = q.dtype
    (q, k, v, g, beta), initial_state, lengths = _prepare(
        q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens, scale=scale, use_qk_l2norm=use_qk_l2norm
    )
    batch, _, num_heads, k_dim = q.shape
    zero_state = v.new_zeros(1, num_heads, k_dim, v.shape[-1])
    if lengths is None:
        state = zero_state.expand(batch, -1, -1, -1) if initial_state is None else initial_state
        out, state = _recurrent_dense(q, k, v, g, beta, state)
    else:
        outs, states, start = [], [], 0
        for n, length in enumerate(lengths):
            span = slice(start, start + length)
            state = zero_state if initial_state is None else initial_state[n : n + 1]
            out_n, state = _recurrent_dense(q[:, span], k[:, span], v[:, span], g[:, span], beta[:, span], state)
            outs.append(out_n)
            states.append(state)
            start += length
        out, state = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    return out.to(out_dtype), (state if output_final_state else None)


def _chunk_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked rule on [B, H, T, D] inputs; returns (out [B, H, T, V], state [B, H, K, V]).

    Within a chunk with cumulative log decay G (G_t = g_1 + ... + g_t) and start state S0,
    the per-token corrections U (rows u_t = beta_t (v_t - S_{t-1}'^T k_t), S' the decayed
    state) solve the unit lower-triangular system (I + A) U = beta V - beta exp(G) K S0 with
    A[t, s] = beta_t exp(G_t - G_s) k_t . k_s for s < t. Then
        o_t = exp(G_t) S0^T q_t + sum_{s <= t} exp(G_t - G_s) (q_t . k_s) u_s
        S_C = exp(G_C) S0 + sum_s exp(G_C - G_s) k_s u_s^T.
    Only S0 crosses chunks, so one small loop over chunks remains; all else is batched.
    Right padding with zero k, v, beta and g does not change any state (u = 0, decay 1).
    """
    batch, num_heads, seq_len, k_dim = k.shape
    v_dim = v.shape[-1]
    pad = (-seq_len) % chunk_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    num_chunks = (seq_len + pad) // chunk_size
    q, k, v = (t.reshape(batch, num_heads, num_chunks, chunk_size, t.shape[-1]) for t in (q, k, v))
    g, beta = (t.reshape(batch, num_heads, num_chunks, chunk_size) for t in (g, beta))

    cum = g.cumsum(dim=-1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # exp of masked (positive) entries would overflow, so mask before exp, not after.
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    system = system + eye
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * cum.exp()[..., None]
    k_decayed = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]

    outs = []
    # unbind, not t[:, :, i]: each indexing op's backward would write a full-size zero
    # tensor per chunk (quadratic in length); unbind's backward stacks once.
    per_chunk = zip(*(t.unbind(dim=2) for t in (u, w, q_decayed, intra, k_decayed, chunk_decay)))
    for u_i, w_i, q_i, intra_i, k_i, decay_i in per_chunk:
        u_i = u_i - w_i @ state
        outs.append(q_i @ state + intra_i @ u_i)
        state = state * decay_i + k_i.transpose(-1, -2) @ u_i
    if not outs:
        return v.new_zeros(batch, num_heads, 0, v_dim), state
    out = torch.stack(outs, dim=2).reshape(batch, num_heads, -1, v_dim)
    return out[:, :, :seq_len], state


def _pack_index(lengths: list[int], *, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id, position in segment) of every packed token."""
    sizes = torch.tensor(lengths, device=device)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), sizes)
    starts = torch.cumsum(sizes, dim=0) - sizes
    position = torch.arange(segment.numel(), device=device) - starts[segment]
    return segment, position


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked torch gated delta rule, differentiable through autograd, fp32 accumulation.

    Same arguments and results as ``recurrent_gated_delta_rule``. Packed input
    (``cu_seqlens``) is split into its segments, right-padded into a batch of N rows
    (padding leaves states untouched, see ``_chunk_dense``) and gathered back, so no
    state or value crosses a segment boundary.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = q.dtype
    (q, k, v, g, beta), initial_state, lengths = _prepare(
        q, k, v, g, beta, initial_state=initial_state, cu_seqlens=cu_seqlens, scale=scale, use_qk_l2norm=use_qk_l2norm
    )
    batch, _, num_heads, k_dim = q.shape
    if lengths is not None:
        segment, position = _pack_index(lengths, device=q.device)
        rows, width = len(lengths), max(lengths)

        def to_rows(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros((rows, width) + t.shape[2:]).index_put((segment, position), t[0])

        q, k, v, g, beta = (to_rows(t) for t in (q, k, v, g, beta))
        batch = rows
    if initial_state is None:
        initial_state = v.new_zeros(batch, num_heads, k_dim, v.shape[-1])
    q, k, v, g, beta = (t.transpose(1, 2) for t in (q, k, v, g, beta))
    out, state = _chunk_dense(q, k, v, g, beta, initial_state, chunk_size=chunk_size)
    out = out.transpose(1, 2)
    if lengths is not None:
        out = out[segment, position].unsqueeze(0)
    return out.to(out_dtype), (state if output_final_state else None)


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


@functools.cache
def _gpu_kernel() -> Callable | None:
    # Imported on first CUDA use only: the library needs Triton and a GPU, and CPU runs
    # must never pay for (or fail on) importing it.
    try:
        module = importlib.import_module("fla.ops.gated_delta_rule")
    except ImportError:
        return None
    return getattr(module, "chunk_gated_delta_rule", None)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch: the GPU kernel library for CUDA bf16/fp16 input when importable, else
    ``chunk_gated_delta_rule``. Same arguments and results as the torch versions."""
    kernel = _gpu_kernel() if _on_cuda(q) and q.dtype in _GPU_KERNEL_DTYPES else None
    if kernel is None:
        return chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, scale=scale, use_qk_l2norm=use_qk_l2norm,
        )
    group = v.shape[2] // q.shape[2]
    if group > 1:
        # Older kernel releases require equal head counts for q, k and v.
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.long)
    return kernel(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens,
    )
