"""Where `megalora sft` runs: relaunch under torchrun, or train in this process.

Like ms-swift, `sft` relaunches itself under torchrun when `NPROC_PER_NODE` (and `NNODES`,
`NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`) are set and it is not already a torchrun worker.
Under torchrun, or with none of those set, it trains here.

Launch environments understood (`launch_env`):
- torchrun workers: `WORLD_SIZE` is the number of ranks.
- ms-swift's variables: world = `NPROC_PER_NODE` x `NNODES`; `NODE_RANK` < `NNODES`; `MASTER_ADDR`
  needed when `NNODES` > 1.
- Alibaba Cloud DLC (and PyTorchJob) convention: `WORLD_SIZE` is the node count and `RANK` the node
  rank; scripts pass `NNODES=$WORLD_SIZE NODE_RANK=$RANK`. `WORLD_SIZE` equal to `NNODES` is read
  that way; one that is neither the node count nor the rank count is named as inconsistent.
- SLURM: `SLURM_NNODES` / `SLURM_NODEID` stand in for `NNODES` / `NODE_RANK` when those are unset,
  and must agree with them when both are set.

One node without `MASTER_PORT` uses torchrun's standalone mode (a free port); secrets
(`--hub_token`) reach the ranks through the environment, never their command line.

Signals and failures (`run_job`): SIGTERM/SIGINT to the command are forwarded to the ranks, which
finish their step, save and exit; the command returns after that, or kills the job once
`stop_grace_period` has passed and says so in one line. Killing the command (SIGKILL) kills
torchrun and the ranks at once (parent-death signals): nothing is left running and nothing is
half-written, `--resume latest` takes the last complete checkpoint. torchrun runs under
`python -m megalora.train.launch`, which turns its failure report (a traceback around
`ChildFailedError`) into one line naming the failed ranks; their own messages come before it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megalora.config import ConfigError, split_secret_flags
from megalora.export.push import HUBS
from megalora.train.run_dir import read_latest, resolve_resume
from megalora.train.signals import child_pids, die_with_parent


@dataclass(frozen=True)
class LaunchEnv:
    world_size: int
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: str | None  # None: not given (one node then takes a free port)
    torchrun_worker: bool
    relaunch: bool  # NPROC_PER_NODE set outside torchrun: `sft` starts torchrun itself


def is_torchrun_worker(env: dict) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def _int(env: dict, name: str, *, minimum: int) -> int | None:
    if name not in env or env[name] == "":
        return None
    try:
        value = int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def launch_env(env: dict) -> LaunchEnv:
    """The launch these environment variables describe, or ConfigError naming the inconsistent one."""
    addr, port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT") or None
    if is_torchrun_worker(env):
        world = _int(env, "WORLD_SIZE", minimum=1)
        return LaunchEnv(world, _int(env, "LOCAL_WORLD_SIZE", minimum=1) or world, _int(env, "GROUP_WORLD_SIZE", minimum=1) or 1,
                         0, addr, port, torchrun_worker=True, relaunch=False)
    nproc = _int(env, "NPROC_PER_NODE", minimum=1)
    nnodes = _int(env, "NNODES", minimum=1)
    node_rank = _int(env, "NODE_RANK", minimum=0)
    for ours, slurm in (("NNODES", "SLURM_NNODES"), ("NODE_RANK", "SLURM_NODEID")):
        value = _int(env, slurm, minimum=0)
        mine = nnodes if ours == "NNODES" else node_rank
        if value is not None and mine is not None and value != mine:
            raise ConfigError(f"{ours}={mine} disagrees with SLURM's {slurm}={value}: drop {ours} or make them agree")
        if value is not None and mine is None and nproc is not None:
            if ours == "NNODES":
                nnodes = value
            else:
                node_rank = value
    world_env = _int(env, "WORLD_SIZE", minimum=1)
    if nproc is None:
        if nnodes not in (None, 1):
            raise ConfigError(f"NNODES={nnodes} is set but NPROC_PER_NODE is not: set NPROC_PER_NODE (GPUs per node)")
        world = world_env or 1
        return LaunchEnv(world, world, 1, 0, addr, port, torchrun_worker=False, relaunch=False)
    if nnodes is None:
        if world_env not in (None, nproc):
            raise ConfigError(f"WORLD_SIZE={world_env} is set but NNODES is not: under DLC-style launchers WORLD_SIZE "
                              f"is the node count, so pass NNODES=$WORLD_SIZE NODE_RANK=$RANK (or unset WORLD_SIZE)")
        nnodes = 1
    world = nproc * nnodes
    if world_env is not None and world_env not in (nnodes, world):
        raise ConfigError(f"WORLD_SIZE={world_env} is neither the node count NNODES={nnodes} (DLC convention) nor "
                          f"NPROC_PER_NODE x NNODES = {world}")
    node_rank = 0 if node_rank is None else node_rank
    if node_rank >= nnodes:
        raise ConfigError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    if nnodes > 1 and "MASTER_ADDR" not in env:
        raise ConfigError(f"NNODES={nnodes} needs MASTER_ADDR (the address of node 0) on every node")
    return LaunchEnv(world, nproc, nnodes, node_rank, addr, port, torchrun_worker=False, relaunch=True)


def torchrun_command(argv: list[str], launch: LaunchEnv) -> list[str]:
    # SIGTERM/SIGINT are left to `torchrun_main` (torchrun's own handling kills the ranks 30 s later).
    cmd = [sys.executable, "-m", "megalora.train.launch", f"--nproc_per_node={launch.nproc_per_node}",
           "--signals_to_handle=SIGHUP,SIGQUIT"]
    if launch.nnodes == 1 and launch.master_port is None:
        # One node and no port asked for: torchrun's standalone rendezvous takes a free port, so
        # two runs on one machine never collide on a default one.
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={launch.nnodes}", f"--node_rank={launch.node_rank}",
                f"--master_addr={launch.master_addr}", f"--master_port={launch.master_port or '29500'}"]
    return cmd + ["-m", "megalora", "sft", *argv]


def run_sft(cfg, extras, *, config_path: str | None, argv: list[str]) -> int:
    env = dict(os.environ)
    launch = launch_env(env)
    if launch.relaunch:
        # A token travels to the ranks in the hub's environment variable, never on a command line.
        argv, secrets = split_secret_flags(argv)
        # DLC sets WORLD_SIZE / RANK to node values; torchrun sets its own for each worker.
        env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK")}
        if secrets.get("hub_token"):
            env[HUBS[cfg.export.hub]] = secrets["hub_token"]
        if cfg.checkpoint.resume is not None:
            # Refused here in one line, rather than by every rank after the launch.
            resolve_resume(cfg.checkpoint.resume, Path(cfg.checkpoint.save))
        cmd = torchrun_command(argv, launch)
        print("megalora: launching " + " ".join(cmd[1:]), flush=True)
        return run_job(cmd, env=env, grace_s=cfg.checkpoint.stop_grace_period, run_dir=Path(cfg.checkpoint.save))
    # The ranks' code (megatron-core, transformers) is imported by the ranks only: the launcher
    # process never needs it.
    from megalora.train.recipe import train

    if is_torchrun_worker(env):
        # torchrun gone means no one coordinates this rank any more: it stops at once (checkpoints
        # are atomic, so a save cut short leaves only a `.tmp-*` folder, removed at the next start).
        die_with_parent()
    return train(cfg, extras)


def run_job(cmd: list[str], *, env: dict, grace_s: float, run_dir: Path) -> int:
    """Run torchrun and wait for it. SIGTERM/SIGINT here go straight to its ranks: they finish the
    step, save and exit, and this waits for that up to `grace_s` seconds (or a second signal)
    before killing the job and saying so in one line. torchrun gets a parent-death
    signal, and its ranks one from it, so nothing outlives this process."""
    # Its own session: a terminal's Ctrl-C or a process-group kill reaches only this process,
    # which forwards it once, in order.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    stop_at: list[float] = []
    killed: list[str] = []

    def kill_job(why: str) -> None:
        killed.append(why)
        for pid in [*child_pids(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def forward(signum, frame) -> None:
        name = signal.Signals(signum).name
        if stop_at:
            print(f"megalora: {name} again: killing the job now", flush=True)
            kill_job(f"got a second {name}")
            return
        stop_at.append(time.monotonic())
        for pid in child_pids(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # Said once the ranks have the signal: they finish their step, save and exit.
        print(f"megalora: {name}: the ranks finish their step, save and exit (waiting up to {grace_s:g}s = "
              "stop_grace_period; signal again to kill now)", flush=True)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                # A bounded wait: a signal handled during it does not end it, and the grace period
                # is counted here.
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop_at and not killed and time.monotonic() - stop_at[0] > grace_s:
                    kill_job(f"did not stop within stop_grace_period={grace_s:g}s")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if killed:
        latest = read_latest(run_dir)
        last = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was completed"
        sys.stderr.write(f"megalora sft: error: the job {killed[0]}: its ranks were killed; {last} "
                         "(--resume latest continues from it)\n")
        return 1
    return code


def torchrun_main(args: list[str]) -> int:
    """torchrun, with its failure report said in one line: which ranks failed and how (each rank
    printed its own error above). SIGTERM/SIGINT to it (systemd stopping a service signals every
    process of it) go to the ranks like the command's, and torchrun keeps waiting for them:
    only the command's `stop_grace_period`, not torchrun's own 30 s, decides when they are killed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    def forward(signum, frame) -> None:
        for pid in child_pids(os.getpid()):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        how = []
        for rank, failure in sorted(e.failures.items()):
            code = failure.exitcode
            how.append(f"rank {rank} was killed by {failure.signal_name()}" if code < 0 else
                       f"rank {rank} exited with {code}")
        sys.stderr.write(f"megalora sft: error: {', '.join(how)}; the ranks' messages are above\n")
        return 1
    except SignalException as e:
        sys.stderr.write(f"megalora sft: error: torchrun got {e.sigval.name} and stopped the ranks\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
