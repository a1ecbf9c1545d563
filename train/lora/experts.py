"""LoRA on every routed expert of a megatron MoE layer.

Tensor legend: T tokens on this rank after dispatch, sorted by local expert (megatron's
permuted order); E local experts; H hidden size; F expert ffn width per rank (fc1 emits 2F
for gated units); r LoRA rank.

    lora_fc1_A [E, r, H]   lora_fc1_B [E, 2F, r]     fc1: H -> 2F (gate/up fused)
    lora_fc2_A [E, r, F]   lora_fc2_B [E, H, r]      fc2: F -> H

The fc1 delta is added to each expert's fc1 output before the activation; the fc2 delta to
the experts' output. With our `GroupedExperts` (the model's default) base and deltas run in one
pass of grouped matrix products: the deltas go in as the base's `fc1_extra` / `fc2_extra`.
Around megatron's `SequentialMLP` (the loop reference) the base experts run unchanged: a
forward hook on expert i's `linear_fc1` adds its slice of the precomputed fc1 delta, and a
pre-hook on its `linear_fc2` records that expert's fc2 input (post activation and router
probabilities). The deltas are computed for all experts at once, by the grouped path
(`grouped_mm`, no loop over experts) or by the loop reference (`expert_lora_delta_loop`, one
matmul pair per expert, for comparison).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from megalora.train.model.experts import GroupedExperts
from megalora.train.ops.grouped_gemm import grouped_mm
from megalora.train.lora.options import LoraOptions, kaiming_uniform_full

IMPLS = ("grouped", "loop")


def expert_lora_delta_loop(x_TK: torch.Tensor, a_ErK: torch.Tensor, b_ENr: torch.Tensor,
                           tokens_per_expert: list[int]) -> torch.Tensor:
    """Reference: `x_e @ A_e^T @ B_e^T` per expert, a Python loop over experts."""
    chunks = torch.split(x_TK, tokens_per_expert)
    out = [F.linear(F.linear(xe, a_ErK[e]), b_ENr[e]) for e, xe in enumerate(chunks)]
    return torch.cat(out, dim=0) if out else x_TK.new_zeros(0, b_ENr.shape[1])


def expert_lora_delta_grouped(x_TK: torch.Tensor, a_ErK: torch.Tensor, b_ENr: torch.Tensor,
                              tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Same as `expert_lora_delta_loop` with two grouped matmuls (no loop over experts)."""
    h_Tr = grouped_mm(x_TK, a_ErK.transpose(1, 2), tokens_per_expert)
    return grouped_mm(h_Tr, b_ENr.transpose(1, 2), tokens_per_expert)


def expert_seed(init_seed: int, *, proj: str, global_expert: int) -> int:
    """Seed of one expert's A: fixed by the global expert id, so every EP layout agrees."""
    return (init_seed * 1_000_003 + global_expert * 2 + (0 if proj == "fc1" else 1)) % (2**63)


