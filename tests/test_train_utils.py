"""Schedule, run folder, launch command and metrics sinks: the loop's small parts."""
import json
import math
import sys

import pytest

from megalora.train.launch import is_torchrun_worker, torchrun_command
from megalora.train.logging import Progress, make_sinks
from megalora.train.run_dir import (commit_checkpoint, list_checkpoints, prune_checkpoints, resolve_resume,
                                    tmp_checkpoint_dir)
from megalora.train.schedule import lr_at, warmup_steps


def test_warmup_then_cosine_reaches_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, total_steps=10, warmup=2, style="cosine")
    lrs = [lr_at(s, **kw) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0)
    # Cosine from lr at the end of warmup to min_lr at total_steps, monotone in between.
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lr_at(10, **kw) == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 8)))


def test_linear_and_constant_decay():
    assert lr_at(5, lr=1.0, min_lr=0.0, total_steps=10, warmup=0, style="linear") == pytest.approx(0.5)
    assert lr_at(7, lr=1.0, min_lr=0.0, total_steps=10, warmup=2, style="constant") == 1.0
    assert warmup_steps(total_steps=200, warmup_fraction=0.05, warmup_iters=0) == 10
    assert warmup_steps(total_steps=3, warmup_fraction=None, warmup_iters=10) == 3


def test_checkpoints_are_atomic_pruned_and_resolved(tmp_path):
    for step in (10, 20, 30):
        tmp = tmp_checkpoint_dir(tmp_path, step)
        tmp.mkdir()
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        commit_checkpoint(tmp_path, step)
    # A half-written checkpoint (crash mid-save) is never picked.
    tmp_checkpoint_dir(tmp_path, 40).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-30"
    assert [p.name for p in prune_checkpoints(tmp_path, 2)] == ["checkpoint-10"]
    assert resolve_resume(str(tmp_path / "checkpoint-20"), tmp_path).name == "checkpoint-20"
    with pytest.raises(ValueError, match="not a megalora checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-10"), tmp_path)
    with pytest.raises(ValueError, match="no checkpoint in"):
        resolve_resume("latest", tmp_path / "checkpoint-20")


def test_torchrun_relaunch_command():
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    cmd = torchrun_command(["configs/demo.yaml", "--lr", "1e-4"], env)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=8" in cmd and "--nnodes=2" in cmd and "--node_rank=1" in cmd
    assert "--master_addr=10.0.0.1" in cmd and "--master_port=1234" in cmd
    assert cmd[-5:] == ["megalora", "sft", "configs/demo.yaml", "--lr", "1e-4"]
    assert not is_torchrun_worker(env)
    assert is_torchrun_worker({**env, "TORCHELASTIC_RUN_ID": "x"})
    # One node without MASTER_PORT: a free port (standalone rendezvous), not a fixed default.
    single = torchrun_command(["--lr", "1e-4"], {"NPROC_PER_NODE": "2"})
    assert "--standalone" in single and not any(a.startswith("--master_port") for a in single)
    assert "--standalone" not in torchrun_command([], {"NPROC_PER_NODE": "2", "MASTER_PORT": "1234"})


def test_metrics_jsonl_on_rank0_only(tmp_path, capsys):
    sinks = make_sinks(rank=0, run_dir=tmp_path, report_to="none", wandb_project="p", wandb_mode="offline",
                       wandb_name=None, config={})
    sinks.log(1, {"loss": 2.5})
    sinks.log(2, {"loss": 2.0})
    sinks.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    other = make_sinks(rank=1, run_dir=tmp_path / "r1", report_to="wandb", wandb_project="p", wandb_mode="offline",
                       wandb_name=None, config={})
    other.log(1, {"loss": 1.0})
    assert not (tmp_path / "r1").exists()
    progress = Progress(total_steps=10, start_step=0, rank=0)
    progress.update(5, {"loss": 1.25, "lr": 1e-4, "tokens_per_s": 100.0})
    out = capsys.readouterr().out
    assert "step 5/10" in out and "loss 1.2500" in out and "eta" in out


def test_wandb_offline_run_records_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = make_sinks(rank=0, run_dir=tmp_path, report_to="wandb", wandb_project="p", wandb_mode="offline",
                       wandb_name="t", config={"lora_rank": 8})
    sinks.log(1, {"loss": 2.5, "grad_norm_probe": 0.125})
    sinks.close()
    records = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    assert b"grad_norm_probe" in data and b"lora_rank" in data
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["grad_norm_probe"] == 0.125


def test_a_new_run_sets_the_previous_one_aside(tmp_path):
    from megalora.train.recipe import set_aside_previous_run

    assert set_aside_previous_run(tmp_path) is None  # nothing there yet
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "meta.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "latest").write_text("checkpoint-5\n")
    (tmp_path / "notes.txt").write_text("mine")
    moved = set_aside_previous_run(tmp_path)
    assert moved is not None and moved.parent == tmp_path
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-5", "latest", "metrics.jsonl"]
    assert (moved / "checkpoint-5" / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([moved.name, "notes.txt"])
