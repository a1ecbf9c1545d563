"""Causal core attention on torch's `scaled_dot_product_attention`, padded (sbhd) or packed (thd).

megatron-core's local `DotProductAttention` asserts `packed_seq_params is None` and builds
its causal mask with a CUDA literal (which breaks under recomputation on CPU); this spec
entry keeps its constructor and call signature, accepts packed sequences (attention stays
inside each `cu_seqlens` segment), and lets torch pick its fused kernel.

Packed (thd) input has two paths, chosen per call by `use_varlen`:
- CUDA, bf16/fp16, head dim <= 256, no attention dropout, and a torch that ships
  `torch.nn.attention.varlen.varlen_attn` (2.10+; flash attention over `cu_seqlens`, no
  compiled extension): `varlen_causal_attention`, O(t) memory;
- everywhere else the reference: one SDPA call with a [t, t] same-segment causal mask
  (`segment_causal_mask`), O(t^2) memory, exact in fp64.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def segment_causal_mask(cu_seqlens: Tensor, *, total: int, device: torch.device) -> Tensor:
    """Boolean [total, total] mask, True where query i may attend key j: same segment, j <= i."""
    positions = torch.arange(total, device=device)
    segment = torch.bucketize(positions, cu_seqlens[1:].to(device), right=True)
    return (segment[:, None] == segment[None, :]) & (positions[None, :] <= positions[:, None])


_VARLEN_DTYPES = (torch.bfloat16, torch.float16)
_VARLEN_MAX_HEAD_DIM = 256  # flash attention's largest head dim


def _on_cuda(x: Tensor) -> bool:
    return x.is_cuda


@functools.cache
def _varlen_kernel() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def use_varlen(query: Tensor, *, dropout: float) -> bool:
    """Whether packed attention on `query` [t, np, hn] takes torch's varlen flash kernel."""
    return (
        _on_cuda(query)
        and query.dtype in _VARLEN_DTYPES
        and query.shape[-1] <= _VARLEN_MAX_HEAD_DIM
        and dropout == 0.0
        and _varlen_kernel() is not None
    )


def varlen_causal_attention(
    query: Tensor, key: Tensor, value: Tensor, cu_seqlens: Tensor, *, max_seqlen: int, scale: float
) -> Tensor:
    """Causal attention within `cu_seqlens` segments: q [t, np, hn], k/v [t, ng, hn] -> [t, np, hn].

    Spans the signature changes of `varlen_attn` (2.10: `is_causal`; 2.11+: `window_size`
    and `scale`; 2.12+: `enable_gqa`): grouped kv heads are repeated where the kernel cannot
    take them, and a release without `scale` gets none only when the default one is wanted."""
    kernel = _varlen_kernel()
    assert kernel is not None
    params = inspect.signature(kernel).parameters
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn takes no softmax scale; {scale} was asked")
    repeat = query.shape[1] // key.shape[1]
    if repeat > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    return kernel(query, key, value, cu, cu, max_seqlen, max_seqlen, **kwargs)


class SDPACoreAttention(MegatronModule):
    """Drop-in core attention: [s, b, np, hn] -> [s, b, np*hn], or packed [t, np, hn] -> [t, np*hn]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention supports causal attention only, got {attn_mask_type}")
        self.layer_number = layer_number
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else head_dim**-0.5

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q [b, np, s, hn], k/v [b, ng, s, hn] -> [b, np, s, hn]."""
        repeat = q.shape[1] // k.shape[1]
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
            scale=self.scale,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """Causal attention; `attention_mask` (True = masked, megatron's convention) is
        combined with causality; packed input attends within its segments."""
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not take an attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            total = query.shape[0]
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            dropout = self.dropout if self.training else 0.0
            if use_varlen(query, dropout=dropout):
                max_seqlen = packed_seq_params.max_seqlen_q
                if max_seqlen is None or cu_seqlens is packed_seq_params.cu_seqlens_q_padded:
                    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
                out = varlen_causal_attention(query, key, value, cu_seqlens, max_seqlen=int(max_seqlen),
                                              scale=self.scale)
                return out.reshape(total, -1)
            mask = segment_causal_mask(cu_seqlens, total=total, device=query.device)
            q, k, v = (t.unsqueeze(0).transpose(1, 2) for t in (query, key, value))
            out = self._attend(q, k, v, mask)  # [1, np, t, hn]
            return out.squeeze(0).transpose(0, 1).reshape(total, -1)
        seq, batch = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if attention_mask is not None:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=query.device).tril()
            mask = ~attention_mask.bool() & causal
        out = self._attend(q, k, v, mask)  # [b, np, s, hn]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
