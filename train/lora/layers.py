"""LoRA around megatron's tensor-parallel linear layers (local, non-TE spec).

`LoraLinear` keeps the wrapped layer's contract: `forward(x, *args, **kwargs) -> (output, bias)`,
and it adds `scaling * B(A(dropout(x)))` to the output. The LoRA halves are sharded like the base:

| base            | A (rank x in)          | B (out x rank)          | SP: who sees a token shard |
|-----------------|------------------------|-------------------------|----------------------------|
| column-parallel | replicated [r, in]     | split [out/tp, r]       | A (grad all-reduced on TP) |
| row-parallel    | split [r, in/tp]       | replicated [out, r]     | B (grad all-reduced on TP) |

Communication is done on the rank-r activation, never on the wide one: under sequence
parallelism the column case runs A on the local token shard and all-gathers the [s/tp, b, r]
result; the row case reduce-scatters A's partial [s, b, r] sum along the sequence, so B's
output lands on the same token shard as the base's reduce-scattered output.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megalora.train.lora.options import (
    LoraOptions,
    kaiming_uniform_full,
    mark_sequence_parallel_partial,
    mark_tensor_parallel,
)

# Attributes a parent module may read from its linear layer; everything else stays on the wrapper.
_DELEGATED = frozenset({
    "weight", "bias", "config", "input_size", "output_size", "output_size_per_partition",
    "input_size_per_partition", "gather_output", "input_is_parallel", "skip_bias_add",
    "sequence_parallel", "is_expert", "tp_group", "explicit_expert_comm", "backward_dw",
})


def _group_size(group: Optional[torch.distributed.ProcessGroup]) -> int:
    return 1 if group is None else group.size()


def _group_rank(group: Optional[torch.distributed.ProcessGroup]) -> int:
    return 0 if group is None else group.rank()


class LoraLinear(torch.nn.Module):
    """LoRA adapter around a megatron `ColumnParallelLinear` or `RowParallelLinear`.

    The base layer is frozen. `init_seed` fixes A's full-matrix initialisation (see
    `kaiming_uniform_full`); B starts at zero, so the wrapped layer starts equal to the base.
    """

    def __init__(self, base_layer: torch.nn.Module, *, options: LoraOptions, init_seed: int) -> None:
        super().__init__()
        if isinstance(base_layer, ColumnParallelLinear):
            self.parallel_mode = "column"
        elif isinstance(base_layer, RowParallelLinear):
            self.parallel_mode = "row"
        else:
            raise ValueError(
                f"LoRA wraps ColumnParallelLinear or RowParallelLinear, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.options = options
        self.scaling = options.scaling
        group = base_layer.tp_group
        self._tp_size = _group_size(group)
        tp_rank = _group_rank(group)
        # Expert layers leave all communication to the token dispatcher.
        self._communicate = self._tp_size > 1 and not base_layer.explicit_expert_comm
        self._sequence_parallel = self._communicate and bool(base_layer.sequence_parallel)
        r = options.rank
        full_a = kaiming_uniform_full(r, base_layer.input_size, seed=init_seed)
        if self.parallel_mode == "column":
            a = full_a
            b = torch.zeros(base_layer.output_size_per_partition, r)
        else:
            shard = base_layer.input_size_per_partition
            a = full_a[:, tp_rank * shard:(tp_rank + 1) * shard]
            b = torch.zeros(base_layer.output_size, r)
        self.lora_A = torch.nn.Parameter(a.to(options.dtype).contiguous())
        self.lora_B = torch.nn.Parameter(b.to(options.dtype))
        if self.parallel_mode == "column":
            mark_tensor_parallel(self.lora_B, dim=0)
            if self._sequence_parallel:
                mark_sequence_parallel_partial(self.lora_A)
        else:
            mark_tensor_parallel(self.lora_A, dim=1)
            if self._sequence_parallel:
                mark_sequence_parallel_partial(self.lora_B)
        allreduce = getattr(base_layer.weight, "allreduce", True) if base_layer.weight is not None else True
        for p in (self.lora_A, self.lora_B):
            p.allreduce = allreduce
        self.dropout = torch.nn.Dropout(options.dropout) if options.dropout > 0 else torch.nn.Identity()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _DELEGATED:
                return getattr(super().__getattr__("base_layer"), name)
            raise

    def input_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """LoRA dropout; where TP ranks hold different slices of x, each draws its own mask.

        A row-parallel input is split by features and a sequence-parallel one by tokens: drawn
        from the default generator (seeded alike on TP ranks) every rank would repeat the same
        mask pattern on its slice. Those cases use megatron's model-parallel RNG stream, as
        megatron's own dropout inside TP regions does.
        """
        split = self._tp_size > 1 and (self.parallel_mode == "row" or self._sequence_parallel)
        if split and self.training and self.options.dropout > 0:
            tracker = get_cuda_rng_tracker()
            if tracker.is_initialized():
                with tracker.fork():
                    return self.dropout(x)
        return self.dropout(x)

    def lora_delta(self, x: torch.Tensor, *, gather_output: bool = False) -> torch.Tensor:
        """The adapter's contribution `scaling * B(A(dropout(x)))`, laid out like the base output."""
        group = self.base_layer.tp_group
        h = F.linear(self.input_dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if self.parallel_mode == "column":
            if self._sequence_parallel:
                # backward reduce-scatters dh: the partial sums of the TP-split B meet here.
                h = mappings.gather_from_sequence_parallel_region(h, group=group)
            elif self._communicate:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=group)
            delta = F.linear(h, self.lora_B) * self.scaling
            if gather_output and self._tp_size > 1:
                delta = mappings.gather_from_tensor_model_parallel_region(delta, group=group)
            return delta
        if self._sequence_parallel:
            h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=group)
        elif self._communicate:
            h = mappings.reduce_from_tensor_model_parallel_region(h, group=group)
        return F.linear(h, self.lora_B) * self.scaling

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any):
        """Base forward plus the LoRA delta; returns the base's `(output, bias)` pair."""
        output, bias = self.base_layer(input_, *args, **kwargs)
        base = self.base_layer
        if self.parallel_mode == "column":
            runtime_gather = kwargs.get("runtime_gather_output", args[1] if len(args) > 1 else None)
            gather = base.gather_output if runtime_gather is None else bool(runtime_gather)
            delta = self.lora_delta(input_, gather_output=gather)
        else:
            x = input_
            if not base.input_is_parallel and self._tp_size > 1:
                x = mappings.scatter_to_tensor_model_parallel_region(x, group=base.tp_group)
            delta = self.lora_delta(x)
        return output + delta.to(output.dtype), bias

    def extra_repr(self) -> str:
        return (f"mode={self.parallel_mode}, rank={self.options.rank}, scaling={self.scaling:g}, "
                f"A={tuple(self.lora_A.shape)}, B={tuple(self.lora_B.shape)}")
