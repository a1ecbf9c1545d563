"""Run a function on N local CPU processes joined by a gloo process group.

This is the harness of the multi-process tests: every rank is a fresh ``spawn``-ed
interpreter, so nothing leaks between calls, and every rank's failure comes back to the
caller with its traceback.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

# How long the surviving ranks get to report their own error once one rank failed. A rank
# that failed usually leaves its peers blocked in a collective, so this stays short.
_GRACE_AFTER_FAILURE_S = 5.0


class SpawnError(RuntimeError):
    """One or more ranks failed or timed out; the message holds every rank's report."""


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: Sequence[Any],
    env: Mapping[str, str],
    timeout: float,
    results: Any,
) -> None:
    """Body of one rank: set the environment, join the group, run ``fn``, report.

    The rendezvous store is the parent's, already listening on ``MASTER_PORT``.
    """
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        # The test machines have few cores shared by many ranks: one thread per rank
        # keeps ranks from oversubscribing them (and keeps timings predictable).
        torch.set_num_threads(1)
        from megalora.parallel import cpu_runtime

        cpu_runtime.install()
        limit = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=limit
        )
        dist.init_process_group(
            backend="gloo", store=store, rank=rank, world_size=world_size, timeout=limit
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            _teardown(dist)
        # Pickle here, not in the queue's feeder thread, so an unpicklable result is
        # reported as this rank's error instead of vanishing.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def _teardown(dist: Any) -> None:
    """Destroy megatron's groups (if megatron was used) and the default group."""
    if "megatron.core.parallel_state" in sys.modules:
        parallel_state = sys.modules["megatron.core.parallel_state"]
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _stop(processes: Sequence[Any]) -> None:
    """Terminate, then kill, every child still alive, and reap all of them."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    for proc in processes:
        proc.close()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes.

    Each child has ``MASTER_ADDR``/``MASTER_PORT`` (a fresh port per call, where this
    process hosts the rendezvous store for the duration of the call), ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE`` and ``OMP_NUM_THREADS=1`` set (plus ``env``), runs with one
    torch thread, has the CPU runtime for megatron-core installed and a gloo default
    process group initialised. Megatron's model-parallel state is not initialised.

    ``fn`` must be a picklable top-level function and return a picklable value.
    Returns the per-rank return values, in rank order. Raises ``SpawnError`` holding every
    failing rank's traceback if any rank raises or dies, or if the ranks have not all
    finished after ``timeout`` seconds; all children are gone when this returns or raises.
    """
    if world_size < 1:
        raise ValueError(f"spawn: world_size must be >= 1, got {world_size}")
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The parent hosts the rendezvous store on a port the OS picks, so the port is held
    # from the start: no window in which another process could take it.
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    base_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    processes = []
    try:
        for rank in range(world_size):
            child_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            proc = ctx.Process(
                target=_child,
                args=(fn, rank, world_size, tuple(args), child_env, timeout, results),
                daemon=True,
            )
            proc.start()
            processes.append(proc)
        values, errors = _collect(results, processes, timeout)
    finally:
        _stop(processes)
        results.close()
        results.join_thread()
        del store
    if errors:
        report = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(errors.items()))
        raise SpawnError(f"spawn: {len(errors)} of {world_size} ranks failed\n{report}")
    return [values[rank] for rank in range(world_size)]


def _collect(
    results: Any, processes: Sequence[Any], timeout: float
) -> tuple[dict[int, Any], dict[int, str]]:
    """Gather one report per rank until all came, one failed (plus a grace), or timeout."""
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    seen_dead: set[int] = set()
    while len(values) + len(errors) < len(processes):
        now = time.monotonic()
        if now >= deadline:
            break
        try:
            rank, ok, payload = results.get(timeout=min(0.2, deadline - now))
        except queue.Empty:
            _note_dead_ranks(processes, values, errors, seen_dead)
            if errors:
                # A rank died without a report or failed: its peers may hang forever.
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
            continue
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    for rank in range(len(processes)):
        if rank not in values and rank not in errors:
            errors[rank] = (
                f"no result after {timeout:.0f}s timeout"
                if not errors
                else "killed: another rank failed first"
            )
    return values, errors


def _note_dead_ranks(
    processes: Sequence[Any],
    values: dict[int, Any],
    errors: dict[int, str],
    seen_dead: set[int],
) -> None:
    """Record ranks whose process exited without ever reporting (e.g. killed by a signal)."""
    for rank, proc in enumerate(processes):
        if rank in values or rank in errors or proc.is_alive():
            continue
        # The report may still be in flight in the queue's pipe: allow it one more poll.
        if rank in seen_dead:
            errors[rank] = f"process exited with code {proc.exitcode} without a result"
        else:
            seen_dead.add(rank)
