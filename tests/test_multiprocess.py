"""The multi-process harness: results, every failing rank's traceback, kills, no leaks."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from megalora.parallel.multiprocess import SpawnError, spawn


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


def _misbehave(rank: int, world_size: int, pid_dir: str) -> Any:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    if rank == 0:
        raise ValueError("rank zero refuses")
    if rank == 1:
        return lambda: None  # not picklable
    time.sleep(600)  # rank 2 hangs, as a rank waiting on a dead peer would


def _sleep(rank: int, world_size: int, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def _assert_gone(pid_dir: Path, world_size: int) -> None:
    assert multiprocessing.active_children() == []
    for rank in range(world_size):
        pid = int((pid_dir / f"{rank}.pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


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
    assert multiprocessing.active_children() == []
    # Nothing listens on the rendezvous port any more (TIME_WAIT leftovers are allowed).
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", results[0]["port"]))
        sock.listen()


def test_reports_every_failing_rank_and_kills_the_rest(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(SpawnError) as info:
        spawn(_misbehave, 3, args=(str(tmp_path),), timeout=120)
    message = str(info.value)
    assert "3 of 3 ranks failed" in message
    assert "--- rank 0 ---" in message and "ValueError: rank zero refuses" in message
    assert 'in _misbehave' in message  # the traceback, not only the message
    assert "--- rank 1 ---" in message and "pickle" in message.lower()
    assert "--- rank 2 ---" in message and "killed" in message
    assert time.monotonic() - start < 100  # the hanging rank did not hold us to the timeout
    _assert_gone(tmp_path, 3)


def test_timeout_kills_all_ranks(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(SpawnError, match="no result after 15s timeout"):
        spawn(_sleep, 2, args=(str(tmp_path),), timeout=15)
    assert time.monotonic() - start < 60
    _assert_gone(tmp_path, 2)


def test_rejects_an_empty_world() -> None:
    with pytest.raises(ValueError, match="world_size"):
        spawn(_describe, 0)
