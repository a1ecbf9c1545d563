"""Gated DeltaNet token mixer (Qwen3-Next's linear attention) as a megatron spec entry.

megatron-core 0.16.1's `GatedDeltaNet` refuses to build without the GPU kernel library
and raises on packed sequences; this module keeps its parameter names and tensor layout
(`in_proj` rows [q; k; v; z; b; a] per TP shard, `conv1d`, `A_log`, `dt_bias`,
`out_norm`, `out_proj`) but runs the torch kernels of `megalora.train.ops` (which
dispatch to the GPU kernels when present) and accepts packed sequences (THD,
`packed_seq_params.cu_seqlens_q_padded` or else `cu_seqlens_q`).

Tensor parallel: q/k heads, v heads and their gates are split by key-head groups, so a
rank's value heads only read its own key heads; `in_proj` is column-parallel,
`out_proj` row-parallel (with sequence parallel they gather/scatter tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.train.ops.causal_conv1d import causal_conv1d
from megalora.train.ops.gated_delta_rule import gated_delta_rule


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The projection's output is read transposed ([b, s, ...]); without this its gradient
    arrives as a transposed view, and the frozen linear's backward (`grad.matmul(weight)`)
    cannot fold a non-contiguous 3-D tensor into one matmul: it runs a batched matmul over
    the weight expanded once per position instead (measured 5x slower on CPU)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class GatedRMSNorm(nn.Module):
    """RMSNorm of each value head followed by a SiLU output gate: `w * norm(x) * silu(z)`.

    Unlike Qwen3-Next's other norms the weight is a plain scale (not zero-centred)."""

    def __init__(self, hidden_size: int, *, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        """Normalise `x` over its last dim in fp32, scale, gate with silu(`gate`)."""
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(dtype)
        return (y * F.silu(gate.float())).to(dtype)


class GatedDeltaNet(MegatronModule):
    """Gated DeltaNet layer: [s, b, h] -> ([s, b, h], None), packed input supported."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: GatedDeltaNetSubmodules,
        layer_number: int | None = None,
        pg_collection: Any = None,
        **_: Any,
    ) -> None:
        super().__init__(config)
        self.layer_number = layer_number
        tp_group = getattr(pg_collection, "tp", None) or parallel_state.get_tensor_model_parallel_group()
        tp = tp_group.size()
        self.key_head_dim = config.linear_key_head_dim
        self.value_head_dim = config.linear_value_head_dim
        self.num_key_heads = config.linear_num_key_heads // tp
        self.num_value_heads = config.linear_num_value_heads // tp
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = config.linear_num_value_heads * config.linear_value_head_dim
        num_v = config.linear_num_value_heads
        self.local_key_dim = key_dim // tp
        self.local_value_dim = value_dim // tp
        in_proj_dim = 2 * key_dim + 2 * value_dim + 2 * num_v

        self.in_proj = build_module(
            submodules.in_proj,
            config.hidden_size,
            in_proj_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=tp_group,
        )
        conv_channels = (2 * key_dim + value_dim) // tp
        self.conv1d = nn.Conv1d(
            conv_channels,
            conv_channels,
            kernel_size=config.linear_conv_kernel_dim,
            groups=conv_channels,
            bias=False,
            dtype=config.params_dtype,
        )
        self.A_log = nn.Parameter(torch.zeros(self.num_value_heads, dtype=config.params_dtype))
        self.dt_bias = nn.Parameter(torch.ones(self.num_value_heads, dtype=config.params_dtype))
        for param in (self.conv1d.weight, self.A_log, self.dt_bias):
            set_tensor_model_parallel_attributes(param, True, 0, 1)
        self.out_norm = GatedRMSNorm(self.value_head_dim, eps=config.layernorm_epsilon, dtype=config.params_dtype)
        self.out_proj = build_module(
            submodules.out_proj,
            value_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=tp_group,
        )

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        inference_context: Any = None,
        packed_seq_params: Any = None,
        **_: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Mix tokens of [s, b, h] (or packed [t, 1, h] with `packed_seq_params`)."""
        if inference_context is not None:
            raise NotImplementedError("GatedDeltaNet here has no inference cache")
        cu_seqlens = None
        if packed_seq_params is not None:
            # Padded boundaries cover every token of the row; padding sits after a
            # sequence's real tokens, so causality keeps the real outputs exact.
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
        qkvzba, _ = self.in_proj(hidden_states)
        seq_len, batch, _ = qkvzba.shape
        qkvzba = _ContiguousGrad.apply(qkvzba).transpose(0, 1)
        nv = self.num_value_heads
        qkv, z, b, a = torch.split(
            qkvzba, [2 * self.local_key_dim + self.local_value_dim, self.local_value_dim, nv, nv], dim=-1
        )
        qkv = causal_conv1d(
            qkv.transpose(1, 2).contiguous(), self.conv1d.weight, None, activation="silu", cu_seqlens=cu_seqlens
        ).transpose(1, 2)
        q, k, v = torch.split(qkv, [self.local_key_dim, self.local_key_dim, self.local_value_dim], dim=-1)
        q = q.reshape(batch, seq_len, self.num_key_heads, self.key_head_dim)
        k = k.reshape(batch, seq_len, self.num_key_heads, self.key_head_dim)
        v = v.reshape(batch, seq_len, nv, self.value_head_dim)
        # Decay and write strength in fp32: exp(A_log) can overflow half precision.
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        beta = b.sigmoid()
        out, _ = gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, use_qk_l2norm=True)
        out = self.out_norm(out, z.reshape(batch, seq_len, nv, self.value_head_dim))
        out = out.reshape(batch, seq_len, -1).transpose(0, 1).contiguous()
        return self.out_proj(out)
