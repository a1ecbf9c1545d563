"""Training parity: the same 20 steps give the same loss curve and adapter on every layout,
for any micro-batch / accumulation split of the global batch, and after stop + resume.

The runs are in float64. In float32 the curves of different layouts agree to 1e-5 for a few
steps and then part slowly: AdamW divides each gradient element by its own running RMS, so
elements whose gradient is near zero turn last-bit summation-order differences into full
size updates (measured here: 4.6e-5 relative on one adapter after 20 fp32 steps). float64
keeps that noise far below the 1e-5 tolerance, so a real parallelism bug cannot hide in it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support.multiprocess import spawn


STEPS = 20
RTOL = 1e-5


def _flags(assets, run_dir, *extra):
    return ["--model", str(assets.model_dir), "--dataset", f"{assets.data_file}#36", "--max_length", "512", "--global_batch_size", "4", "--train_iters", str(STEPS),
            "--lr", "5e-3", "--min_lr", "5e-4", "--lr_warmup_iters", "2", "--lora_rank", "4", "--lora_alpha", "8",
            "--target_modules", "all-linear", "output_layer", "--save", str(run_dir), "--save_interval", "100",
            "--seed", "7", "--torch_dtype", "float64", "--lora_dtype", "float64", *extra]


def _train_rank(rank, world_size, runs):
    """Spawn target: run each (flags) training in turn in this world; report loss curves."""
    from megalora.config import load_config
    from megalora.train.recipe import train

    for flags in runs:
        cfg, extras = load_config(None, flags)
        assert train(cfg, extras) == 0
    return None


def _curve(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _adapter(run_dir, step=STEPS):
    return load_file(str(Path(run_dir) / f"checkpoint-{step}" / "adapter_model.safetensors"))


def _assert_same_training(run_a, run_b):
    a, b = _curve(run_a), _curve(run_b)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=RTOL), f"step {step}"
    assert a[STEPS] < a[1]  # the run learns something: the comparison is not between two constants
    _assert_same_adapter(_adapter(run_a), _adapter(run_b))


def _assert_same_adapter(wa, wb):
    assert wa.keys() == wb.keys()
    for k in wa:
        err = (wa[k] - wb[k]).norm() / wa[k].norm().clamp_min(1e-12)
        assert err <= RTOL, f"{k}: relative error {err:.2e}"
    assert any(v.abs().sum() > 0 for k, v in wa.items() if k.endswith("lora_B"))


@pytest.fixture(scope="module")
def reference_run(train_assets, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    spawn(_train_rank, 1, args=([_flags(train_assets, run, "--micro_batch_size", "4")],), timeout=600)
    return run


def test_micro_batch_splits_match(train_assets, reference_run, tmp_path):
    run = tmp_path / "mb1"
    spawn(_train_rank, 1, args=([_flags(train_assets, run, "--micro_batch_size", "1")],), timeout=600)
    _assert_same_training(reference_run, run)


def test_two_rank_layouts_match(train_assets, reference_run, tmp_path):
    layouts = {
        "tp2_sp": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--micro_batch_size", "2"],
        "ep2": ["--expert_model_parallel_size", "2", "--micro_batch_size", "2"],
        "dp2": ["--micro_batch_size", "1"],
    }
    runs = {name: tmp_path / name for name in layouts}
    spawn(_train_rank, 2, args=([_flags(train_assets, runs[n], *f) for n, f in layouts.items()],), timeout=900)
    failures = {}
    for name, run in runs.items():
        try:
            _assert_same_training(reference_run, run)
        except AssertionError as e:
            failures[name] = str(e).splitlines()[0]
    assert not failures, failures


def test_four_rank_tp2_ep2_sp_matches_and_resumes_on_ep2(train_assets, reference_run, tmp_path):
    run = tmp_path / "tp2ep2"
    flags = _flags(train_assets, run, "--tensor_model_parallel_size", "2", "--expert_model_parallel_size", "2",
                   "--sequence_parallel", "true", "--micro_batch_size", "1", "--save_interval", "10")
    spawn(_train_rank, 4, args=([flags],), timeout=900)
    _assert_same_training(reference_run, run)
    # The step-10 checkpoint of TP=2 x EP=2 + SP continues on EP=2 alone, as the reference did.
    resumed = tmp_path / "resumed-ep2"
    flags = _flags(train_assets, resumed, "--expert_model_parallel_size", "2", "--micro_batch_size", "2",
                   "--resume", str(run / "checkpoint-10"))
    spawn(_train_rank, 2, args=([flags],), timeout=900)
    ref, cont = _curve(reference_run), _curve(resumed)
    assert sorted(cont) == list(range(11, STEPS + 1))
    for step in cont:
        assert cont[step] == pytest.approx(ref[step], rel=RTOL), f"step {step}"
    _assert_same_adapter(_adapter(reference_run), _adapter(resumed))


def test_sigterm_then_resume_continues_exactly(train_assets, reference_run, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is saved, the process exits 0; `--resume
    latest` then gives the uninterrupted run's remaining steps and final adapter."""
    run = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NPROC_PER_NODE", None)
    cmd = [sys.executable, "-m", "megalora", "sft", *_flags(train_assets, run, "--micro_batch_size", "4")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(_curve(run)) >= 10:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    stopped = max(_curve(run))
    assert 10 <= stopped < STEPS, out
    assert f"stopped by signal {int(signal.SIGTERM)} after step {stopped}" in out
    assert (run / f"checkpoint-{stopped}" / "meta.json").is_file()
    resumed = subprocess.run(cmd + ["--resume", "latest"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {run / f'checkpoint-{stopped}'} at step {stopped}" in resumed.stdout
    _assert_same_training(reference_run, run)
