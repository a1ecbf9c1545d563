"""L2 normalisation of the last dim, with the epsilon convention of the GPU GDN kernels."""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, *, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """Return ``x / sqrt(sum(x**2, dim) + eps)``, computed in at least fp32, in ``x``'s dtype.

    The epsilon sits inside the square root (not ``max(norm, eps)`` as in
    ``F.normalize``): that is what the GPU kernels and transformers' Qwen3-Next use, so
    tiny vectors normalise the same way on every path.
    """
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute_dtype)
    return (xf * torch.rsqrt((xf * xf).sum(dim=dim, keepdim=True) + eps)).to(x.dtype)
