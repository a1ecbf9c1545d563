"""Evaluation against an independent oracle, and the non-finite-loss stop."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("NPROC_PER_NODE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "megalora", "sft", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_eval_loss_and_accuracy_equal_transformers_on_the_held_out_split(train_assets, tmp_path):
    """With lr 0 the adapters stay zero, so the model is the base model: the trainer's eval loss and
    token accuracy on its held-out split must equal transformers' on the same samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megalora.config import load_config
    from megalora.data.dataset import build_datasets

    flags = ["--model", str(train_assets.model_dir), "--dataset", f"{train_assets.data_file}#40",
             "--split_dataset_ratio", "0.2", "--max_length", "512", "--micro_batch_size", "4",
             "--global_batch_size", "4", "--train_iters", "1", "--lr", "0", "--min_lr", "0", "--eval_interval", "1",
             "--eval_iters", "-1", "--save", str(tmp_path / "run")]
    r = _run(flags)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])

    cfg, _ = load_config(None, flags)
    tokenizer = AutoTokenizer.from_pretrained(train_assets.model_dir)
    _, val = build_datasets(cfg.data, tokenizer, cache_dir=None, barrier=lambda: None, log=lambda *_: None)
    model = AutoModelForCausalLM.from_pretrained(train_assets.model_dir, dtype=torch.float32).eval()
    loss_sum, correct, count = 0.0, 0, 0
    # eval_iters -1: the trainer evaluates the whole split in whole micro-batches, len(val) // 4 of them.
    for i in range(len(val) // 4 * 4):
        ids, labels = (torch.as_tensor(x, dtype=torch.long) for x in val[i])
        with torch.no_grad():
            logits = model(ids[None]).logits[0, :-1]
        targets = labels[1:]
        mask = targets != -100
        loss_sum += float(torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum"))
        correct += int((logits[mask].argmax(-1) == targets[mask]).sum())
        count += int(mask.sum())
    assert count > 100
    assert row["eval_loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert row["eval_acc"] == pytest.approx(correct / count, abs=1.0 / count)


def test_non_finite_loss_stops_naming_step_and_checkpoint(train_assets, tmp_path):
    run = tmp_path / "nan"
    r = _run(["--model", str(train_assets.model_dir), "--dataset", f"{train_assets.data_file}#16",
              "--max_length", "512", "--micro_batch_size", "4", "--global_batch_size", "4", "--train_iters", "6",
              "--lr", "1e30", "--min_lr", "0", "--clip_grad", "0", "--save_interval", "1", "--save", str(run)])
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    good = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert good, r.stdout
    bad_step = good[-1] + 1
    assert "non-finite loss" in r.stdout
    assert f"at step {bad_step}; the last good checkpoint is {run / f'checkpoint-{good[-1]}'}" in r.stdout, r.stdout
