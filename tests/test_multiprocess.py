"""The multi-process harness: results, every failing rank's traceback, kills, no leaks."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from support.multiprocess import SpawnError, spawn


def _describe(rank: int, world_size: int, offset: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from megalora.parallel import cpu_runtime

    total = torch.tensor([float(rank + offset)])
    dist.all_reduce(total)
    return {
        "rank": rank,
        "world_size": world_size,
        "env_rank": int(os.environ["RANK"]),
        "env_world": int(os.environ["WORLD_SIZE"]),
        "port": int(os.environ["MASTER_PORT"]),
        "extra": os.environ.get("MEGALORA_TEST_FLAG"),
        "backend": dist.get_backend(),
        "sum": total.item(),
        "threads": torch.get_num_threads(),
        "omp": os.environ["OMP_NUM_THREADS"],
        "runtime": cpu_runtime.is_active(),
        "pid": os.getpid(),
    }


def _misbehave(rank: int, world_size: int) -> Any:
    if rank == 0:
        raise ValueError("rank zero refuses")
    if rank == 1:
        return lambda: None  # not picklable
    time.sleep(600)  # rank 2 hangs, as a rank waiting on a dead peer would


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(600)


def _child_processes() -> list[str]:
    """Our direct children (zombies included), except multiprocessing's resource tracker."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == os.getpid() and "resource_tracker" not in cmdline:
            found.append(f"{stat.parent.name} {fields[0]} {cmdline[:80]}")
    return found


def _assert_no_children() -> None:
    assert multiprocessing.active_children() == []
    assert _child_processes() == []


def test_returns_each_ranks_value_in_rank_order() -> None:
    results = spawn(_describe, 2, args=(10,), env={"MEGALORA_TEST_FLAG": "on"}, timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert (r["env_rank"], r["world_size"], r["env_world"]) == (r["rank"], 2, 2)
        assert r["backend"] == "gloo"
        assert r["sum"] == 10 + 11
        assert r["extra"] == "on"
        assert (r["threads"], r["omp"]) == (1, "1")
        assert r["runtime"] is True
    _assert_no_children()
    # Nothing listens on the rendezvous port any more (TIME_WAIT leftovers are allowed).
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", results[0]["port"]))
        sock.listen()


def test_reports_every_failing_rank_and_kills_the_rest() -> None:
    start = time.monotonic()
    with pytest.raises(SpawnError) as info:
        spawn(_misbehave, 3, timeout=120)
    message = str(info.value)
    assert "3 of 3 ranks failed" in message
    assert "--- rank 0 ---" in message and "ValueError: rank zero refuses" in message
    assert 'in _misbehave' in message  # the traceback, not only the message
    assert "--- rank 1 ---" in message and "pickle" in message.lower()
    assert "--- rank 2 ---" in message and "killed" in message
    assert time.monotonic() - start < 100  # the hanging rank did not hold us to the timeout
    _assert_no_children()


def test_timeout_kills_all_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(SpawnError, match="no result after 10s timeout"):
        spawn(_sleep, 2, timeout=10)
    assert time.monotonic() - start < 40
    _assert_no_children()


def test_rejects_an_empty_world() -> None:
    with pytest.raises(ValueError, match="world_size"):
        spawn(_describe, 0)
