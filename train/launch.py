"""Where `megalora sft` runs: relaunch under torchrun, or train in this process.

Like ms-swift, `sft` relaunches itself under torchrun when `NPROC_PER_NODE` (and
`NNODES`, `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`) are set and it is not already a
torchrun worker. One node without `MASTER_PORT` uses torchrun's standalone mode (a free port);
secrets (`--hub_token`) reach the ranks through the environment, never their command line.
Under torchrun, or with none of those set, it trains here.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def torchrun_command(argv: list[str], env: dict) -> list[str]:
    nproc = env["NPROC_PER_NODE"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if env.get("NNODES", "1") == "1" and "MASTER_PORT" not in env:
        # One node and no port asked for: torchrun's standalone rendezvous takes a free port, so
        # two runs on one machine never collide on a default one.
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={env.get('NNODES', '1')}", f"--node_rank={env.get('NODE_RANK', '0')}",
                f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}", f"--master_port={env.get('MASTER_PORT', '29500')}"]
    return cmd + ["-m", "megalora", "sft", *argv]


def is_torchrun_worker(env: dict) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def run_sft(cfg, extras, *, config_path: str | None, argv: list[str]) -> int:
    env = dict(os.environ)
    if "NPROC_PER_NODE" in env and not is_torchrun_worker(env):
        from megalora.config import split_secret_flags
        from megalora.export.push import HUBS

        # A token travels to the ranks in the hub's environment variable, never on a command line.
        argv, secrets = split_secret_flags(argv)
        if secrets.get("hub_token"):
            env[HUBS[cfg.export.hub]] = secrets["hub_token"]
        cmd = torchrun_command(argv, env)
        print("megalora: launching " + " ".join(cmd[1:]), flush=True)
        return run_job(cmd, env=env, grace_s=cfg.checkpoint.stop_grace_period)
    from megalora.train.recipe import train

    if is_torchrun_worker(env):
        from megalora.train.signals import die_with_parent

        die_with_parent()
    return train(cfg, extras)


def run_job(cmd: list[str], *, env: dict, grace_s: float) -> int:
    """Run torchrun and wait for it. SIGTERM/SIGINT here go straight to its ranks (torchrun itself
    would kill them 30 s later): they finish the step, save and exit, and this waits for that up
    to `grace_s` seconds (or a second signal) before killing the job. torchrun gets a parent-death
    signal, and its ranks one from it, so nothing outlives this process."""
    from megalora.train.signals import child_pids, die_with_parent

    # Its own session: a terminal's Ctrl-C or a process-group kill reaches only this process,
    # which forwards it once, in order.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    stop_at: list[float] = []

    def kill_job() -> None:
        for pid in [*child_pids(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def forward(signum, frame) -> None:
        if stop_at:
            print(f"megalora: signal {signum} again: killing the job now", flush=True)
            kill_job()
            return
        stop_at.append(time.monotonic())
        print(f"megalora: signal {signum}: the ranks finish their step, save and exit (waiting up to {grace_s:g}s "
              "= stop_grace_period; signal again to kill now)", flush=True)
        for pid in child_pids(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return proc.wait(timeout=1.0 if stop_at else None)
            except subprocess.TimeoutExpired:
                if time.monotonic() - stop_at[0] > grace_s:
                    print(f"megalora: the job did not stop within stop_grace_period={grace_s:g}s; killing it",
                          flush=True)
                    kill_job()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
