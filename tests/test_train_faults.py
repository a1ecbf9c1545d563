"""Faults as an operator meets them, driven through the CLI (subprocesses, real signals): what the
run folder holds afterwards, the one line a refusal prints, and that resume equals an
uninterrupted run (float64, as tests/test_train_parity.py compares)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def _env(extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("NPROC_PER_NODE", "NNODES", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def _sft(args, *, env_extra=None, timeout=900, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "megalora", "sft", *args], env=_env(env_extra), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _export(args, timeout=900):
    return subprocess.run([sys.executable, "-m", "megalora", "export", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _flags(model_dir, data_file, run: Path, steps: int, *extra) -> list[str]:
    return ["--model", str(model_dir), "--dataset", f"{data_file}#24", "--max_length", "256",
            "--micro_batch_size", "4", "--global_batch_size", "4", "--train_iters", str(steps), "--lr", "5e-3",
            "--lr_warmup_iters", "1", "--lora_rank", "4", "--seed", "7", "--torch_dtype", "float64",
            "--lora_dtype", "float64", "--save", str(run), *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _error_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if "error" in line]


def _rank_errors(r) -> list[str]:
    """The ranks' one-line errors, after checking the launcher's summary of them is one line too:
    no torchrun traceback (`ChildFailedError`) and no rank's."""
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    summary = [line for line in out.splitlines() if line.startswith("megalora sft: error: rank")]
    # The rank that fails first exits with 2; torchrun may stop the other with SIGTERM before it does.
    assert len(summary) == 1 and "exited with 2" in summary[0], out[-3000:]
    assert summary[0].endswith("the ranks' messages are above"), summary
    return [line for line in out.splitlines() if line.startswith("megalora sft: error (rank")]


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        err = (wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-12)
        assert err <= RTOL, f"{k}: relative error {err:.2e}"
    assert any(v.abs().sum() > 0 for k, v in wa.items() if k.endswith("lora_B"))


