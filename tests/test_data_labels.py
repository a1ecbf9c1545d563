"""Label masks: trained tokens are exactly what the assistant produces, checked against hand-written renderings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from megalora.data.encode import IGNORE_INDEX, EncodeSettings, encode_conversation
from megalora.data.errors import RowProblem
from megalora.data.tiny_tokenizer import build_tiny_tokenizer
from megalora.data.validate import validate_conversation

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def _call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _trained_runs(tok, ids, labels) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == t, "a trained label must be the token itself (labels are not shifted)"
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def _encode(tok, messages, tools=None, **kw):
    settings = EncodeSettings(max_length=kw.pop("max_length", 4096), **kw)
    conv = validate_conversation({"messages": messages, "tools": tools})
    row = encode_conversation(tok, conv, settings)
    assert row.strategy == "incremental" and len(row.samples) == 1  # this template is prefix-stable
    return row.samples[0]


def _check(tok, messages, expected, tools=None, **kw):
    enc = _encode(tok, messages, tools, **kw)
    clean = validate_conversation({"messages": messages})["messages"]
    for m in clean:  # this template iterates over arguments: JSON strings are given to it as objects
        for c in m.get("tool_calls", []):
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    full = tok.apply_chat_template([{k: v for k, v in m.items() if k != "loss"} for m in clean], tools=tools,
                                   tokenize=False)
    # The ids spell the whole rendering.
    assert tok.decode(enc.input_ids.tolist()) == full
    runs = _trained_runs(tok, enc.input_ids, enc.labels)
    assert runs == expected
    # Each trained span sits in the rendering right after an assistant header, in order.
    at = 0
    for text in expected:
        pos = full.find("<|im_start|>assistant\n" + text, at)
        assert pos >= 0, text
        at = pos + 1
    assert enc.labels[0] == IGNORE_INDEX
    return enc


def test_single_turn(tok):
    _check(tok, [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
           ["Hello! How can I help?" + END])


def test_system_and_multi_turn(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2, then 3."}]
    _check(tok, messages, ["1" + END, "2, then 3." + END])


def test_tool_call_and_tool_results(tok):
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Show a.py and b.py"},
        {"role": "assistant", "content": "Reading both.", "tool_calls": [_call("read_file", path="a.py"),
                                                                       _call("read_file", path="b.py", lines=3)]},
        {"role": "tool", "content": "x = 1"}, {"role": "tool", "content": "y = 2"},
        {"role": "assistant", "content": "a.py sets x, b.py sets y."},
    ]
    first = ("Reading both.\n<tool_call>\n<function=read_file>\n<parameter=path>\na.py\n</parameter>\n</function>\n"
             "</tool_call>\n<tool_call>\n<function=read_file>\n<parameter=path>\nb.py\n</parameter>\n"
             "<parameter=lines>\n3\n</parameter>\n</function>\n</tool_call>" + END)
    enc = _check(tok, messages, [first, "a.py sets x, b.py sets y." + END], tools=tools)
    full = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    # Consecutive tool results share one user turn and are never trained.
    assert "<|im_start|>user\n<tool_response>\nx = 1\n</tool_response>\n<tool_response>\ny = 2\n</tool_response>" + END in full
    assert "x = 1" not in "".join(_trained_runs(tok, enc.input_ids, enc.labels))


def test_tool_call_without_content_and_string_arguments(tok):
    messages = [{"role": "user", "content": "sum?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"function": {"name": "run_python", "arguments": '{"code": "print(1 + 2)"}'}}]},
                {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]
    _check(tok, messages, ["<tool_call>\n<function=run_python>\n<parameter=code>\nprint(1 + 2)\n</parameter>\n"
                           "</function>\n</tool_call>" + END, "3" + END])


def test_loss_false_turns_are_not_trained(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "loss": False},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "third", "loss": True}]
    _check(tok, messages, ["second" + END, "third" + END])


def test_last_turn_mode(tok):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]
    _check(tok, messages, ["second" + END], loss_on="last_turn")
    messages[-1]["loss"] = False
    with pytest.raises(RowProblem) as e:
        _encode(tok, messages, loss_on="last_turn")
    assert e.value.reason == "no_trained_tokens"


def test_truncation(tok):
    messages = [{"role": "user", "content": "count please " * 20}, {"role": "assistant", "content": "one two three four"}]
    whole = _encode(tok, messages)
    n = len(whole.input_ids)
    with pytest.raises(RowProblem) as e:
        _encode(tok, messages, max_length=n - 1, truncation_strategy="delete")
    assert e.value.reason == "too_long" and str(n) in e.value.detail
    left = _encode(tok, messages, max_length=n - 5, truncation_strategy="left")
    assert left.truncated == "left" and left.input_ids.tolist() == whole.input_ids[5:].tolist()
    assert left.labels[1:].tolist() == whole.labels[6:].tolist() and left.labels[0] == IGNORE_INDEX
    right = _encode(tok, messages, max_length=n - 3, truncation_strategy="right")
    assert right.truncated == "right" and right.input_ids.tolist() == whole.input_ids[:n - 3].tolist()
    assert right.labels.tolist() == whole.labels[:n - 3].tolist()
    # Cut before the assistant speaks: nothing to train, the sample is dropped with its reason.
    with pytest.raises(RowProblem) as e:
        _encode(tok, messages, max_length=8, truncation_strategy="right")
    assert e.value.reason == "no_trained_tokens"


def test_template_that_rewrites_history(tok):
    # A template that drops earlier assistant turns cannot be masked by prefixes: refused by
    # template_mode=incremental, one sample per trained turn otherwise.
    rewriting = ("{%- for m in messages -%}{%- if m.role != 'assistant' or loop.last -%}"
                 "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' -}}{%- endif -%}{%- endfor -%}"
                 "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")
    original = tok.chat_template
    tok.chat_template = rewriting
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    conv = validate_conversation({"messages": messages})
    try:
        with pytest.raises(RowProblem, match="messages\\[:1\\] with the generation prompt") as e:
            encode_conversation(tok, conv, EncodeSettings(max_length=512, template_mode="incremental"))
        assert e.value.reason == "unmaskable_template"
        row = encode_conversation(tok, conv, EncodeSettings(max_length=512))
        assert row.strategy == "per_turn"
        assert [_trained_runs(tok, s.input_ids, s.labels) for s in row.samples] == [["b" + END], ["d" + END]]
        assert tok.decode(row.samples[1].input_ids.tolist()) == tok.apply_chat_template(messages, tokenize=False)
    finally:
        tok.chat_template = original


def test_mask_matches_offsets_of_the_rendering(tok):
    """Independent oracle: mark tokens whose characters fall in hand-located assistant bodies."""
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "answer one"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "", "tool_calls": [_call("run_python", code="x")]},
                {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}]
    enc = _encode(tok, messages)
    full = tok.apply_chat_template(messages, tokenize=False)
    header = "<|im_start|>assistant\n"
    spans, at = [], 0
    while (pos := full.find(header, at)) >= 0:
        start = pos + len(header)
        end = full.index(END, start) + len(END)
        spans.append((start, end))
        at = end
    offsets = tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    expected = np.array([any(s <= a and b <= e for s, e in spans) for a, b in offsets])
    assert len(spans) == 3
    assert ((enc.labels != IGNORE_INDEX) == expected).all()
