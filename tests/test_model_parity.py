"""fp32 logit parity, one process: megatron GPTModel built from an HF folder vs
transformers on the same folder, for every tiny architecture shape (and a checkpoint
saved in many shards)."""

from __future__ import annotations

import pytest
import torch

from megalora.parallel.multiprocess import spawn
from megalora.train.model.testing import TINY_CONFIGS, make_tiny_checkpoint, rank_forward, reference_logits

SHARDED = "qwen3_moe_sharded"
CASES = sorted(TINY_CONFIGS) + [SHARDED]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    dirs = {name: str(make_tiny_checkpoint(name, root / name, seed=3)) for name in TINY_CONFIGS}
    dirs[SHARDED] = str(make_tiny_checkpoint("qwen3_moe", root / SHARDED, seed=4, max_shard_size="20KB"))
    return dirs


@pytest.fixture(scope="module")
def megatron_logits(checkpoints):
    (results,) = spawn(rank_forward, 1, args=(list(checkpoints.values()), [(1, 1, False)]), timeout=600)
    return {name: results[(1, 1, False)][path]["logits"] for name, path in checkpoints.items()}


def test_sharded_checkpoint_has_an_index(checkpoints):
    from pathlib import Path

    files = list(Path(checkpoints[SHARDED]).glob("*.safetensors"))
    assert len(files) > 1 and (Path(checkpoints[SHARDED]) / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("name", CASES)
def test_single_process_logit_parity(name, checkpoints, megatron_logits):
    ours = megatron_logits[name]
    ref = reference_logits(checkpoints[name])
    assert ours.shape == ref.shape
    rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-5, f"{name}: relative L2 {rel:.3e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), name
