"""`ParallelDims`: the parallel layout of one rank, created once and passed to whoever needs it.

    dims = groups.initialize(tp=2, ep=2)       # sizes checked, groups made, this rank placed
    model, info = build_model(model_dir, dims=dims)

Sizes: ``tp`` (tensor), ``ep`` (expert), ``etp`` (tensor inside experts), ``pp`` (pipeline,
always 1), ``dp = world_size / tp`` and ``expert_dp = world_size / (ep * etp)``. Ranks follow
megatron's order ``tp-cp-ep-dp-pp`` (context and pipeline parallel fixed at 1):

    dense grid   rank = tp_rank + tp * dp_rank
    expert grid  rank = etp_rank + etp * (ep_rank + ep * expert_dp_rank)

Megatron's own modules keep reading its global parallel state; our code reads this object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megalora.config import check_parallel_sizes


@dataclass(frozen=True)
class ProcessGroups:
    """The torch.distributed groups of one rank (None in a one-process world without groups)."""

    tp: Any = None
    dp: Any = None
    ep: Any = None
    etp: Any = None
    expert_dp: Any = None


@dataclass(frozen=True)
class ParallelDims:
    """Sizes, this rank's coordinates, sequence parallel, process groups and device."""

    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    world_size: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    groups: ProcessGroups = field(default_factory=ProcessGroups, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_parallel_sizes(tp=self.tp, ep=self.ep, etp=self.etp, pp=self.pp, world_size=self.world_size,
                             sequence_parallel=self.sequence_parallel)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of {self.world_size}")

    @property
    def dp(self) -> int:
        """Data-parallel size: ranks that see different samples."""
        return self.world_size // self.tp

    @property
    def expert_dp(self) -> int:
        """Expert-data-parallel size: ranks holding the same experts."""
        return self.world_size // (self.ep * self.etp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def etp_rank(self) -> int:
        return self.rank % self.etp

    @property
    def ep_rank(self) -> int:
        return (self.rank // self.etp) % self.ep

    @property
    def expert_dp_rank(self) -> int:
        return self.rank // (self.etp * self.ep)

    def coordinates(self) -> dict[str, int]:
        """This rank's place on every axis (the rows of `groups.layout`, without experts)."""
        return {"rank": self.rank, "tp_rank": self.tp_rank, "dp_rank": self.dp_rank, "ep_rank": self.ep_rank,
                "etp_rank": self.etp_rank, "expert_dp_rank": self.expert_dp_rank}

    def signature(self) -> dict[str, Any]:
        """The layout as a checkpoint records it (equal signatures: same shards on every rank)."""
        return {"world_size": self.world_size, "tp": self.tp, "ep": self.ep, "dp": self.dp,
                "sequence_parallel": self.sequence_parallel}
