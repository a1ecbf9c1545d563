"""LoRA hyper-parameters shared by the dense wrappers and the expert adapters.

Parameter attributes set on LoRA tensors (read by `megalora.train.lora.grads` and, where the
name is megatron's own, by megatron's DDP / `finalize_model_grads` as well):

- `lora_tp_allreduce` (ours) and `sequence_parallel` (megatron's): a replicated LoRA half whose
  input is a sequence-parallel shard of the tokens; its gradient is a partial sum over TP.
- `allreduce` (megatron's): False for expert adapters under expert parallelism; their gradient
  is reduced over the expert-data-parallel group instead of DP.
- `tensor_model_parallel` / `partition_dim` / `partition_stride` (megatron's): the half that is
  split across TP like its base weight (used by grad-norm to count each element once).
- `lora_expert` (ours): the tensor belongs to a routed-expert adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class LoraOptions:
    """Per-adapter hyper-parameters (`LoraSpec.options`)."""

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha/r, or alpha/sqrt(r) with rank-stabilised LoRA."""
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank


def kaiming_uniform_full(rows: int, cols: int, *, seed: int) -> torch.Tensor:
    """The full (unsharded) LoRA A, initialised as peft does (kaiming_uniform_, a=sqrt(5)).

    Drawn from a private generator seeded per adapter so that every rank, whatever its slice,
    derives its shard from the same full matrix: sharded and single-process runs start equal.
    """
    gen = torch.Generator().manual_seed(seed)
    full = torch.empty(rows, cols, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
    return full


def mark_tensor_parallel(param: torch.nn.Parameter, *, dim: int) -> None:
    """Mark a LoRA half as split across TP along `dim` (megatron's attribute names)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def mark_sequence_parallel_partial(param: torch.nn.Parameter) -> None:
    """Mark a replicated LoRA half that only sees this rank's sequence-parallel token shard."""
    param.lora_tp_allreduce = True
    param.sequence_parallel = True
