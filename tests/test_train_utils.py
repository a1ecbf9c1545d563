"""Schedule, run folder, launch command and metrics sinks: the loop's small parts."""
import json
import math
import sys

import pytest

from megalora.train.launch import is_torchrun_worker, launch_env, torchrun_command
from megalora.train.logging import Progress, make_sinks
from megalora.train.run_dir import (clean_partial, commit_checkpoint, file_checksums, list_checkpoints,
                                    prune_checkpoints, resolve_resume, start_run, tmp_checkpoint_dir,
                                    truncate_metrics, write_json)
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


def _fake_checkpoint(run_dir, step, *, run_id, saved_at, commit=True):
    tmp = tmp_checkpoint_dir(run_dir, step)
    tmp.mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    write_json(tmp / "meta.json", {"step": step, "run_id": run_id, "saved_at": saved_at,
                                   "checksums": file_checksums(tmp)})
    return commit_checkpoint(run_dir, step) if commit else tmp


def test_latest_is_the_one_truth_and_rotation_keeps_it_and_other_runs(tmp_path):
    start_run(tmp_path, "mine")
    for i, step in enumerate((10, 20, 30)):
        _fake_checkpoint(tmp_path, step, run_id="mine", saved_at=i)
    # Another run's higher-numbered checkpoint left in the folder: neither resumed nor counted.
    foreign = _fake_checkpoint(tmp_path, 40, run_id="theirs", saved_at=9, commit=False)
    foreign.rename(tmp_path / "checkpoint-40")
    # A half-written checkpoint (crash mid-save) is never picked, and is cleaned at start.
    tmp_checkpoint_dir(tmp_path, 50).mkdir()
    (tmp_path / ".latest.tmp").write_text("checkpoint-50")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20", "checkpoint-30",
                                                           "checkpoint-40"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-30"
    assert [p.name for p in clean_partial(tmp_path)] == [".latest.tmp", ".tmp-checkpoint-50"]
    assert [p.name for p in prune_checkpoints(tmp_path, 2, run_id="mine")] == ["checkpoint-10"]
    # Resumed from 20 and saved 25: the order of saving counts, not the step number, and `latest` is kept.
    _fake_checkpoint(tmp_path, 25, run_id="mine", saved_at=5)
    assert [p.name for p in prune_checkpoints(tmp_path, 1, run_id="mine")] == ["checkpoint-20", "checkpoint-30"]
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == ["checkpoint-25", "checkpoint-40"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-25"
    # Keep 0 still never deletes what `latest` names.
    assert prune_checkpoints(tmp_path, 0, run_id="mine") == []
    assert resolve_resume(str(tmp_path / "checkpoint-40"), tmp_path).name == "checkpoint-40"


def test_resume_verifies_what_latest_names(tmp_path):
    with pytest.raises(ValueError, match="has no `latest` file: no checkpoint of it was completed"):
        resolve_resume("latest", tmp_path)
    start_run(tmp_path, "mine")
    ckpt = _fake_checkpoint(tmp_path, 5, run_id="mine", saved_at=1)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights 6")
    with pytest.raises(ValueError, match="adapter_model.safetensors: checksum differs"):
        resolve_resume("latest", tmp_path)
    (ckpt / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(ValueError, match="not a megalora checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-10"), tmp_path)
    _fake_checkpoint(tmp_path, 7, run_id="theirs", saved_at=2)
    with pytest.raises(ValueError, match="belongs to run theirs, not to the run mine"):
        resolve_resume("latest", tmp_path)


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 8, "lo')  # torn by a kill
    assert truncate_metrics(tmp_path, 4) == 4
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_torchrun_relaunch_command():
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    cmd = torchrun_command(["configs/demo.yaml", "--lr", "1e-4"], launch_env(env))
    assert cmd[:3] == [sys.executable, "-m", "megalora.train.launch"]
    assert "--nproc_per_node=8" in cmd and "--nnodes=2" in cmd and "--node_rank=1" in cmd
    assert "--master_addr=10.0.0.1" in cmd and "--master_port=1234" in cmd
    assert cmd[-5:] == ["megalora", "sft", "configs/demo.yaml", "--lr", "1e-4"]
    assert not is_torchrun_worker(env)
    assert is_torchrun_worker({**env, "TORCHELASTIC_RUN_ID": "x"})
    # One node without MASTER_PORT: a free port (standalone rendezvous), not a fixed default.
    single = torchrun_command(["--lr", "1e-4"], launch_env({"NPROC_PER_NODE": "2"}))
    assert "--standalone" in single and not any(a.startswith("--master_port") for a in single)
    assert "--standalone" not in torchrun_command([], launch_env({"NPROC_PER_NODE": "2", "MASTER_PORT": "1234"}))


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
    # wandb's own start-up waits (30 s and 90 s by default) are short for a loaded machine.
    monkeypatch.setenv("WANDB__SERVICE_WAIT", "600")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "600")
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