class LoraExperts(torch.nn.Module):
    """Per-expert LoRA on fc1 and fc2 around a megatron `SequentialMLP`.

    `first_global_expert` is the global id of local expert 0 (EP rank x local experts);
    `impl` picks the grouped path or the loop reference.
    """

    def __init__(self, base_layer: SequentialMLP, *, options: LoraOptions, init_seed: int,
                 first_global_expert: int, impl: str = "grouped",
                 projections: tuple[str, ...] = ("linear_fc1", "linear_fc2")) -> None:
        super().__init__()
        if not isinstance(base_layer, SequentialMLP):
            raise ValueError(
                f"expert LoRA supports megatron's SequentialMLP experts (moe_grouped_gemm=false), "
                f"got {type(base_layer).__name__}"
            )
        if not projections or set(projections) - {"linear_fc1", "linear_fc2"}:
            raise ValueError(f"expert LoRA projections={projections!r}: choose from linear_fc1, linear_fc2")
        if impl not in IMPLS:
            raise ValueError(f"expert LoRA impl={impl!r}: expected one of {IMPLS}")
        if base_layer.config.fp8 or base_layer.config.fp4:
            # megatron pads each expert's tokens for fp8/fp4 GEMMs; the deltas assume no padding
            raise ValueError("expert LoRA does not support fp8/fp4 experts")
        fc1 = base_layer.local_experts[0].linear_fc1
        fc2 = base_layer.local_experts[0].linear_fc2
        if fc1.tp_group is not None and fc1.tp_group.size() > 1:
            raise ValueError("expert LoRA needs expert_tensor_parallel_size=1")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.options = options
        self.scaling = options.scaling
        self.impl = impl
        self.num_local_experts = base_layer.num_local_experts
        self.first_global_expert = first_global_expert
        r, n = options.rank, self.num_local_experts
        ids = range(first_global_expert, first_global_expert + n)

        def a_init(proj: str, cols: int) -> torch.Tensor:
            return torch.stack([kaiming_uniform_full(r, cols, seed=expert_seed(init_seed, proj=proj, global_expert=g))
                                for g in ids]).to(options.dtype)

        self.projections = tuple(projections)
        self.lora_fc1_A = self.lora_fc1_B = self.lora_fc2_A = self.lora_fc2_B = None
        if "linear_fc1" in projections:
            self.lora_fc1_A = torch.nn.Parameter(a_init("fc1", fc1.input_size))
            self.lora_fc1_B = torch.nn.Parameter(torch.zeros(n, fc1.output_size_per_partition, r, dtype=options.dtype))
        if "linear_fc2" in projections:
            self.lora_fc2_A = torch.nn.Parameter(a_init("fc2", fc2.input_size_per_partition))
            self.lora_fc2_B = torch.nn.Parameter(torch.zeros(n, fc2.output_size, r, dtype=options.dtype))
        allreduce = getattr(fc1.weight, "allreduce", True)
        for p in self.parameters(recurse=False):
            p.allreduce = allreduce
            p.lora_expert = True
        self.dropout = torch.nn.Dropout(options.dropout) if options.dropout > 0 else torch.nn.Identity()
        self._fc1_delta: Optional[list[torch.Tensor]] = None
        self._fc2_inputs: Optional[list[Optional[torch.Tensor]]] = None
        self.grouped_base = isinstance(base_layer, GroupedExperts)
        for i, expert in enumerate([] if self.grouped_base else base_layer.local_experts):
            if self.lora_fc1_A is not None:
                expert.linear_fc1.register_forward_hook(self._make_fc1_hook(i))
            if self.lora_fc2_A is not None:
                expert.linear_fc2.register_forward_pre_hook(self._make_fc2_pre_hook(i))

    def _make_fc1_hook(self, index: int):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if self._fc1_delta is None:
                return output
            out, bias = output
            return out + self._fc1_delta[index].to(out.dtype), bias
        return hook

    def _make_fc2_pre_hook(self, index: int):
        def hook(module: torch.nn.Module, args: Any) -> None:
            if self._fc2_inputs is not None:
                self._fc2_inputs[index] = args[0]
        return hook

    def lora_delta(self, x_TK: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """`scaling * B_e A_e dropout(x)` for every token's expert e, by the chosen impl."""
        x = self.dropout(x_TK.to(a.dtype))
        if self.impl == "loop":
            delta = expert_lora_delta_loop(x, a, b, tokens_per_expert.tolist())
        else:
            delta = expert_lora_delta_grouped(x, a, b, tokens_per_expert)
        return delta * self.scaling

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """Megatron's experts contract: returns `(output, output_bias)` for the permuted tokens."""
        x = permuted_local_hidden_states
        if not torch.is_tensor(tokens_per_expert):
            tokens_per_expert = torch.tensor(tokens_per_expert)
        if self.grouped_base:
            def extra(a, b):
                return None if a is None else (lambda t: self.lora_delta(t, a, b, tokens_per_expert))
            return self.base_layer(x, tokens_per_expert, permuted_probs,
                                   fc1_extra=extra(self.lora_fc1_A, self.lora_fc1_B),
                                   fc2_extra=extra(self.lora_fc2_A, self.lora_fc2_B))
        config = self.base_layer.config
        fc1_in = x
        if config.moe_apply_probs_on_input:
            fc1_in = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
        if self.lora_fc1_A is not None:
            delta1 = self.lora_delta(fc1_in, self.lora_fc1_A, self.lora_fc1_B, tokens_per_expert)
            self._fc1_delta = list(torch.split(delta1, tokens_per_expert.tolist()))
        if self.lora_fc2_A is not None:
            self._fc2_inputs = [None] * self.num_local_experts
        try:
            output, output_bias = self.base_layer(x, tokens_per_expert, permuted_probs)
            fc2_inputs = self._fc2_inputs
        finally:
            self._fc1_delta = None
            self._fc2_inputs = None
        if fc2_inputs is None:
            return output, output_bias
        assert all(t is not None for t in fc2_inputs), "an expert's fc2 did not run"
        h = torch.cat(fc2_inputs, dim=0)
        delta2 = self.lora_delta(h, self.lora_fc2_A, self.lora_fc2_B, tokens_per_expert)
        return output + delta2.to(output.dtype), output_bias

    def backward_dw(self) -> None:
        """Megatron's delayed weight-gradient hook; the base experts do the work."""
        self.base_layer.backward_dw()

    def extra_repr(self) -> str:
        return (f"impl={self.impl}, local_experts={self.num_local_experts}, "
                f"first_global_expert={self.first_global_expert}, rank={self.options.rank}, "
                f"scaling={self.scaling:g}")
