"""`run_verify`: ok on a faithful load inside a TP=2 + sequence-parallel world (truncated
to the first layers), FAIL once one loaded megatron tensor is perturbed."""

from __future__ import annotations

import re

import pytest
import torch

from megalora.train.model.tiny import make_tiny_checkpoint
from megalora.train.model.verify import VerifyResult, compare_logits

from support.models import rank_verify
from support.multiprocess import spawn

SUMMARY = re.compile(
    r"^verify: rel_l2=(\S+) max_abs=(\S+) argmax_agree=([0-9.]+) status=(ok|FAIL)$"
)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    model_dir = make_tiny_checkpoint("qwen3_next_a", tmp_path_factory.mktemp("verify") / "a", seed=11)
    return spawn(
        rank_verify, 2, args=(str(model_dir), 2, "decoder.layers.0.self_attention.out_proj.weight"), timeout=600
    )


def test_verify_ok_on_every_rank(outcome):
    clean = [r["clean"] for r in outcome]
    assert clean[0] == clean[1], "every rank returns rank 0's result"
    assert clean[0].ok and clean[0].rel_l2 <= 1e-5 and clean[0].argmax_agree == 1.0
    match = SUMMARY.match(clean[0].summary_line())
    assert match and match.group(4) == "ok"
    assert float(match.group(1)) == pytest.approx(clean[0].rel_l2, rel=1e-3)


def test_perturbed_tensor_fails(outcome):
    perturbed = outcome[0]["perturbed"]
    assert not perturbed.ok and perturbed.rel_l2 > 1e-3
    assert SUMMARY.match(perturbed.summary_line()).group(4) == "FAIL"


def test_compare_logits_measures_against_a_plain_computation():
    ref = torch.randn(2, 5, 7, dtype=torch.float64)
    ours = ref.clone()
    ours[0, 1, 3] += 0.5
    ours[1, 4] = -ref[1, 4]
    result = compare_logits(ours, ref, tolerance=1e-4)
    assert result.max_abs == pytest.approx((ours - ref).abs().max().item())
    assert result.rel_l2 == pytest.approx(((ours - ref).norm() / ref.norm()).item())
    expected_agree = (ours.argmax(-1) == ref.argmax(-1)).double().mean().item()
    assert result.argmax_agree == pytest.approx(expected_agree) and expected_agree < 1.0
    assert isinstance(result, VerifyResult) and not result.ok
