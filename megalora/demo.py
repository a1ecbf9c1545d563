"""The embedded tiny default: a Qwen3-Next-shaped model, a tokenizer and sample chats.

Everything is made locally on first use (no downloads): the tokenizer is trained on a
built-in corpus, the model's config and seeded random weights are saved by transformers
itself (so the files have the exact on-disk layout of a real Qwen3-Next checkpoint), and
the chats are generated from templates a tiny model can learn.

`model: demo` and `dataset: demo` in a config resolve to these files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3NextConfig, Qwen3NextForCausalLM

from megalora.data.demo_data import write_demo_chats
from megalora.data.tiny_tokenizer import build_tiny_tokenizer

DEMO = "demo"
# Bump when the files made here change, so that an old cache is not reused.
DEMO_VERSION = 1

# A Qwen3-Next-shaped model small enough for 2 CPU cores: hybrid layers (3 Gated DeltaNet
# then 1 gated full attention), 8 routed experts top-2 plus a gated shared expert.
DEMO_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    full_attention_interval=4,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    partial_rotary_factor=0.25,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    model_dir: Path
    data_file: Path


def demo_root() -> Path:
    base = os.environ.get("MEGALORA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "megalora")
    return Path(base) / f"demo-v{DEMO_VERSION}"


def ensure_demo_assets(root: str | Path | None = None, *, log=print) -> DemoAssets:
    """Create (once) and return the tiny model folder and the sample chat file."""
    root = Path(root) if root is not None else demo_root()
    assets = DemoAssets(root=root, model_dir=root / "model", data_file=root / "chats.jsonl")
    if (root / "DONE").is_file():
        return assets
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename, so a crash or a concurrent rank never sees
    # half-written files.
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    log(f"megalora: creating the embedded tiny demo model and data in {root}")
    _make_model(tmp / "model")
    write_demo_chats(tmp / "chats.jsonl", num_samples=256, seed=0)
    (tmp / "DONE").write_text(json.dumps({"version": DEMO_VERSION}))
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished first; its copy is identical (everything is seeded).
        shutil.rmtree(tmp, ignore_errors=True)
    return assets


def _make_model(out: Path) -> None:
    build_tiny_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = len(tokenizer)
    vocab += -vocab % 8
    config = Qwen3NextConfig(
        vocab_size=vocab,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **DEMO_MODEL,
    )
    torch.manual_seed(0)
    model = Qwen3NextForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
