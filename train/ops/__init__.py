"""Torch kernels for Qwen3-Next's Gated DeltaNet, with dispatch to GPU libraries when present.

- ``gated_delta_rule``: the GPU kernel library on CUDA bf16/fp16 when importable, else
  ``chunk_gated_delta_rule`` (chunked torch); ``recurrent_gated_delta_rule`` is the
  token-by-token reference.
- ``causal_conv1d``: on CUDA the ``causal_conv1d`` GPU package when importable, else the
  GPU kernel library's Triton conv; else (and off CUDA) ``torch_causal_conv1d``.
- ``l2norm``: q/k normalisation with the kernels' epsilon convention.
All take packed input through ``cu_seqlens`` and never mix state across segments.
"""

from megalora.train.ops.causal_conv1d import causal_conv1d, torch_causal_conv1d
from megalora.train.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule,
    recurrent_gated_delta_rule,
)
from megalora.train.ops.l2norm import l2norm

__all__ = [
    "causal_conv1d",
    "chunk_gated_delta_rule",
    "gated_delta_rule",
    "l2norm",
    "recurrent_gated_delta_rule",
    "torch_causal_conv1d",
]
