"""Process groups: tensor (TP, with optional sequence parallel), expert (EP) and data (DP).

``initialize`` brings up torch.distributed (if needed) and megatron-core's parallel state;
``layout`` states, as a pure function, which rank lands where. Both use megatron's rank
order ``tp-cp-ep-dp-pp`` with context and pipeline parallel fixed at 1; the expert grid
has its own tensor-parallel degree ``etp`` (1 by default):

    dense grid   rank = tp_rank + tp * dp_rank
    expert grid  rank = etp_rank + etp * (ep_rank + ep * expert_dp_rank)

so TP groups are runs of ``tp`` consecutive ranks and, with ``etp=1``, EP groups runs of
``ep`` ranks.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megalora.parallel import cpu_runtime

_BACKENDS = ("auto", "gloo", "nccl")


def _check_degrees(world_size: int, *, tp: int, ep: int, etp: int = 1) -> None:
    if tp < 1 or ep < 1 or etp < 1:
        raise ValueError(
            f"tensor_model_parallel_size={tp}, expert_model_parallel_size={ep} and "
            f"expert_tensor_parallel_size={etp} must be >= 1"
        )
    if world_size % tp:
        raise ValueError(
            f"tensor_model_parallel_size={tp} does not divide the world size {world_size}"
        )
    if world_size % (ep * etp):
        raise ValueError(
            f"expert_model_parallel_size={ep} x expert_tensor_parallel_size={etp} does not "
            f"divide the world size {world_size}"
        )


def layout(
    world_size: int, *, tp: int, ep: int, num_experts: int, etp: int = 1
) -> list[dict[str, Any]]:
    """Describe every global rank: its TP/DP/EP/expert-TP/expert-DP ranks and its experts.

    Each row has ``rank``, ``tp_rank``, ``dp_rank``, ``ep_rank``, ``etp_rank``,
    ``expert_dp_rank`` and ``experts`` (global expert ids, in local order: local expert
    ``i`` is ``experts[i]``). ``num_experts=0`` describes a dense model.
    """
    _check_degrees(world_size, tp=tp, ep=ep, etp=etp)
    if num_experts and num_experts % ep:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by expert_model_parallel_size={ep}"
        )
    if not num_experts and ep > 1:
        raise ValueError(f"expert_model_parallel_size={ep} needs a model with experts")
    num_local = num_experts // ep
    rows = []
    for rank in range(world_size):
        ep_rank = (rank // etp) % ep
        rows.append(
            {
                "rank": rank,
                "tp_rank": rank % tp,
                "dp_rank": rank // tp,
                "ep_rank": ep_rank,
                "etp_rank": rank % etp,
                "expert_dp_rank": rank // (etp * ep),
                "experts": list(range(ep_rank * num_local, (ep_rank + 1) * num_local)),
            }
        )
    return rows


def initialize(
    *,
    tp: int = 1,
    ep: int = 1,
    sequence_parallel: bool = False,
    backend: str = "auto",
    seed: int = 1234,
    etp: int = 1,
    timeout_minutes: float = 30.0,
) -> dict[str, Any]:
    """Initialise torch.distributed (if not yet) and megatron's model-parallel groups.

    torch.distributed is started from ``RANK``/``WORLD_SIZE`` (and ``MASTER_ADDR``/``PORT``)
    when set, else as a one-process world, with the backend of ``default_group_backend``.
    Pipeline and context parallel are 1; expert tensor parallel is ``etp``.
    Megatron's RNG tracker is seeded with ``seed`` (dropout and init draw from it).

    Returns this rank's row of ``layout`` (without ``experts``), plus ``world_size``,
    ``tp``, ``ep``, ``etp``, ``dp`` and ``sequence_parallel``.
    """
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel=true needs tensor_model_parallel_size > 1")
    cpu_runtime.install()
    if not dist.is_initialized():
        _init_default_group(backend, timeout_minutes=timeout_minutes)
    world_size = dist.get_world_size()
    _check_degrees(world_size, tp=tp, ep=ep, etp=etp)

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        # Megatron's groups get the same limit (its timedelta takes fractional minutes too).
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    rank = dist.get_rank()
    return {
        "rank": rank,
        "world_size": world_size,
        "tp": tp,
        "ep": ep,
        "etp": etp,
        "dp": world_size // tp,
        "sequence_parallel": sequence_parallel,
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "ep_rank": parallel_state.get_expert_model_parallel_rank(),
        "etp_rank": parallel_state.get_expert_tensor_parallel_rank(),
        "expert_dp_rank": parallel_state.get_expert_data_parallel_rank(),
    }


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
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
