"""The local tiny tokenizer and demo chats: deterministic, Qwen-style tokens, every demo row valid."""
from __future__ import annotations

import json

import pytest

from megalora.data.demo_data import write_demo_chats
from megalora.data.tiny_tokenizer import MARKUP_TOKENS, SPECIAL_TOKENS, build_tiny_tokenizer
from megalora.data.validate import validate_conversation


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenizer_is_deterministic(tok_dir, tmp_path):
    again = build_tiny_tokenizer(tmp_path / "again")
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "tokenizer.json" in names
    for name in names:
        assert (tok_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tokenizer_tokens_and_template(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.is_fast and 1000 <= len(tok) <= 2000
    for t in SPECIAL_TOKENS + MARKUP_TOKENS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # Markup tokens survive decoding that drops special tokens, as in Qwen.
    ids = tok("<tool_call>x</tool_call><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"
    text = "def f(x):\n    return x * 2  # ünïcode ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "run", "parameters": {}}}]
    prompt = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n# Tools\n") and '{"name": "run", "parameters": {}}' in prompt
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    plain = tok.apply_chat_template([{"role": "system", "content": "S"}] + messages, tokenize=False)
    assert plain == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_demo_chats(tmp_path):
    a = write_demo_chats(tmp_path / "a.jsonl", num_samples=40, seed=0)
    b = write_demo_chats(tmp_path / "b.jsonl", num_samples=40, seed=0)
    c = write_demo_chats(tmp_path / "c.jsonl", num_samples=40, seed=1)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(rows) == 40
    convs = [validate_conversation(r) for r in rows]
    with_calls = sum(any("tool_calls" in m for m in c["messages"]) for c in convs)
    with_results = sum(any(m["role"] == "tool" for m in c["messages"]) for c in convs)
    assert with_calls >= 20 and with_results >= 20


def test_data_package_does_not_import_megatron():
    import subprocess
    import sys

    code = ("import sys, megalora.data, megalora.data.sampler, megalora.data.dataset; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
