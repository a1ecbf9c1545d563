"""Depthwise causal 1-D convolution over time, as used on GDN's mixed q/k/v channels.

Layout is channels-first, as ``nn.Conv1d`` and the GPU ``causal_conv1d`` package use:

    x              [B, D, T]
    weight         [D, W] (or an ``nn.Conv1d`` depthwise weight [D, 1, W])
    bias           [D] or None
    initial_state  [N, D, W - 1]  the W - 1 inputs before the first token (zeros if None);
                                  N = B, or the number of segments with ``cu_seqlens``
    cu_seqlens     [N + 1]        packed input (B == 1): the window never reaches back
                                  across a segment start
    output         [B, D, T]      out[:, :, t] = act(bias + sum_j weight[:, j] * x[:, :, t - W + 1 + j])
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu", "swish")


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None,
    cu_seqlens: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, list[int] | None]:
    """Validate arguments; return the weight as [D, W] and the segment lengths (or None)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, D, T], got shape {tuple(x.shape)}")
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [D, W] or [D, 1, W] with D = {x.shape[1]}, got {tuple(weight.shape)}")
    lengths = None
    num_states = x.shape[0]
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs packed input with batch size 1, got batch size {x.shape[0]}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [N + 1], got shape {tuple(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != x.shape[2] or min(lengths) < 0:
            raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {x.shape[2]}, got {bounds}")
        num_states = len(lengths)
    width = weight.shape[1]
    if initial_state is not None and initial_state.shape != (num_states, x.shape[1], width - 1):
        raise ValueError(
            f"initial_state must be [N, D, W - 1] = {(num_states, x.shape[1], width - 1)}, "
            f"got {tuple(initial_state.shape)}"
        )
    return weight, lengths


def torch_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv in torch (one ``F.conv1d`` call, also for packed input).

    Packed input: every segment gets its own W - 1 left context (its initial state or
    zeros) spliced in front of it, one valid convolution runs over the whole spliced
    sequence, and each token's output is picked back out, so windows stop at segment starts.
    """
    weight, lengths = _check(x, weight, activation=activation, cu_seqlens=cu_seqlens, initial_state=initial_state)
    dim, width = weight.shape
    xw = x.to(weight.dtype)
    if lengths is None:
        context = xw.new_zeros(x.shape[0], dim, width - 1) if initial_state is None else initial_state.to(xw.dtype)
        out = F.conv1d(torch.cat([context, xw], dim=2), weight.unsqueeze(1), bias, groups=dim)
    else:
        num_segments, seq_len = len(lengths), x.shape[2]
        context = (
            xw.new_zeros(num_segments, dim, width - 1) if initial_state is None else initial_state.to(xw.dtype)
        )
        # Source: all contexts first (segment n's at n*(W-1)...), then the tokens.
        source = torch.cat([context.permute(1, 0, 2).reshape(1, dim, -1), xw], dim=2)
        order, picks, start = [], [], 0
        for n, length in enumerate(lengths):
            order.append(torch.arange(n * (width - 1), (n + 1) * (width - 1)))
            order.append(torch.arange(length) + num_segments * (width - 1) + start)
            # The valid conv output for spliced position p is at p - (W - 1); token t of
            # segment n sits at spliced position t + (n + 1) * (W - 1).
            picks.append(torch.arange(length) + start + n * (width - 1))
            start += length
        spliced = source.index_select(2, torch.cat(order).to(x.device))
        conv = F.conv1d(spliced, weight.unsqueeze(1), bias, groups=dim)
        out = conv.index_select(2, torch.cat(picks).to(x.device))
        assert out.shape[2] == seq_len
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


@functools.cache
def _gpu_kernel() -> Callable | None:
    # Imported on first CUDA use only: CPU runs never import the CUDA extension.
    try:
        module = importlib.import_module("causal_conv1d")
    except ImportError:
        return None
    return getattr(module, "causal_conv1d_fn", None)


@functools.cache
def _fla_kernel() -> Callable | None:
    # The GPU kernel library's Triton conv (channels-last, takes cu_seqlens): the CUDA path
    # when the compiled causal_conv1d package is absent.
    try:
        module = importlib.import_module("fla.modules.causal_conv1d")
    except ImportError:
        return None
    return getattr(module, "causal_conv1d", None)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch, same arguments and result everywhere. On CUDA: the ``causal_conv1d`` package
    when importable and it supports the call (width 2-4; not packed input together with an
    initial state), else the GPU kernel library's Triton conv when importable (no initial
    state), else ``torch_causal_conv1d``, which is also the path off CUDA."""
    weight2d, lengths = _check(x, weight, activation=activation, cu_seqlens=cu_seqlens, initial_state=initial_state)
    on_cuda = _on_cuda(x)
    supported = 2 <= weight2d.shape[1] <= 4 and not (lengths is not None and initial_state is not None)
    kernel = _gpu_kernel() if on_cuda and supported else None
    if kernel is None:
        fla = _fla_kernel() if on_cuda and initial_state is None else None
        if fla is None:
            return torch_causal_conv1d(
                x, weight2d, bias, activation=activation, cu_seqlens=cu_seqlens, initial_state=initial_state
            )
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.long)
        out, _ = fla(x.transpose(1, 2), weight2d, bias, activation=activation, cu_seqlens=cu_seqlens)
        return out.transpose(1, 2)
    seq_idx = None
    if lengths is not None or initial_state is not None:
        # The package reads segment ids and initial states only from a channels-last x.
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    if initial_state is not None:
        initial_state = initial_state.transpose(1, 2).contiguous().transpose(1, 2)
    if lengths is not None:
        sizes = torch.tensor(lengths, device=x.device)
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=x.device, dtype=torch.int32), sizes)
        seq_idx = seq_idx.unsqueeze(0)
    return kernel(x, weight2d, bias, seq_idx=seq_idx, initial_states=initial_state, activation=activation)
