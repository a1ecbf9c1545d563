"""Shared fixtures: assets made once per test session (never downloaded)."""
import os

import pytest


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The embedded tiny default (tokenizer, Qwen3-Next-shaped model, chats) in a session folder."""
    from megalora.demo import ensure_demo_assets

    return ensure_demo_assets(tmp_path_factory.mktemp("demo") / "assets", log=lambda *_: None)


@pytest.fixture(autouse=True)
def _isolated_megalora_home(tmp_path_factory, monkeypatch):
    # Data caches and demo assets of a test never land in the user's home.
    if "MEGALORA_HOME" not in os.environ:
        monkeypatch.setenv("MEGALORA_HOME", str(tmp_path_factory.getbasetemp() / "megalora-home"))
    yield


@pytest.fixture(scope="session")
def train_assets(demo_assets, tmp_path_factory):
    """A two-layer Qwen3-Next (one Gated DeltaNet layer, one gated-attention layer, 8 experts
    top-2 + shared expert) with the demo tokenizer and chats, for training tests.

    Its router weights are scaled so that no token's top-k choice sits within rounding of a
    tie: parallel layouts sum in different orders, and with a near-tied router a last-bit
    difference flips an expert choice, parting the curves for reasons that have nothing to
    do with parallelism."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen3NextConfig, Qwen3NextForCausalLM

    from megalora.demo import DEMO_MODEL, DemoAssets

    root = tmp_path_factory.mktemp("train-assets")
    model_dir = root / "model"
    shutil.copytree(demo_assets.model_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shape = {**DEMO_MODEL, "num_hidden_layers": 2, "full_attention_interval": 2}
    config = Qwen3NextConfig(vocab_size=len(tokenizer) + (-len(tokenizer) % 8), bos_token_id=None,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), **shape)
    torch.manual_seed(1)
    model = Qwen3NextForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(40.0)
    model.save_pretrained(model_dir)
    shutil.copy(demo_assets.data_file, root / "chats.jsonl")
    return DemoAssets(root=root, model_dir=model_dir, data_file=root / "chats.jsonl")
