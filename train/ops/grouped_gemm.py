"""Grouped matmul over expert-sorted tokens, differentiable on CUDA and CPU.

Shapes (legend): T tokens sorted by expert, E local experts, K in-features, N out-features.

    grouped_mm(x_TK, w_EKN, tokens_per_expert_E) -> y_TN,   y[t] = x[t] @ w[expert(t)]

CUDA, bf16, compute capability >= 9.0 runs `torch._grouped_mm` (one kernel for all experts;
autograd is native). Its operands need 16-byte aligned strides, so K and N are zero-padded to
the alignment when they are not (a LoRA rank of 4 in bf16 is 8 bytes wide). Other CUDA
cases take the padded-`bmm` path below.

CPU, fp32/bf16/fp16: `torch._grouped_mm` runs forward but has no backward (torch 2.13), so
`grouped_mm_cpu` wraps it in an autograd function whose backward is two more grouped matmuls
(dx = dy @ w^T per group; dw = x^T @ dy per group, the K-grouped form), with the same
alignment padding. No token padding: the work is T rows, whatever the routing imbalance.

Other dtypes (fp64 for exactness tests) and devices: `grouped_mm_padded` scatters the tokens
into a zero-padded [E, max_tokens, K] batch and runs one `bmm`; gather/scatter by index are
differentiable, so autograd needs no custom backward. Padding costs E*max_tokens rows instead
of T, which routing imbalance inflates (3-4x with a random router), but it stays a constant
number of kernels however many experts there are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ALIGN_BYTES = 16


def _expert_positions(tokens_per_expert: torch.Tensor, *,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Expert id and row-within-expert of each (expert-sorted) token, and the largest group."""
    counts = tokens_per_expert.to(device=device, dtype=torch.long)
    num_experts = counts.numel()
    expert_id = torch.repeat_interleave(torch.arange(num_experts, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    row = torch.arange(expert_id.numel(), device=device) - starts[expert_id]
    max_tokens = int(counts.max().item()) if num_experts else 0
    return expert_id, row, max_tokens


def grouped_mm_padded(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Grouped matmul as one padded `bmm` (any device, any float dtype)."""
    num_experts, k, n = w.shape
    expert_id, row, max_tokens = _expert_positions(tokens_per_expert, device=x.device)
    padded = x.new_zeros(num_experts, max_tokens, k)
    padded = padded.index_put((expert_id, row), x)
    return torch.bmm(padded, w)[expert_id, row]


def _pad_dim(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = (-t.shape[dim]) % multiple
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


def grouped_mm_cuda(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Grouped matmul with `torch._grouped_mm`, padding K and N to 16-byte strides."""
    n = w.shape[-1]
    multiple = _ALIGN_BYTES // x.element_size()
    x_p = _pad_dim(x, 1, multiple).contiguous()
    w_p = _pad_dim(_pad_dim(w, 1, multiple), 2, multiple)
    # The kernel wants the weight column-major in its last two dims.
    w_p = w_p.transpose(1, 2).contiguous().transpose(1, 2)
    offs = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
    return torch._grouped_mm(x_p, w_p, offs=offs)[:, :n]


class _GroupedMMCPU(torch.autograd.Function):
    """`torch._grouped_mm` with a backward (operands already aligned)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_y, w.transpose(1, 2), offs=offs)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(x.t(), grad_y, offs=offs)
        return grad_x, grad_w, None


def grouped_mm_cpu(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Grouped matmul with CPU `torch._grouped_mm` (differentiable), padding K and N to 16-byte strides."""
    n = w.shape[-1]
    multiple = _ALIGN_BYTES // x.element_size()
    x_p = _pad_dim(x, 1, multiple).contiguous()
    w_p = _pad_dim(_pad_dim(w, 1, multiple), 2, multiple)
    if not (w_p.stride(1) == 1 or w_p.stride(2) == 1):
        w_p = w_p.contiguous()
    # A transposed view (the experts' stored [E, out, in] read as [E, in, out]) is taken as it
    # is: copying every expert's weight on every call would cost more than the product.
    offs = torch.cumsum(tokens_per_expert.to(dtype=torch.int32), 0, dtype=torch.int32)
    return _GroupedMMCPU.apply(x_p, w_p, offs)[:, :n]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """`y[t] = x[t] @ w[expert(t)]` for tokens sorted by expert; see the module docstring."""
    assert x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[1], (x.shape, w.shape)
    assert tokens_per_expert.numel() == w.shape[0], (tokens_per_expert.shape, w.shape)
    if (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)):
        return grouped_mm_cuda(x, w, tokens_per_expert)
    if (not x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and hasattr(torch, "_grouped_mm")):
        return grouped_mm_cpu(x, w, tokens_per_expert)
    return grouped_mm_padded(x, w, tokens_per_expert)
