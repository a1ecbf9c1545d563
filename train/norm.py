"""RMSNorm for megatron-core layer specs, usable under sequence parallelism.

megatron-core's local norm refuses ``sequence_parallel=True`` and zero-centred gamma; this
one accepts both. It has the constructor megatron's norm specs are built with
(``config, hidden_size, eps``).

Under sequence parallelism each TP rank normalises only its slice of the tokens, so the
weight's gradient on each rank is partial. Like megatron's own norms, the weight carries
``sequence_parallel = True`` so megatron's gradient finaliser (``finalize_model_grads``) sums
it over the TP group should it be trained.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``y = x / rms(x) * w`` (or ``* (1 + w)`` with ``config.layernorm_zero_centered_gamma``).

    The statistics are computed in float32; the result has the input's dtype, as in the
    Qwen3 and Qwen3-Next reference implementations.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # megatron passes extra norm options (persist_layer_norm, normalization, ...) to
        # some norm specs; none of them changes an RMSNorm on the torch path.
        self.config = config
        self.eps = eps
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered_gamma:
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, eps={self.eps}, "
            f"zero_centered_gamma={self.zero_centered_gamma}"
        )
