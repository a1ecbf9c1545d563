"""Multi-rank parity (gloo, CPU): TP=2 with sequence parallel, EP=2, and TP=2 x EP=2 with
sequence parallel, each against transformers' fp32 logits (padded batches and packed
sequences); and each rank holds and reads
only its own shard of the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megalora.train.model.hf_config import padded_vocab_size, read_hf_config
from megalora.train.model.mapping import rules_for
from megalora.train.model.tiny import make_tiny_checkpoint

from support.models import rank_forward, reference_logits, reference_packed_logits, reference_token_loss
from support.multiprocess import spawn

NAMES = ["qwen3_next_a", "qwen3_next_b", "qwen3_moe"]
LAYOUTS = [(2, 1, True), (1, 2, False), (2, 2, True)]
WORLD_SIZE = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {name: str(make_tiny_checkpoint(name, root / name, seed=7)) for name in NAMES}


@pytest.fixture(scope="module")
def ranks(checkpoints):
    return spawn(rank_forward, WORLD_SIZE, args=(list(checkpoints.values()), LAYOUTS), timeout=600)


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: reference_logits(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def packed_references(checkpoints):
    return {name: reference_packed_logits(path) for name, path in checkpoints.items()}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}-ep{lay[1]}{'-sp' if lay[2] else ''}")
@pytest.mark.parametrize("name", NAMES)
def test_layout_logit_parity(name, layout, checkpoints, ranks, references):
    ours = ranks[0][layout][checkpoints[name]]["logits"]
    ref = references[name]
    rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-5, f"{name} {layout}: relative L2 {rel:.3e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}-ep{lay[1]}{'-sp' if lay[2] else ''}")
@pytest.mark.parametrize("name", NAMES)
def test_layout_packed_parity(name, layout, checkpoints, ranks, packed_references):
    ours = ranks[0][layout][checkpoints[name]]["packed_logits"]
    ref = packed_references[name]
    rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-5, f"{name} {layout} packed: relative L2 {rel:.3e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}-ep{lay[1]}{'-sp' if lay[2] else ''}")
@pytest.mark.parametrize("name", NAMES)
def test_layout_token_loss_ignores_vocab_padding(name, layout, checkpoints, ranks):
    """megatron's vocab-parallel cross entropy runs over the TP-padded vocab (every
    vocab size here is odd); it must equal the loss over the real vocab."""
    ours = ranks[0][layout][checkpoints[name]]["token_loss"]
    ref = reference_token_loss(checkpoints[name])
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}-ep{lay[1]}{'-sp' if lay[2] else ''}")
@pytest.mark.parametrize("name", NAMES)
def test_layout_padded_packed_parity(name, layout, checkpoints, ranks, packed_references):
    ours = ranks[0][layout][checkpoints[name]]["packed_padded_logits"]
    ref = packed_references[name]
    rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-5, f"{name} {layout} padded packed: relative L2 {rel:.3e}"


def _disk_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _expected_rank_numel(model_dir: str, *, tp: int, ep: int, ep_rank: int) -> int:
    """Elements one rank should hold: TP-split tensors 1/tp (vocab padded), replicated
    tensors whole, routed experts only the rank's own 1/ep of them."""
    spec = read_hf_config(model_dir)
    shapes = _disk_shapes(model_dir)
    padded = padded_vocab_size(spec.vocab_size, tp=tp)
    per_rank_experts = (spec.num_experts or 0) // ep
    total = 0
    for rule in rules_for(spec):
        if rule.expert is not None and not ep_rank * per_rank_experts <= rule.expert < (ep_rank + 1) * per_rank_experts:
            continue
        numel = sum(int(torch.tensor(shapes[s.name]).prod()) for s in rule.sources)
        if rule.sources[0].vocab:
            numel = numel // spec.vocab_size * padded
        total += numel // tp if rule.group == "tp" else numel
    return total


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"tp{lay[0]}-ep{lay[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_and_reads_only_its_shard(name, layout, checkpoints, ranks):
    tp, ep, _ = layout
    model_dir = checkpoints[name]
    checkpoint_bytes = sum(4 * int(torch.tensor(s).prod()) for s in _disk_shapes(model_dir).values())
    for rank_result in ranks:
        found = rank_result[layout][model_dir]
        held = sum(found["param_numel"].values())
        assert held == _expected_rank_numel(model_dir, tp=tp, ep=ep, ep_rank=found["ep_rank"])
        # What a rank reads is at most what it holds (fp32): never the full model.
        assert found["bytes_read"] <= 4 * held
        assert found["bytes_read"] < 0.8 * checkpoint_bytes


def test_dense_qwen3_and_a_sharded_checkpoint_on_their_layouts(tmp_path):
    """The remaining test checkpoints: dense Qwen3 (no experts: TP=2+SP is its layout) and a
    Qwen3-MoE saved in several shards with an index, on every layout."""
    dense = str(make_tiny_checkpoint("qwen3", tmp_path / "dense", seed=3))
    sharded = str(make_tiny_checkpoint("qwen3_moe", tmp_path / "sharded", seed=4, max_shard_size="20KB"))
    assert (Path(sharded) / "model.safetensors.index.json").is_file()
    runs = [(dense, [(2, 1, True)], 2), (sharded, LAYOUTS, WORLD_SIZE)]
    for path, layouts, world in runs:
        results = spawn(rank_forward, world, args=([path], layouts), timeout=600)
        ref = reference_logits(path)
        for layout in layouts:
            ours = results[0][layout][path]["logits"]
            rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
            assert rel <= 1e-5, f"{path} {layout}: relative L2 {rel:.3e}"
            assert torch.equal(ours.argmax(-1), ref.argmax(-1))
