"""Process groups: tensor (TP, with optional sequence parallel), expert (EP) and data (DP).

``initialize`` brings up torch.distributed (if needed) and megatron-core's parallel state and
returns this rank's `ParallelDims` (sizes, coordinates, groups, device; see
`megalora.parallel.dims` for the rank order); ``layout`` states, as a pure function, which
rank lands where. Context and pipeline parallel are fixed at 1; the expert grid has its own
tensor-parallel degree ``etp`` (1 by default), so TP groups are runs of ``tp`` consecutive
ranks and, with ``etp=1``, EP groups runs of ``ep`` ranks.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megalora.config import ModelShape, check_parallel_sizes
from megalora.parallel import cpu_runtime
from megalora.parallel.dims import ParallelDims, ProcessGroups

_BACKENDS = ("auto", "gloo", "nccl")
_DEVICES = ("auto", "cpu", "cuda")
# The ParallelDims `initialize` made, for callers that were not handed one (tests, quick checks).
_current: ParallelDims | None = None


def layout(
    world_size: int, *, tp: int, ep: int, num_experts: int, etp: int = 1
) -> list[dict[str, Any]]:
    """Describe every global rank: its TP/DP/EP/expert-TP/expert-DP ranks and its experts.

    Each row has ``rank``, ``tp_rank``, ``dp_rank``, ``ep_rank``, ``etp_rank``,
    ``expert_dp_rank`` and ``experts`` (global expert ids, in local order: local expert
    ``i`` is ``experts[i]``). ``num_experts=0`` describes a dense model.
    """
    check_parallel_sizes(tp=tp, ep=ep, etp=etp, world_size=world_size,
                         model=ModelShape(num_experts=num_experts, num_attention_heads=0, num_query_groups=0,
                                          source="the model"))
    num_local = num_experts // ep
    rows = []
    for rank in range(world_size):
        row = ParallelDims(tp=tp, ep=ep, etp=etp, world_size=world_size, rank=rank).coordinates()
        first = row["ep_rank"] * num_local
        rows.append({**row, "experts": list(range(first, first + num_local))})
    return rows


def _device(device: str) -> torch.device:
    if device.partition(":")[0] not in _DEVICES:
        raise ValueError(f"device={device!r}: expected one of {', '.join(_DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available on this machine")
    if ":" in device:
        return torch.device(device)
    # The rank's own GPU, chosen from LOCAL_RANK when the default group started.
    return torch.device("cuda", torch.cuda.current_device())


def initialize(
    *,
    tp: int = 1,
    ep: int = 1,
    sequence_parallel: bool = False,
    backend: str = "auto",
    seed: int = 1234,
    etp: int = 1,
    timeout_minutes: float = 30.0,
    device: str = "auto",
) -> ParallelDims:
    """Initialise torch.distributed (if not yet) and megatron's model-parallel groups; return
    this rank's `ParallelDims`, the one description of the layout the rest of the code reads.

    torch.distributed is started from ``RANK``/``WORLD_SIZE`` (and ``MASTER_ADDR``/``PORT``)
    when set, else as a one-process world, with the backend of ``default_group_backend``.
    Pipeline and context parallel are 1; expert tensor parallel is ``etp``.
    Megatron's RNG tracker is seeded with ``seed`` (dropout and init draw from it).
    ``device``: ``auto`` (this rank's GPU when CUDA is available, else the CPU), ``cpu`` or ``cuda``.
    """
    global _current
    check_parallel_sizes(tp=tp, ep=ep, etp=etp, sequence_parallel=sequence_parallel)
    cpu_runtime.install()
    if not dist.is_initialized():
        _init_default_group(backend, timeout_minutes=timeout_minutes)
    world_size = dist.get_world_size()
    check_parallel_sizes(tp=tp, ep=ep, etp=etp, world_size=world_size)

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        # Megatron's groups get the same limit (its timedelta takes fractional minutes too).
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    groups = ProcessGroups(tp=ps.get_tensor_model_parallel_group(), dp=ps.get_data_parallel_group(),
                           ep=ps.get_expert_model_parallel_group(), etp=ps.get_expert_tensor_parallel_group(),
                           expert_dp=ps.get_expert_data_parallel_group())
    dims = ParallelDims(tp=tp, ep=ep, etp=etp, world_size=world_size, rank=dist.get_rank(),
                        sequence_parallel=sequence_parallel, device=_device(device), groups=groups)
    # Our rank formula and megatron's groups must agree, or every shard we read is wrong.
    assert dims.coordinates() == {
        "rank": dist.get_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(), "ep_rank": ps.get_expert_model_parallel_rank(),
        "etp_rank": ps.get_expert_tensor_parallel_rank(), "expert_dp_rank": ps.get_expert_data_parallel_rank(),
    }, "megatron's rank order differs from ParallelDims'"
    _current = dims
    return dims


def current() -> ParallelDims:
    """The `ParallelDims` of the last `initialize` (a one-process world is initialised when
    there is none). For callers that were not handed one; the training, verify and export
    paths pass theirs explicitly."""
    if _current is None or not ps.model_parallel_is_initialized():
        return initialize()
    return _current


def default_group_backend(backend: str, *, cuda: bool) -> str:
    """The backend string for ``init_process_group``.

    With CUDA, ``auto`` and ``nccl`` give the two-device group ``cpu:gloo,cuda:nccl``: model
    tensors (activations, LoRA gradients) travel over NCCL, and the step's bookkeeping
    scalars, which stay on the CPU on purpose (token counts, loss sums, grad-norm partial
    sums, the stop flag, checkpoint objects), over gloo. NCCL alone refuses CPU tensors.
    ``gloo`` sends everything over gloo, so several ranks can share one GPU (a one-GPU
    machine can run TP, SP and EP on CUDA tensors). Without CUDA only gloo exists.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"distributed_backend={backend!r}: expected one of {', '.join(_BACKENDS)}")
    if backend == "gloo" or (backend == "auto" and not cuda):
        return "gloo"
    if not cuda:
        raise ValueError("distributed_backend=nccl needs CUDA, and none is available here; use auto or gloo")
    return "cpu:gloo,cuda:nccl"


def _init_default_group(backend: str, *, timeout_minutes: float = 30.0) -> None:
    # A collective waiting on a dead or hung peer fails after this, on every rank, instead of hanging.
    timeout = datetime.timedelta(minutes=timeout_minutes)
    cuda = torch.cuda.is_available()
    name = default_group_backend(backend, cuda=cuda)
    if cuda:
        # Ranks beyond the GPU count share GPUs (only gloo allows that; NCCL refuses two
        # ranks on one device).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=name, timeout=timeout)
        return
    # A one-process world needs no rendezvous: an in-memory store avoids taking a port.
    dist.init_process_group(backend=name, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def destroy() -> None:
    """Tear down megatron's groups and the default process group (each if present)."""
    global _current
    _current = None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
