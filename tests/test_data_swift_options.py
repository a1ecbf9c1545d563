"""ms-swift data options: a default system prompt, loss_scale ignore_empty_think, hub subsets."""
from __future__ import annotations

import json

import pytest

from megalora.data.encode import IGNORE_INDEX, EncodeSettings, encode_conversation
from megalora.data.readers import parse_hub_target, read_datasets
from megalora.data.swift_options import apply_loss_scale, with_default_system
from megalora.data.tiny_tokenizer import build_tiny_tokenizer
from megalora.data.validate import validate_conversation

EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def _trained_text(tok, enc) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids.tolist(), enc.labels.tolist()) if lab != IGNORE_INDEX])


def _encode(tok, messages, loss_scale):
    conv = validate_conversation({"messages": messages})
    row = encode_conversation(tok, conv, EncodeSettings(max_length=4096, loss_scale=loss_scale))
    assert len(row.samples) == 1  # the tiny tokenizer's template is prefix-stable
    return row.samples[0]


def test_ignore_empty_think_drops_only_the_empty_block(tok):
    messages = [{"role": "user", "content": "who are you?"},
                {"role": "assistant", "content": EMPTY_THINK + "I am a bot."},
                {"role": "user", "content": "really?"},
                {"role": "assistant", "content": "<think>\nlet me see\n</think>\n\nYes."}]
    default = _encode(tok, messages, "default")
    ignored = _encode(tok, messages, "ignore_empty_think")
    assert ignored.input_ids.tolist() == default.input_ids.tolist()  # same tokens, fewer trained
    assert _trained_text(tok, default).startswith(EMPTY_THINK + "I am a bot.<|im_end|>")
    text = _trained_text(tok, ignored)
    assert text.startswith("I am a bot.<|im_end|>")
    # A think block with reasoning in it stays trained.
    assert "<think>\nlet me see\n</think>\n\nYes.<|im_end|>" in text
    # Exactly the empty block's tokens left the labels, nothing else.
    block = tok(EMPTY_THINK, add_special_tokens=False)["input_ids"]
    dropped = [t for t, a, b in zip(default.input_ids.tolist(), default.labels.tolist(), ignored.labels.tolist())
               if a != IGNORE_INDEX and b == IGNORE_INDEX]
    assert dropped == block


def test_apply_loss_scale_on_spans():
    text = "xx<think> </think>\nA<think>\n</think>B"
    spans = [(2, len(text))]
    assert apply_loss_scale(text, spans, "default") == spans
    kept = apply_loss_scale(text, spans, "ignore_empty_think")
    assert [text[s:e] for s, e in kept] == ["A", "B"]
    with pytest.raises(ValueError, match="`loss_scale` must be one of"):
        apply_loss_scale(text, spans, "react")


def test_default_system_prompt_goes_first_only_where_none_is(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    out = with_default_system(conv, "You are X.")
    assert out["messages"][0] == {"role": "system", "content": "You are X."} and out["messages"][1:] == conv["messages"]
    own = {"messages": [{"role": "system", "content": "Mine."}, *conv["messages"]]}
    assert with_default_system(own, "You are X.") is own
    assert with_default_system(conv, None) is conv


def test_system_option_reaches_the_tokens(tok, tmp_path):
    from megalora.config import load_config
    from megalora.data.dataset import build_datasets

    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, _ = load_config(None, ["--dataset", str(data), "--system", "You are X."])
    train, _ = build_datasets(cfg.data, tok, cache_dir=None, log=lambda *_: None)
    assert "<|im_start|>system\nYou are X.<|im_end|>" in tok.decode(train[0][0].tolist())
    cfg, _ = load_config(None, ["--dataset", str(data)])
    plain, _ = build_datasets(cfg.data, tok, cache_dir=None, log=lambda *_: None)
    assert "You are X." not in tok.decode(plain[0][0].tolist())


def test_hub_subset_spec_and_local_paths_with_colons(tmp_path, monkeypatch):
    assert parse_hub_target("swift/self-cognition:empty_think") == ("swift/self-cognition", ["empty_think"])
    assert parse_hub_target("AI-ModelScope/LaTeX_OCR:human_handwrite/synthetic") == (
        "AI-ModelScope/LaTeX_OCR", ["human_handwrite", "synthetic"])
    assert parse_hub_target("owner/name") == ("owner/name", [])
    # A local file whose name holds ':' is read as itself.
    local = tmp_path / "v1:train.jsonl"
    local.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    assert len(read_datasets([f"{local}#3"], seed=0)) == 3
    # A hub id with a subset goes to the hub as that subset (offline here: the error names it).
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "http://127.0.0.1:9")
    monkeypatch.delenv("MODELSCOPE_OFFLINE", raising=False)
    with pytest.raises(ValueError, match=r"`swift/self-cognition:empty_think` from ModelScope"):
        read_datasets(["swift/self-cognition:empty_think#500"], seed=0, hub_timeout=3)


def test_hub_subsets_are_each_loaded_and_concatenated(monkeypatch):
    import megalora.data.readers as readers

    asked = []

    def fake_load(dataset_id, *, use_hf, subset, timeout):
        asked.append((dataset_id, subset))
        return [{"messages": [{"role": "user", "content": subset}]}] * 2

    monkeypatch.setattr(readers, "load_hub_dataset", fake_load)
    rows = read_datasets(["owner/set:a/b#3"], seed=0)
    assert asked == [("owner/set", "a"), ("owner/set", "b")]
    assert len(rows) == 3 and {r.source for r in rows} <= {"modelscope:owner/set:a", "modelscope:owner/set:b"}
