"""Where `megalora sft` runs: relaunch under torchrun, or train in this process.

Like ms-swift, `sft` relaunches itself under torchrun when `NPROC_PER_NODE` (and
`NNODES`, `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`) are set and it is not already a
torchrun worker. One node without `MASTER_PORT` uses torchrun's standalone mode (a free port);
secrets (`--hub_token`) reach the ranks through the environment, never their command line. Under torchrun, or with none of those set, it trains here.
"""
from __future__ import annotations

import os
import subprocess
import sys


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
        return subprocess.call(cmd, env=env)
    from megalora.train.recipe import train

    return train(cfg, extras)
