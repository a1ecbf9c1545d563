"""SIGTERM / SIGINT: finish the current step, save, exit cleanly.

The handler only records the request; the loop asks `should_stop()` after each step and
after each save, and all ranks agree (one rank's signal stops every rank at the same step).
`die_with_parent` has the kernel kill a process when its parent dies (Linux), so neither
torchrun nor a rank outlives the command that started it.
`pause_point` is inert unless a fault test names one of its points in `MEGALORA_TEST_PAUSE`.
"""
from __future__ import annotations

import os
import signal
import sys

from pathlib import Path

import torch
import torch.distributed as dist


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self.agreed: int | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            # A second Ctrl-C means now.
            raise KeyboardInterrupt
        self.signum = signum

    def should_stop(self) -> bool:
        """Whether any rank was signalled (a collective: every rank calls it at the same point);
        `agreed` is then the signal's number, the same on every rank."""
        # A CPU flag on purpose: the default group carries CPU tensors over gloo.
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.agreed = int(flag.item())
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `signum` to this process when its parent exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)
    if os.getppid() == 1:  # the parent was already gone before the request took effect
        os.kill(os.getpid(), signum)


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return found


PAUSE_ENV = "MEGALORA_TEST_PAUSE"


def pause_point(name: str, *, rank: int) -> None:
    """For the fault tests: with `MEGALORA_TEST_PAUSE="<name>:<folder>"`, rank 0 reaching point
    `name` (`step-<n>`: between the backward and the optimizer step of step n; `save-<n>`: inside
    the save of checkpoint-n, its adapter file written, the rest not) creates `<folder>/paused`
    and waits until `<folder>/go` exists. It only waits, so a test can send a real signal at a
    chosen moment without timing; signal handlers run while it waits."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec or rank != 0:
        return
    point, _, folder = spec.partition(":")
    if point != name:
        return
    import time

    Path(folder, "paused").touch()
    while not Path(folder, "go").exists():
        time.sleep(0.05)
