"""LoRA on the MoE router and on the shared-expert gate (only on request).

Both are replicated weight matrices that megatron applies inline (no linear module), so the
adapter is a small module registered next to the weight, and the one call site that uses the
weight is rerouted through it on that instance only:

- router: `TopKRouter.gating(x)` -> `gating(x) + delta(x)` (logits, in the router dtype);
- shared-expert gate: `sigmoid(x W_g^T)` -> `sigmoid(x W_g^T + delta(x))`.

Their input is this rank's token shard under sequence parallelism, so both halves are then
partial over TP (`lora_tp_allreduce`).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

from megalora.train.lora.options import LoraOptions, kaiming_uniform_full, mark_sequence_parallel_partial


class LoraGate(torch.nn.Module):
    """Replicated adapter `scaling * B(A(dropout(x)))` for a [out, in] replicated weight."""

    def __init__(self, in_features: int, out_features: int, *, options: LoraOptions, init_seed: int,
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.scaling = options.scaling
        a = kaiming_uniform_full(options.rank, in_features, seed=init_seed)
        self.lora_A = torch.nn.Parameter(a.to(options.dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, options.rank, dtype=options.dtype))
        if sequence_parallel:
            mark_sequence_parallel_partial(self.lora_A)
            mark_sequence_parallel_partial(self.lora_B)
        self.dropout = torch.nn.Dropout(options.dropout) if options.dropout > 0 else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The delta to add to the gate's logits."""
        return F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B) * self.scaling


def _sp_active(config: object) -> bool:
    return bool(config.sequence_parallel) and config.tensor_model_parallel_size > 1


def add_router_lora(router: torch.nn.Module, *, options: LoraOptions, init_seed: int) -> LoraGate:
    """Attach `router.lora` and route this router's `gating` through it."""
    num_experts, hidden = router.weight.shape
    router.lora = LoraGate(hidden, num_experts, options=options, init_seed=init_seed,
                           sequence_parallel=_sp_active(router.config))
    base_gating = router.gating

    def gating(self: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
        logits = base_gating(input)
        return logits + self.lora(input).to(logits.dtype)

    router.gating = types.MethodType(gating, router)
    return router.lora


def add_shared_expert_gate_lora(shared: SharedExpertMLP, *, options: LoraOptions, init_seed: int) -> LoraGate:
    """Attach `shared_experts.gate_lora` and apply it inside this module's gated forward."""
    if not shared.use_shared_expert_gate:
        raise ValueError("lora target 'shared_expert_gate': this model's shared expert has no gate")
    if shared.config.moe_shared_expert_overlap:
        raise ValueError("lora target 'shared_expert_gate' does not support moe_shared_expert_overlap")
    shared.gate_lora = LoraGate(shared.config.hidden_size, 1, options=options, init_seed=init_seed,
                                sequence_parallel=_sp_active(shared.config))

    # Same steps as SharedExpertMLP.forward, with the adapter inside the sigmoid.
    def forward(self: SharedExpertMLP, hidden_states: torch.Tensor) -> torch.Tensor:
        output, _ = MLP.forward(self, hidden_states)
        logits = F.linear(hidden_states, self.gate_weight)
        logits = logits + self.gate_lora(hidden_states).to(logits.dtype)
        return output * torch.sigmoid(logits)

    shared.forward = types.MethodType(forward, shared)
    return shared.gate_lora
