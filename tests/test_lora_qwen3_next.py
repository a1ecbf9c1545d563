"""apply_lora on a tiny Qwen3-Next model (GDN + gated attention + MoE) built from an HF folder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalora.config import LoraSection
from megalora.parallel import groups
from megalora.train.lora.apply import apply_lora
from megalora.train.lora.layout import lora_layout
from test_lora_apply import _merge_into, randomize_lora_b

ALL = ["all-linear", "router", "shared_expert_gate", "output_layer"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megalora.train.model.tiny import make_tiny_checkpoint

    groups.initialize(tp=1)
    yield make_tiny_checkpoint("qwen3_next_a", tmp_path_factory.mktemp("qwen3_next"))
    groups.destroy()


def _build(hf_dir: Path) -> torch.nn.Module:
    from megalora.train.model.build import build_model

    return build_model(hf_dir, num_layers=2)[0]


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)


def test_gdn_and_attention_targets_and_merge_parity(hf_dir: Path) -> None:
    model, base = _build(hf_dir), _build(hf_dir)
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    before = _logits(model, tokens)
    # a moderate scale (rsLoRA: 4/sqrt(4) = 2): huge deltas make the GDN recurrence amplify the
    # fp32 rounding gap between merged and unmerged weights past any fixed tolerance
    cfg = LoraSection(lora_rank=4, lora_alpha=4.0, target_modules=ALL, use_rslora=True)
    report = apply_lora(model, cfg, verbose=False)
    # layer 0 is a gated-delta-net layer, layer 1 full attention (full_attention_interval=2)
    assert report.wrapped["decoder.layers.0.self_attention.in_proj"] == "in_proj"
    assert report.wrapped["decoder.layers.0.self_attention.out_proj"] == "out_proj"
    assert report.wrapped["decoder.layers.1.self_attention.linear_qkv"] == "linear_qkv"
    assert sorted(set(report.wrapped.values())) == sorted(
        ["in_proj", "out_proj", "linear_qkv", "linear_proj", "routed_experts", "router", "shared_expert_gate",
         "shared_expert.linear_fc1", "shared_expert.linear_fc2", "output_layer"])
    torch.testing.assert_close(_logits(model, tokens), before)
    # in_proj B is split over TP per part [q; k; v; z; b; a], as the GDN splits its output
    kind = lora_layout(model)["decoder.layers.0.self_attention.in_proj.lora_B"]
    sizes = [int(n) for n in kind.removeprefix("segments:").split(",")]
    assert kind.startswith("segments:") and sum(sizes) == model.decoder.layers[0].self_attention.in_proj.output_size
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3] and sizes[4] == sizes[5]
    randomize_lora_b(model)
    _merge_into(base, model)
    got = _logits(model, tokens)
    assert (got - before).abs().max() > 1e-2
    want = _logits(base, tokens)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_output_layer_forward_hooks_see_the_adapted_logits(hf_dir: Path) -> None:
    """A hook on the output layer (the padded-vocab mask is one) must apply after the delta."""
    model = _build(hf_dir)

    def zero_first_column(module, args, output):
        logits, bias = output
        return logits.index_fill(-1, torch.tensor([0]), 0.0), bias

    model.output_layer.register_forward_hook(zero_first_column)
    apply_lora(model, LoraSection(target_modules=["output_layer"]), verbose=False)
    randomize_lora_b(model)
    logits = _logits(model, torch.tensor([[1, 2, 3, 4]]))
    assert torch.count_nonzero(logits[..., 0]) == 0 and torch.count_nonzero(logits[..., 1]) == logits[..., 1].numel()
