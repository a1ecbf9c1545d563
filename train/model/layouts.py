"""Fused-tensor layouts: HF tensors <-> one megatron tensor, as pure functions.

Every function works on *local* pieces too: given the rows of the HF tensors that one
tensor-parallel rank owns (whole query groups, whole GDN key-head groups, a block of
the MLP width), it returns that rank's megatron shard, and the inverse turns a rank's
megatron shard back into its HF pieces. Trailing dims (input features) are carried
along, so the same functions serve weights [out, in] and biases [out].

Legend: hd = head dim, g = query groups (KV heads) held, hpg = query heads per group,
kd/vd = GDN key/value head dims, nk = GDN key heads held, r = value heads per key head.
"""

from __future__ import annotations

import torch
from torch import Tensor


def qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, *, head_dim: int, gated: bool) -> Tensor:
    """HF q_proj/k_proj/v_proj rows -> megatron linear_qkv rows, interleaved per query group:
    [q heads of the group..., (their output gates...,) k, v].

    With an output gate HF's q_proj holds, per head, [query (hd), gate (hd)]; megatron
    wants, per group, all queries of the group, then all their gates."""
    rest = q.shape[1:]
    groups = k.shape[0] // head_dim
    width = 2 if gated else 1
    heads_per_group = q.shape[0] // (groups * head_dim * width)
    qg = q.reshape(groups, heads_per_group, width, head_dim, *rest)
    parts = [qg[:, :, 0].reshape(groups, heads_per_group * head_dim, *rest)]
    if gated:
        parts.append(qg[:, :, 1].reshape(groups, heads_per_group * head_dim, *rest))
    parts.append(k.reshape(groups, head_dim, *rest))
    parts.append(v.reshape(groups, head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def qkv_to_hf(
    qkv: Tensor, *, head_dim: int, heads_per_group: int, gated: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `qkv_to_megatron`: megatron linear_qkv rows -> (q_proj, k_proj, v_proj) rows."""
    rest = qkv.shape[1:]
    width = 2 if gated else 1
    per_group = (heads_per_group * width + 2) * head_dim
    groups = qkv.shape[0] // per_group
    grouped = qkv.reshape(groups, per_group, *rest)
    q_rows = heads_per_group * head_dim
    query = grouped[:, :q_rows].reshape(groups, heads_per_group, 1, head_dim, *rest)
    offset = q_rows
    if gated:
        gate = grouped[:, offset : offset + q_rows].reshape(groups, heads_per_group, 1, head_dim, *rest)
        query = torch.cat([query, gate], dim=2)
        offset += q_rows
    q = query.reshape(-1, *rest)
    k = grouped[:, offset : offset + head_dim].reshape(-1, *rest)
    v = grouped[:, offset + head_dim : offset + 2 * head_dim].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def gate_up_to_megatron(gate: Tensor, up: Tensor) -> Tensor:
    """HF gate_proj and up_proj rows -> megatron linear_fc1 rows [gate; up] (per TP shard)."""
    return torch.cat([gate, up], dim=0)


def gate_up_to_hf(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `gate_up_to_megatron`."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def gdn_in_proj_to_megatron(
    qkvz: Tensor, ba: Tensor, *, key_head_dim: int, value_head_dim: int, value_per_key: int
) -> Tensor:
    """HF in_proj_qkvz / in_proj_ba (grouped per key head: [q, k, v, z] and [b, a]) ->
    megatron GDN in_proj rows [q; k; v; z; b; a], each part ordered by head."""
    rest = qkvz.shape[1:]
    kd, vd, r = key_head_dim, value_head_dim, value_per_key
    per_key = 2 * kd + 2 * r * vd
    num_key_heads = qkvz.shape[0] // per_key
    grouped = qkvz.reshape(num_key_heads, per_key, *rest)
    q, k, v, z = torch.split(grouped, [kd, kd, r * vd, r * vd], dim=1)
    b, a = torch.split(ba.reshape(num_key_heads, 2 * r, *rest), [r, r], dim=1)
    return torch.cat([t.reshape(-1, *rest) for t in (q, k, v, z, b, a)], dim=0)


def gdn_in_proj_to_hf(
    in_proj: Tensor, *, key_head_dim: int, value_head_dim: int, value_per_key: int
) -> tuple[Tensor, Tensor]:
    """Inverse of `gdn_in_proj_to_megatron`: -> (in_proj_qkvz rows, in_proj_ba rows)."""
    rest = in_proj.shape[1:]
    kd, vd, r = key_head_dim, value_head_dim, value_per_key
    num_key_heads = in_proj.shape[0] // (2 * kd + 2 * r * vd + 2 * r)
    n = num_key_heads
    q, k, v, z, b, a = torch.split(in_proj, [n * kd, n * kd, n * r * vd, n * r * vd, n * r, n * r], dim=0)
    qkvz = torch.cat(
        [q.reshape(n, kd, *rest), k.reshape(n, kd, *rest), v.reshape(n, r * vd, *rest), z.reshape(n, r * vd, *rest)],
        dim=1,
    ).reshape(-1, *rest)
    ba = torch.cat([b.reshape(n, r, *rest), a.reshape(n, r, *rest)], dim=1).reshape(-1, *rest)
    return qkvz.contiguous(), ba.contiguous()
