"""Routed experts as grouped matrix products over stacked weights (no loop over experts).

Tensor legend: T tokens on this rank after dispatch, sorted by local expert (megatron's
permuted order); E local experts; H hidden size; F expert ffn width (fc1 emits 2F: gate|up).

    fc1_weight_EOH [E, 2F, H]    fc2_weight_EHF [E, H, F]

    y_T2F = grouped(x_TH, fc1)  (+ fc1 extra, e.g. a LoRA delta)
    a_TF  = act(gate) * up * prob                 (megatron's MLP, probabilities after the GLU)
    o_TH  = grouped(a_TF, fc2)  (+ fc2 extra of a_TF)

`GroupedExperts` is a `SequentialMLP` whose per-expert weights are views of the two stacks:
the loader, the mapping table, export and merge see the usual per-expert parameters
(`local_experts.{i}.linear_fc{1,2}.weight`), while forward reads the stacks directly, with
`torch._grouped_mm` on CUDA bf16 (Hopper) and one padded `bmm` elsewhere (see
`train.ops.grouped_gemm`). The base weights are frozen: gradients reach the stacks, not the
per-expert views, so a model whose base experts train uses `SequentialMLP` (the loop
reference, `experts="sequential"` in `build_model`), as the base-gradient parity tests do.
Expert tensor parallelism, biases and fp8/fp4 experts are refused.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megalora.train.ops.grouped_gemm import grouped_mm

Extra = Optional[Callable[[torch.Tensor], torch.Tensor]]


class GroupedExperts(SequentialMLP):
    """megatron's experts contract (`forward(hidden, tokens_per_expert, probs)`) on stacked weights."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if self.tp_group is not None and self.tp_group.size() > 1:
            raise ValueError("grouped experts need expert_tensor_parallel_size=1")
        if self.config.add_bias_linear:
            raise ValueError("grouped experts take bias-free experts (add_bias_linear=false)")
        if self.config.fp8 or self.config.fp4:
            raise ValueError("grouped experts do not support fp8/fp4 experts")
        if not self.config.gated_linear_unit:
            raise ValueError("grouped experts implement gated (GLU) experts only")
        experts = list(self.local_experts)
        with torch.no_grad():
            fc1 = torch.stack([e.linear_fc1.weight for e in experts])
            fc2 = torch.stack([e.linear_fc2.weight for e in experts])
        # Buffers, not parameters: the per-expert views stay the parameters (one name, one count).
        self.register_buffer("fc1_weight_EOH", fc1, persistent=False)
        self.register_buffer("fc2_weight_EHF", fc2, persistent=False)
        self._alias_experts()

    def _alias_experts(self) -> None:
        """Point every expert's weight at its slice of the stacks (shared storage)."""
        for i, expert in enumerate(self.local_experts):
            for linear, stack in ((expert.linear_fc1, self.fc1_weight_EOH), (expert.linear_fc2, self.fc2_weight_EHF)):
                linear.weight.requires_grad_(False)
                linear.weight.data = stack[i]

    def _apply(self, fn, recurse=True):
        # `.to()` / `.cuda()` / `.half()` would give the views and the stacks separate copies:
        # move the stacks only, then re-alias.
        self.fc1_weight_EOH = fn(self.fc1_weight_EOH)
        self.fc2_weight_EHF = fn(self.fc2_weight_EHF)
        self._alias_experts()
        return self

    def _glu(self, y: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(y, 2, dim=-1)
        value = self.config.activation_func_clamp_value
        if value is not None:
            gate, up = gate.clamp(min=None, max=value), up.clamp(min=-value, max=value)
        return self.config.activation_func(gate) * (up + self.config.glu_linear_offset)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor, *, fc1_extra: Extra = None, fc2_extra: Extra = None):
        """`(output, None)` for the expert-sorted tokens; `fc1_extra(x)` is added to fc1's output
        and `fc2_extra(a)` to the output (LoRA deltas), with `x`/`a` the inputs of fc1/fc2."""
        x = permuted_local_hidden_states
        probs = permuted_probs
        if self.config.moe_apply_probs_on_input:
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        if not torch.is_tensor(tokens_per_expert):
            tokens_per_expert = torch.tensor(tokens_per_expert)
        y = grouped_mm(x, self.fc1_weight_EOH.transpose(1, 2), tokens_per_expert)
        if fc1_extra is not None:
            y = y + fc1_extra(x).to(y.dtype)
        a = self._glu(y)
        a = (a * probs.unsqueeze(-1)).to(a.dtype)
        out = grouped_mm(a, self.fc2_weight_EHF.transpose(1, 2), tokens_per_expert)
        if fc2_extra is not None:
            out = out + fc2_extra(a).to(out.dtype)
        return out, None

    def backward_dw(self) -> None:
        """Megatron's delayed weight-gradient hook: frozen stacks have none."""
