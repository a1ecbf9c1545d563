"""`lora_per_projection`: inside fused layers, one independent adapter per HF projection,
kept so through training (single process and TP=2+SP), exported as peft's per-projection
adapters that peft-on-transformers reproduces."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RANK = 4


def _megalora(args, *, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("NPROC_PER_NODE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)
    r = subprocess.run([sys.executable, "-m", "megalora", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _nonzero_columns(b):
    return {int(j) for j in torch.nonzero(b.abs().sum(0)).flatten()}


@pytest.mark.parametrize("layout", [[], ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"]],
                         ids=["one_rank", "tp2_sp"])
def test_per_projection_adapters_stay_independent_and_match_peft(train_assets, tmp_path, layout):
    run, adapter = tmp_path / "run", tmp_path / "adapter"
    r = _megalora(["sft", "--model", str(train_assets.model_dir), "--dataset", f"{train_assets.data_file}#8",
                   "--max_length", "512", "--micro_batch_size", "2", "--global_batch_size", "2", "--train_iters", "3",
                   "--lr", "1e-2", "--lora_rank", str(RANK), "--lora_per_projection", "true", "--save", str(run),
                   *layout], nproc=2 if layout else None)
    # GDN in_proj (layer 0), linear_qkv (layer 1), the shared expert's fc1 (both layers)
    assert "lora_per_projection: 4 fused layers" in r.stdout
    exported = _megalora(["export", str(run / "checkpoint-3"), "--out", str(adapter), "--adapter"])
    # the default (vllm) layout, each projection at rank r: exact, no zero off-block columns
    assert "wrote a vllm-format adapter (rank 4," in exported.stdout
    assert "vllm: ok, serve with --enable-lora --max-lora-rank 8" in exported.stdout
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    groups = {
        "model.layers.1.self_attn": ["q_proj", "k_proj", "v_proj"],
        "model.layers.0.linear_attn": ["in_proj_qkvz", "in_proj_ba"],
        "model.layers.0.mlp.shared_expert": ["gate_proj", "up_proj"],
    }
    for prefix, names in groups.items():
        bs = [tensors[f"base_model.model.{prefix}.{n}.lora_B.weight"] for n in names]
        As = [tensors[f"base_model.model.{prefix}.{n}.lora_A.weight"] for n in names]
        assert all(a.shape[0] == RANK and b.shape[1] == RANK for a, b in zip(As, bs))
        # after training each projection uses all of its own r columns
        assert all(_nonzero_columns(b) == set(range(RANK)) for b in bs), prefix
        assert not torch.allclose(As[0], As[1])  # independent A per projection
    verify = _megalora(["verify", "--model", str(train_assets.model_dir), "--adapter", str(adapter)])
    assert verify.stdout.strip().splitlines()[-1].endswith("status=ok")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == RANK
    # The merged export of the same checkpoint (its own verify compares it with the unmerged model).
    merged = _megalora(["export", str(run / "checkpoint-3"), "--out", str(tmp_path / "merged"), "--merge"])
    assert merged.stdout.strip().splitlines()[-1].startswith("verify: ")
    assert "status=ok" in merged.stdout.strip().splitlines()[-1], merged.stdout[-2000:]
