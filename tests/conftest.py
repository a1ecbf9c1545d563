"""Shared fixtures: assets made once per test session (never downloaded)."""
import os
from pathlib import Path

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
    """The demo assets with decisive routing: router weights scaled so that no token's top-k
    choice sits within float rounding of a tie. Parallel layouts sum in different orders;
    with near-tied routers a 1e-7 difference flips an expert choice and the curves part for
    reasons that have nothing to do with parallelism."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megalora.demo import DemoAssets

    root = tmp_path_factory.mktemp("train-assets")
    shutil.copytree(demo_assets.model_dir, root / "model")
    weights = root / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    for key in tensors:
        if key.endswith("mlp.gate.weight"):
            tensors[key] = tensors[key] * 40.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    shutil.copy(demo_assets.data_file, root / "chats.jsonl")
    return DemoAssets(root=root, model_dir=root / "model", data_file=root / "chats.jsonl")
