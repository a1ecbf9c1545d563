"""A peft-made adapter imported on TP=2+SP, EP=2 and TP=2 x EP=2 + SP (gloo, 4 CPU ranks) gives
peft's logits on the tiny Qwen3-Next (GDN, gated attention, routed + shared experts, router,
shared-expert gate, output layer with vocab padding under TP), as in one process."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megalora.train.model.tiny import make_tiny_checkpoint
from megalora.train.model.verify import compare_logits

from support.multiprocess import spawn
from test_peft_format import TOL, build_lora_model, peft_made_adapter

LAYOUTS = [(2, 1, True), (1, 2, False), (2, 2, True)]  # (tp, ep, sequence_parallel)


def import_worker(rank: int, world_size: int, hf_dir: str, peft_dir: str) -> dict[tuple, Any]:
    """Per layout: logits after `load_peft_adapter` (rank 0), and checks on a resized module."""
    from megalora.parallel import groups
    from megalora.train.lora.peft_import import load_peft_adapter
    from megalora.train.model.hf_config import read_hf_config
    from megalora.train.model.verify import default_tokens, megatron_logits

    out: dict[tuple, Any] = {}
    for tp, ep, sp in LAYOUTS:
        groups.initialize(tp=tp, ep=ep, sequence_parallel=sp)
        model, info, _ = build_lora_model(Path(hf_dir), alpha=2.0, seed=9)
        ranks = load_peft_adapter(model, peft_dir, hf_spec=read_hf_config(hf_dir))
        tokens = default_tokens(info.vocab_size, num_tokens=16)
        logits = megatron_logits(model, info, tokens)
        qkv = model.decoder.layers[1].self_attention.linear_qkv
        # gradients reach the replaced Parameters, which kept their TP / SP marks
        model.train()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        model(tokens, positions, None).float().square().mean().backward()
        out[(tp, ep, sp)] = {
            "logits": logits if rank == 0 else None,
            "qkv_rank": ranks["decoder.layers.1.self_attention.linear_qkv.lora_A"],
            "qkv_A_shape": tuple(qkv.lora_A.shape),
            "qkv_A_sp_mark": bool(getattr(qkv.lora_A, "lora_tp_allreduce", False)),
            "qkv_B_tp_mark": bool(getattr(qkv.lora_B, "tensor_model_parallel", False)),
            "qkv_grad": float(qkv.lora_A.grad.abs().sum()) if qkv.lora_A.grad is not None else 0.0,
        }
    return out


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_parallel")
    hf_dir = make_tiny_checkpoint("qwen3_next_a", root / "hf", seed=3)
    peft_logits = peft_made_adapter(hf_dir, root / "peft", kind="explicit")
    results = spawn(import_worker, 4, args=(str(hf_dir), str(root / "peft")), timeout=560)
    return peft_logits, results


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}-ep{t[1]}{'-sp' if t[2] else ''}")
def test_import_on_layout_matches_peft(outcome, layout) -> None:
    peft_logits, results = outcome
    result = compare_logits(results[0][layout]["logits"], peft_logits, tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()
    tp, _, sp = layout
    for per_rank in results:
        got = per_rank[layout]
        # explicit adapter: q r=4, k r=2, v r=4 -> fused rank 10; column-parallel A is whole
        assert got["qkv_rank"] == 10 and got["qkv_A_shape"] == (10, 64)
        assert got["qkv_A_sp_mark"] == (tp > 1 and sp) and got["qkv_B_tp_mark"]
        assert got["qkv_grad"] > 0
