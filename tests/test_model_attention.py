"""SDPACoreAttention against a plain softmax(QK^T)V reference: padded (sbhd) causal,
with a padding mask, and packed (thd) segments that must not see each other."""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.train.model.attention import SDPACoreAttention

HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def _attention():
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal).eval()


def _reference(q, k, v, allowed):
    """q [s, np, hn], k/v [s, ng, hn], allowed [s, s] -> [s, np*hn], one loop per head."""
    outs = []
    for h in range(q.shape[1]):
        g = h // (HEADS // GROUPS)
        scores = (q[:, h] @ k[:, g].T) * HEAD_DIM**-0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v[:, g])
    return torch.cat(outs, dim=-1)


def test_padded_batch_is_causal():
    seq, batch = 7, 2
    q = torch.randn(seq, batch, HEADS, HEAD_DIM, dtype=torch.float64)
    k, v = (torch.randn(seq, batch, GROUPS, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    out = _attention()(q, k, v, None)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for b in range(batch):
        torch.testing.assert_close(out[:, b], _reference(q[:, b], k[:, b], v[:, b], causal))


def test_padding_mask_is_combined_with_causality():
    seq = 6
    q = torch.randn(seq, 1, HEADS, HEAD_DIM, dtype=torch.float64)
    k, v = (torch.randn(seq, 1, GROUPS, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    masked = torch.zeros(1, 1, seq, seq, dtype=torch.bool)
    masked[..., 1] = True  # nobody may attend key 1 (megatron: True = masked out)
    masked[..., 0, 0] = False  # except query 0 needs one key
    out = _attention()(q, k, v, masked)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & ~masked[0, 0]
    torch.testing.assert_close(out[:, 0], _reference(q[:, 0], k[:, 0], v[:, 0], allowed))


@pytest.mark.parametrize("padded", [False, True])
def test_packed_segments_do_not_mix(padded):
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, HEADS, HEAD_DIM, dtype=torch.float64)
    k, v = (torch.randn(total, GROUPS, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=torch.tensor([0, 2, 6, 8], dtype=torch.int32) if padded else cu,
        cu_seqlens_kv=torch.tensor([0, 2, 6, 8], dtype=torch.int32) if padded else cu,
        cu_seqlens_q_padded=cu if padded else None,
        cu_seqlens_kv_padded=cu if padded else None,
        max_seqlen_q=5,
        max_seqlen_kv=5,
    )
    out = _attention()(q, k, v, None, packed_seq_params=params)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        torch.testing.assert_close(out[a:b], _reference(q[a:b], k[a:b], v[a:b], causal))
