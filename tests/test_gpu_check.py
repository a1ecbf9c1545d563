"""`launch/gpu_check.sh` / `bench/gpu_check.py` in CPU quick mode: every check runs at tiny sizes
with the packages the GPU machine lacks made unimportable (so nothing on the checked path needs
them), prints one line each and writes the JSON summary; a deliberate fault in one check makes
the script exit 1 and name that check. The figures on a GPU come from running the script there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("wandb", "modelscope", "datasets")
ALL_CHECKS = [f"verify_{m}_{d}" for m in ("qwen3_next", "qwen3_moe") for d in ("float32", "bfloat16")] + [
    "kernel_gdn", "kernel_gdn_packed", "kernel_conv_packed", "kernel_attention_packed", "kernel_grouped_mm",
    "train_1rank", "train_ep2", "train_tp2_sp", "slice", "slice_recompute"]


def _env(tmp_path: Path) -> dict[str, str]:
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    # Every Python process of the check (verify, sft, torchrun ranks, slice sides) reads this.
    (block / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_GPU_MACHINE))
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(block), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return env


def _lines(stdout: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[2] for line in stdout.splitlines()
            if line.startswith("gpu_check: ") and len(line.split()) > 2 and line.split()[2] in ("ok", "FAIL")}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=1800)
    return proc, out


def test_quick_mode_runs_every_check(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _lines(proc.stdout) == {name: "ok" for name in ALL_CHECKS}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == [] and list(summary["checks"]) == ALL_CHECKS
    checks = summary["checks"]
    # Figures are real measurements, not placeholders.
    assert checks["train_ep2"]["steps"] == 3 and checks["train_tp2_sp"]["worst_rel_diff"] <= 0.05
    assert 0 < checks["kernel_gdn_packed"]["value_rel_l2"] <= 2e-2  # bf16 vs fp32: rounding shows
    assert checks["slice"]["tokens_per_s"] > 0 and checks["slice"]["peer_tokens_per_s"] > 0
    assert checks["slice_recompute"]["planned_gib"] > 0 and checks["slice"]["useful_gflop_per_token"] > 0
    assert checks["verify_qwen3_moe_float32"]["rel_l2"] <= 1e-5


def test_a_failing_check_is_named_and_fails_the_script(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "launch/gpu_check.sh", str(out), "--device", "cpu", "--quick", "--checks",
                           "kernel_gdn_packed,kernel_grouped_mm", "--perturb", "kernel_gdn_packed"],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert _lines(proc.stdout) == {"kernel_gdn_packed": "FAIL", "kernel_grouped_mm": "ok"}
    assert proc.stdout.strip().splitlines()[-1] == "gpu_check: FAILED kernel_gdn_packed"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["kernel_gdn_packed"]
    assert summary["checks"]["kernel_gdn_packed"]["value_rel_l2"] > 5e-2


def test_unknown_check_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out",
                           str(tmp_path), "--checks", "kernel_gdm"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown check(s) ['kernel_gdm']" in proc.stderr
