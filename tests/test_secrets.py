"""Secrets stay secret and run folders are data: the CLI driven as a user drives it.

A token given by flag and one given by environment must reach the hub (the fake hub records
the Authorization header) and nowhere else: no file any command writes (run folder, wandb's
offline files, exports, the home folder) and nothing any command prints holds either one.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

from fake_hub_server import FakeHub  # tests/ is on sys.path (no __init__.py: pytest prepends it)

ROOT = Path(__file__).resolve().parents[1]
FLAG_TOKEN = "tok-flag-5e3c91d07a"
ENV_TOKEN = "tok-env-b82f4a6c13"


def _run(args, *, env_extra: dict, home: Path, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(home), "HF_HOME": str(home / "hf"),
           "WANDB_SILENT": "true"}
    for key in ("NPROC_PER_NODE", "NNODES", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "HF_TOKEN",
                "MODELSCOPE_API_TOKEN"):
        env.pop(key, None)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "megalora", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _files_holding(root: Path, secrets: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p}: {s}" for s in secrets if s.encode() in data]
    return hits


def _train_flags(assets, run: Path, steps: int) -> list[str]:
    return ["--model", str(assets.model_dir), "--dataset", f"{assets.data_file}#8", "--max_length", "256",
            "--micro_batch_size", "4", "--global_batch_size", "4", "--train_iters", str(steps), "--lr", "1e-3",
            "--save", str(run)]


def test_tokens_by_flag_and_environment_reach_the_hub_and_nothing_else(train_assets, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    outputs, auth = [], {}

    def sent(repo: str, since: int) -> None:
        """The Authorization headers of the requests since `since` (one command's; some side requests have none)."""
        auth[repo] = {r.headers["authorization"] for r in hub.requests[since:] if "authorization" in r.headers}

    with FakeHub(lifetime_s=1800) as hub:
        hf = {"HF_ENDPOINT": hub.url}
        since = len(hub.requests)
        # Launcher (torchrun relaunch), merged export at the end and its push, wandb offline: token by flag.
        launched = _run(["sft", *_train_flags(train_assets, tmp_path / "run", 2), "--merge_lora", "true",
                         "--push_to_hub", "alice/sft", "--hub", "huggingface", "--hub_token", FLAG_TOKEN,
                         "--report_to", "wandb", "--wandb_mode", "offline"],
                        env_extra={**hf, "NPROC_PER_NODE": "1"}, home=home)
        outputs.append(launched)
        assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
        assert "megalora: launching" in launched.stdout
        sent("alice/sft", since)
        since = len(hub.requests)
        # One process, token by flag, wandb offline (which records the command line).
        plain = _run(["sft", *_train_flags(train_assets, tmp_path / "run-flag", 1), "--merge_lora", "true",
                      "--push_to_hub", "alice/sft-flag", "--hub", "huggingface", "--hub_token", FLAG_TOKEN,
                      "--report_to", "wandb", "--wandb_mode", "offline"], env_extra=hf, home=home)
        outputs.append(plain)
        assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
        sent("alice/sft-flag", since)
        since = len(hub.requests)
        # Launcher, token by environment.
        launched_env = _run(["sft", *_train_flags(train_assets, tmp_path / "run-env", 1), "--merge_lora", "true",
                             "--push_to_hub", "alice/sft-env", "--hub", "huggingface"],
                            env_extra={**hf, "HF_TOKEN": ENV_TOKEN, "NPROC_PER_NODE": "1"}, home=home)
        outputs.append(launched_env)
        assert launched_env.returncode == 0, launched_env.stdout[-3000:] + launched_env.stderr[-3000:]
        sent("alice/sft-env", since)
        # Dry runs with each.
        for extra_flags, env in ((["--hub_token", FLAG_TOKEN], {}), ([], {"HF_TOKEN": ENV_TOKEN})):
            dry = _run(["sft", *_train_flags(train_assets, tmp_path / "dry", 1), "--hub", "huggingface",
                        "--push_to_hub", "alice/dry", *extra_flags, "--dry-run"], env_extra=env, home=home)
            outputs.append(dry)
            assert dry.returncode == 0 and "dry run: ok" in dry.stdout, dry.stdout[-2000:] + dry.stderr[-2000:]
        # `megalora export` of a checkpoint with a push, token by flag and by environment.
        for name, extra_flags, env in (("flag", ["--hub_token", FLAG_TOKEN], {}), ("env", [], {"HF_TOKEN": ENV_TOKEN})):
            since = len(hub.requests)
            exported = _run(["export", str(tmp_path / "run" / "checkpoint-2"), "--out", str(tmp_path / f"export-{name}"),
                             "--adapter", "--push_to_hub", f"alice/export-{name}", "--hub", "huggingface",
                             "--hub_endpoint", hub.url, *extra_flags], env_extra=env, home=home)
            outputs.append(exported)
            assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
            sent(f"alice/export-{name}", since)
    # Each token went to the hub: proof that it travelled (the flag's to the ranks by environment).
    assert auth["alice/sft"] == {f"Bearer {FLAG_TOKEN}"}
    assert auth["alice/sft-flag"] == {f"Bearer {FLAG_TOKEN}"}
    assert auth["alice/sft-env"] == {f"Bearer {ENV_TOKEN}"}
    assert auth["alice/export-flag"] == {f"Bearer {FLAG_TOKEN}"}
    assert auth["alice/export-env"] == {f"Bearer {ENV_TOKEN}"}
    assert set(hub.repos) == set(auth)
    for run in ("run", "run-flag"):
        assert list((tmp_path / run).glob("wandb/**/*.wandb")), f"wandb wrote no offline run in {run}"
    # ... and nowhere else.
    assert _files_holding(tmp_path, [FLAG_TOKEN, ENV_TOKEN]) == []
    for r in outputs:
        for secret in (FLAG_TOKEN, ENV_TOKEN):
            assert secret not in r.stdout and secret not in r.stderr


class _Marker:
    """Unpickling this creates the marker file: proof that a pickle from the run folder ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_planted_in_the_run_folder_is_never_executed(train_assets, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    run = tmp_path / "run"
    first = _run(["sft", *_train_flags(train_assets, run, 2)], env_extra={}, home=home)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    ckpt = run / (run / "latest").read_text().strip()
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(_Marker(marker))
    for name in ("rng/rank-0.pt", "optimizer.pt", "scheduler.pt", "trainer_state.pt", "training_args.bin",
                 "rng_state.pth"):
        (ckpt / name).write_bytes(payload)
    # Proof the payload works when unpickled (so that its absence below means something).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(probe)))
    assert probe.exists()
    resumed = _run(["sft", *_train_flags(train_assets, run, 3), "--resume", "latest"], env_extra={}, home=home)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert not marker.exists()


def test_help_recommends_the_environment_for_tokens(tmp_path):
    for command in ("sft", "export"):
        r = _run([command, "--help"], env_extra={}, home=tmp_path)
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        at = text.rindex("--hub_token")  # the option's own entry, after the usage line
        assert "MODELSCOPE_API_TOKEN" in text[at:at + 300] and "HF_TOKEN" in text[at:at + 300], text[at:at + 300]
