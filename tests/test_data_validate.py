"""Bad rows: one precise message per problem (strict), counts per reason that add up (skip); row formats."""
from __future__ import annotations

import json

import pytest

from megalora.config import DataSection
from megalora.data import DataError, build_dataset
from megalora.data.encode import IGNORE_INDEX
from megalora.data.tiny_tokenizer import build_tiny_tokenizer

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _m(*messages, **extra):
    return json.dumps({"messages": list(messages), **extra})


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
CALL = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}

# (line text, reason, field named in the message)
BAD = [
    ('{"messages": [', "invalid_json", ""),
    ("[1, 2]", "invalid_json", ""),
    ('{"prompt": "x"}', "missing_messages", "messages"),
    (_m(U, {"role": "robot", "content": "x"}, A), "unknown_role", "messages[1].role"),
    (_m(U, {"role": "assistant", "content": 5}), "non_string_content", "messages[1].content"),
    (_m(U, {"role": "assistant", "content": "", "tool_calls": "f()"}), "malformed_tool_calls", "messages[1].tool_calls"),
    (_m(U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}),
     "malformed_tool_calls", "messages[1].tool_calls[0].function.name"),
    (_m(U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}),
     "malformed_tool_calls", "messages[1].tool_calls[0].function.arguments"),
    (_m(U, A, tools=5), "malformed_tools", "tools"),
    (_m(U, {**A, "loss": "no"}), "malformed_loss", "messages[1].loss"),
    (_m(U, {"role": "tool", "content": "r"}, A), "tool_without_call", "messages[1]"),
    (_m(U, CALL, {"role": "tool", "content": "r"}, U, {"role": "tool", "content": "r"}, A), "tool_without_call", "messages[4]"),
    (_m(U), "no_assistant_turn", "messages"),
    (_m(), "empty_conversation", "messages"),
    (_m(U, A, {"role": "system", "content": "late"}, A), "template_error", "messages"),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _build(tok, path, **kw):
    cfg = DataSection(dataset=[str(path)], **kw)
    return build_dataset(cfg, tok, cache_dir=None, log=lambda s: None, progress=False)


@pytest.mark.parametrize("line,reason,field", BAD, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD)])
def test_strict_names_file_line_and_field(tok, tmp_path, line, reason, field):
    path = _write(tmp_path / "d.jsonl", [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    with pytest.raises(DataError) as e:
        _build(tok, path, strict=True)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ")  # the blank line 2 is skipped, line numbers stay the file's
    assert f"({reason})" in msg
    assert e.value.problem.reason == reason and e.value.problem.line == 3 and e.value.problem.field == field
    if field:
        assert f"field `{field}`" in msg
    assert isinstance(e.value, ValueError)


def test_skip_mode_counts_per_reason_add_up(tok, tmp_path):
    lines = [json.dumps(GOOD)] + [b for b, _, _ in BAD] + [json.dumps(GOOD), "   ", json.dumps(GOOD)]
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    lines.append(json.dumps(long))
    path = _write(tmp_path / "d.jsonl", lines)
    ds = _build(tok, path, strict=False, max_length=64)
    expected: dict[str, int] = {}
    for _, reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    expected["too_long"] = 1
    s = ds.stats
    assert s.skipped == expected
    assert s.rows_read == len(BAD) + 4  # non-blank lines
    assert s.kept == 3 == len(ds)
    assert s.kept + sum(s.skipped.values()) == s.rows_read
    assert [ds.provenance(i) for i in range(3)] == [(str(path), 1), (str(path), len(BAD) + 2), (str(path), len(BAD) + 4)]
    # Each stored problem names its own line.
    lines_of = {p.line for p in ds.problems}
    assert lines_of == set(range(2, len(BAD) + 2)) | {len(BAD) + 5}


def test_alpaca_sharegpt_query_response(tok, tmp_path):
    rows = [
        {"instruction": "Add", "input": "1 2", "output": "3", "system": "math"},
        {"conversations": [{"from": "human", "value": "weather?"},
                           {"from": "function_call", "value": json.dumps({"name": "get", "arguments": {"city": "X"}})},
                           {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}]},
        {"query": "who?", "response": "me", "history": [["hi", "hello"]]},
    ]
    path = _write(tmp_path / "f.jsonl", [json.dumps(r) for r in rows])
    ds = _build(tok, path)
    texts = [tok.decode(ds[i][0].tolist()) for i in range(3)]
    assert "<|im_start|>system\nmath<|im_end|>\n<|im_start|>user\nAdd\n1 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>" in texts[0]
    assert "<function=get>\n<parameter=city>\nX\n</parameter>" in texts[1] and "<tool_response>\nsunny\n" in texts[1]
    assert texts[2].startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nwho?")
    trained = tok.decode([t for t in ds[2][1].tolist() if t != IGNORE_INDEX])
    assert trained == "hello<|im_end|>me<|im_end|>"
    bad = _write(tmp_path / "g.jsonl", [json.dumps({"conversations": [{"from": "alien", "value": "x"}]})])
    with pytest.raises(DataError, match=r"g.jsonl:1: field `conversations\[0\].from`"):
        _build(tok, bad)


def test_self_cognition_placeholders(tok, tmp_path):
    rows = [{"query": "你是谁?", "response": "我是{{NAME}},由{{AUTHOR}}训练。", "tag": "zh"},
            {"query": "Who are you?", "response": "I am {{NAME}}, trained by {{AUTHOR}}.", "tag": "en"},
            {"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "{{NAME}}"}]}]
    path = _write(tmp_path / "self.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    ds = _build(tok, path, model_name=["小码", "Coda"], model_author=["码团", "CodaTeam"])
    trained = [tok.decode([t for t in ds[i][1].tolist() if t != IGNORE_INDEX]) for i in range(3)]
    assert trained == ["我是小码,由码团训练。<|im_end|>", "I am Coda, trained by CodaTeam.<|im_end|>", "Coda<|im_end|>"]
    one = _build(tok, path, model_name=["Coda"], model_author=["CT"])
    assert tok.decode([t for t in one[0][1].tolist() if t != IGNORE_INDEX]) == "我是Coda,由CT训练。<|im_end|>"
    with pytest.raises(ValueError, match="self.jsonl:1: .*set `model_name`"):
        _build(tok, path)


def test_normalised_messages_keep_extra_keys_and_drop_empty_ones():
    from megalora.data.validate import validate_conversation

    conv = validate_conversation({"messages": [
        {"role": "user", "content": "q", "name": "bob", "tool_calls": None, "loss": None},
        {"role": "assistant", "content": None, "reasoning_content": "think", "weight": None,
         "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}]})
    assert conv["messages"] == [
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": "", "reasoning_content": "think",
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]  # kept as written
    assert conv["tools"] is None