def test_resume_takes_latest_of_this_run_after_kill(train_assets, tmp_path):
    """A run resumed from another checkpoint into a folder that holds a foreign, higher-numbered
    checkpoint, with save_total_limit 1, killed with SIGKILL mid-run: `latest` names a checkpoint that
    exists, rotation kept the foreign one, `--resume latest` continues from `latest` and ends where the
    uninterrupted run ends, and metrics.jsonl holds every step once."""
    m, d = train_assets.model_dir, train_assets.data_file
    ref = tmp_path / "ref"
    r = _sft(_flags(m, d, ref, 12, "--save_interval", "4"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    other = tmp_path / "other"  # another run (another seed): its state must never be resumed here
    r = _sft(_flags(m, d, other, 1, "--seed", "8"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(other / "checkpoint-1", run / "checkpoint-12")
    cmd = [sys.executable, "-m", "megalora", "sft",
           *_flags(m, d, run, 12, "--save_interval", "2", "--save_total_limit", "1", "--resume",
                   str(ref / "checkpoint-4"))]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 7/12"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    latest = (run / "latest").read_text().strip()
    own = {p.name for p in run.glob("checkpoint-*") if p.name != "checkpoint-12"}
    assert latest in own and own <= {"checkpoint-6", "checkpoint-8", "checkpoint-10"}, own  # rotation kept `latest` ...
    assert (run / "checkpoint-12" / "meta.json").is_file()  # ... and never touched the foreign checkpoint
    resumed = _sft(_flags(m, d, run, 12, "--save_interval", "2", "--save_total_limit", "1", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {run / latest} at step {int(latest.split('-')[1])}" in resumed.stdout
    steps = [row["step"] for row in _metrics(run)]
    assert steps == list(range(5, 13)), steps
    ref_loss = {row["step"]: row["loss"] for row in _metrics(ref)}
    for row in _metrics(run):
        assert row["loss"] == pytest.approx(ref_loss[row["step"]], rel=RTOL), row["step"]
    _assert_same_adapter(ref / "checkpoint-12", run / "checkpoint-12")


def test_killed_in_the_first_save_resume_says_so_in_one_line(train_assets, tmp_path):
    """What a kill inside the first save leaves (a partial `.tmp-checkpoint-*`, no `latest`):
    `--resume latest` removes and reports the partial folder, then fails with one line."""
    run = tmp_path / "run"
    partial = run / ".tmp-checkpoint-2"
    (partial / "rng").mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00")
    r = _sft(_flags(train_assets.model_dir, train_assets.data_file, run, 2, "--resume", "latest"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"removed {partial}" in r.stdout
    assert not partial.exists()
    errors = _error_lines(r)
    assert len(errors) == 1 and "has no `latest` file" in errors[0] and str(run) in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_changed_base_or_checkpoint_is_refused_in_one_line(train_assets, tmp_path):
    """Base weights changed in place (same sizes), an adapter file changed after saving: resume and
    export refuse with one line; `--allow_base_model_change true` goes on knowingly. A relative
    `--model` is recorded as an absolute path."""
    base = tmp_path / "base"
    shutil.copytree(train_assets.model_dir, base)
    run = tmp_path / "run"
    r = _sft(_flags("base", train_assets.data_file, run, 1), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    meta = json.loads((run / "checkpoint-1" / "meta.json").read_text())
    assert meta["base_model"] == str(base.resolve())

    weights = base / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == size
    flags = _flags(base, train_assets.data_file, run, 2, "--resume", "latest")
    r = _sft(flags)
    assert r.returncode == 2
    errors = _error_lines(r)
    assert len(errors) == 1 and "different weights" in errors[0] and str(base) in errors[0], r.stderr
    r = _export([str(run / "checkpoint-1"), "--out", str(tmp_path / "out"), "--adapter"])
    assert r.returncode == 2 and "different weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _export([str(run / "checkpoint-1"), "--out", str(tmp_path / "out"), "--adapter",
                 "--allow_base_model_change", "true"])
    assert r.returncode == 0, r.stderr

    adapter = run / "checkpoint-1" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-8:] = bytes(8)  # the last float64 of the last tensor
    adapter.write_bytes(bytes(data))
    r = _sft([*flags, "--allow_base_model_change", "true"])
    assert r.returncode == 2
    errors = _error_lines(r)
    assert len(errors) == 1 and f"{adapter}: checksum differs" in errors[0], r.stderr
    r = _export([str(run / "checkpoint-1"), "--out", str(tmp_path / "out2"), "--adapter",
                 "--allow_base_model_change", "true"])
    assert r.returncode == 2 and "checksum differs" in r.stderr, r.stderr


def test_two_launches_without_master_port_both_finish(train_assets, tmp_path):
    """Two 2-rank runs started at once on one machine, no MASTER_PORT: each takes a free port."""
    procs = [subprocess.Popen([sys.executable, "-m", "megalora", "sft",
                               *_flags(train_assets.model_dir, train_assets.data_file, tmp_path / f"run{i}", 1,
                                       "--torch_dtype", "float32", "--lora_dtype", "float32", "--micro_batch_size", "2")],
                              env=_env({"NPROC_PER_NODE": "2"}), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "--standalone" in out
    for i in range(2):
        assert (tmp_path / f"run{i}" / "checkpoint-1" / "meta.json").is_file()


def _file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (a full disk as a process sees it,
    without root or a small filesystem); SIGXFSZ ignored so the write returns the error."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_during_save_stops_every_rank_with_one_line(train_assets, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "megalora", "sft",
                        *_flags(train_assets.model_dir, train_assets.data_file, run, 2, "--save_interval", "1",
                                "--micro_batch_size", "2")],
                       env=_env({"NPROC_PER_NODE": "2"}), cwd=ROOT, capture_output=True, text=True, timeout=900,
                       preexec_fn=_file_size_limit(100_000))  # the float64 adapter file is ~160 kB
    assert r.returncode != 0
    lines = _rank_errors(r)
    assert sorted(line.split(")")[0] for line in lines) == ["megalora sft: error (rank 0",
                                                           "megalora sft: error (rank 1"], r.stderr[-3000:]
    for line in lines:
        assert "cannot write checkpoint checkpoint-1" in line and "adapter_model.safetensors" in line, line
        assert "no checkpoint was completed" in line
    assert not (run / "latest").exists() and not list(run.glob(".tmp-*")) and not list(run.glob("checkpoint-*"))


def test_corrupt_weights_and_missing_tokenizer_fail_in_one_line(train_assets, tmp_path):
    """Truncated shard, corrupt header, missing shard, missing tokenizer: the dry run (which opens
    every weight file's header) and a 2-rank training run each say which path, on every rank."""
    from megalora.train.model.loader import INDEX_FILE

    def broken(name, damage):
        folder = tmp_path / name
        shutil.copytree(train_assets.model_dir, folder)
        damage(folder)
        return folder

    weights = "model.safetensors"

    def truncate(f):
        data = (f / weights).read_bytes()
        (f / weights).write_bytes(data[: len(data) - 1000])

    def flip_header(f):
        data = bytearray((f / weights).read_bytes())
        data[10] = ord("}")  # inside the JSON header
        (f / weights).write_bytes(bytes(data))

    def missing_shard(f):
        (f / INDEX_FILE).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00002.safetensors"}}))
        (f / weights).unlink()

    def no_tokenizer(f):
        for p in f.glob("tokenizer*"):
            p.unlink()

    cases = {"truncated": (truncate, weights, "truncated"), "header": (flip_header, weights, "corrupt"),
             "shard": (missing_shard, "model-00002.safetensors", "missing"),
             "tokenizer": (no_tokenizer, "", "no usable tokenizer")}
    for name, (damage, culprit, words) in cases.items():
        folder = broken(name, damage)
        dry = _sft(_flags(folder, train_assets.data_file, tmp_path / f"dry-{name}", 1, "--dry-run"))
        assert dry.returncode == 2, (name, dry.stdout[-2000:], dry.stderr[-2000:])
        errors = _error_lines(dry)
        assert len(errors) == 1 and str(folder / culprit) in errors[0] and words in errors[0], (name, dry.stderr)
    folder = tmp_path / "truncated"
    r = _sft(_flags(folder, train_assets.data_file, tmp_path / "run", 1, "--micro_batch_size", "2"),
             env_extra={"NPROC_PER_NODE": "2"})
    assert r.returncode != 0
    lines = _rank_errors(r)
    assert len(lines) == 2 and all(str(folder / weights) in line and "truncated" in line for line in lines), lines


def test_unwritable_run_folder_stops_every_rank_with_one_line(train_assets, tmp_path):
    """`--save` below a file (as a read-only or foreign path would be): both ranks say which path."""
    (tmp_path / "file").write_text("not a folder")
    run = tmp_path / "file" / "run"
    r = _sft(_flags(train_assets.model_dir, train_assets.data_file, run, 1, "--micro_batch_size", "2"),
             env_extra={"NPROC_PER_NODE": "2"})
    assert r.returncode != 0
    lines = _rank_errors(r)
    assert len(lines) == 2 and all(f"cannot write the run folder: {run}" in line for line in lines), lines
