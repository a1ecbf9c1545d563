"""Masking under the behaviours of the Qwen3 chat-template families, on fixture templates written here.

- HYBRID (Qwen3-8B / 30B-A3B / 235B): an assistant turn after the last user query gets a
  `<think>` block (empty when it has no reasoning) only while it is the last message or has
  reasoning; earlier turns lose it; `enable_thinking=false` puts an empty block in the
  generation prompt; JSON-style tool calls print string arguments as written.
- THINKING (Thinking-2507, Qwen3-Next-Thinking): the same turns, but the generation prompt ends
  with `<think>\\n`.
- CODER (the tiny tokenizer's own template, Qwen3-Coder-like): no reasoning support, XML-style
  tool calls that iterate over the arguments.

The tokenizer is the tiny byte-level BPE, which has `\\n\\n` as one token, so a token can cross a
prompt/answer edge when the whole text is tokenised at once. Each expected sample is built here
from the template's prompt rendering and a hand-written rendering of the assistant's turn.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megalora.data.encode import IGNORE_INDEX, EncodeSettings, encode_conversation
from megalora.data.errors import DataError
from megalora.data.pipeline import RowSettings, process_rows
from megalora.data.readers import read_jsonl
from megalora.data.tiny_tokenizer import CHAT_TEMPLATE as CODER
from megalora.data.tiny_tokenizer import build_tiny_tokenizer
from megalora.data.validate import validate_conversation

END = "<|im_end|>"

_HEADER = r"""{%- if tools -%}
{{- '<|im_start|>system\n' -}}{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\n\n' -}}{%- endif -%}
{{- '# Tools\n<tools>' -}}{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\nCall a function as <tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call><|im_end|>\n' -}}
{%- elif messages[0].role == 'system' -%}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' -}}{%- endif -%}
{%- set ns = namespace(seeking=true, last_query=messages|length - 1) -%}
{%- for m in messages[::-1] -%}
{%- if ns.seeking and m.role == 'user' and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) -%}
{%- set ns.seeking = false -%}{%- set ns.last_query = messages|length - 1 - loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
{%- set content = m.content if m.content is string else '' -%}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
{{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' -}}
{%- elif m.role == 'assistant' -%}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
{%- if not reasoning and '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
"""
_CALLS_AND_TOOLS = r"""{%- for call in (m.tool_calls or []) -%}
{%- set fn = call.function if call.function else call -%}
{%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
"""
_ASSISTANT = r"""{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}{{- '<|im_start|>assistant\n' + content -}}{%- endif -%}
"""
HYBRID = _HEADER + _ASSISTANT + _CALLS_AND_TOOLS + r"""{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}"""
THINKING = _HEADER + _ASSISTANT + _CALLS_AND_TOOLS + r"""{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}"""
TEMPLATES = {"hybrid": HYBRID, "thinking": THINKING, "coder": CODER}


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


U = {"role": "user", "content": "What is the weather in Paris?"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CONVERSATIONS = {
    "single_turn": [U, {"role": "assistant", "content": "Sunny, 21 degrees."}],
    "system_and_three_turns": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Three?"}, {"role": "assistant", "content": "3, done."}],
    "tool_calls_dict_and_string_arguments": [
        U, {"role": "assistant", "content": "Checking.", "tool_calls": [_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", '{"city":"Paris","day":2}')]},
        {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Sunny today, rain tomorrow."}],
    "parallel_calls": [
        U, {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"}),
                                                               _call("get_weather", {"city": "Lyon", "days": 3})]},
        {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "cloudy"},
        {"role": "assistant", "content": "Paris sunny, Lyon cloudy."}],
    "multi_step_agent": [
        {"role": "user", "content": "Fix the failing test."},
        {"role": "assistant", "content": "", "tool_calls": [_call("run_tests", {})]},
        {"role": "tool", "content": "FAILED test_add"},
        {"role": "assistant", "content": "Reading it.", "tool_calls": [_call("read_file", {"path": "add.py"})]},
        {"role": "tool", "content": "def add(a, b): return a - b"},
        {"role": "assistant", "content": "", "tool_calls": [_call("write_file", {"path": "add.py", "text": "return a + b"})]},
        {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "Fixed: add now adds."}],
    "reasoning_in_one_turn": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "Three and three."}],
    "reasoning_in_every_turn": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "Three and three."}],
    "loss_false_middle_turn": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "loss": False},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}],
    "chinese_and_emoji": [
        {"role": "user", "content": "你好，今天天气怎么样？"}, {"role": "assistant", "content": "晴天 ☀️，二十一度 🙂"},
        {"role": "user", "content": "谢谢 🙏"}, {"role": "assistant", "content": "不客气！🎉"}],
    "newline_leading_answer": [{"role": "user", "content": "Show code"}, {"role": "assistant", "content": "\n\nx = 1"}],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def _with_template(tok, template):
    clone = tok.__class__.from_pretrained(tok.name_or_path)
    clone.chat_template = template
    return clone


def _reference_answer(kind: str, m: dict, *, thinking: bool = True) -> str:
    """What the assistant writes in its own turn (the template's last message), by hand."""
    content = m.get("content") or ""
    calls = []
    for j, c in enumerate(m.get("tool_calls") or []):
        fn, sep = c["function"], "\n" if content or j else ""
        if kind == "coder":
            args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
            params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                             for k, v in args.items())
            calls.append(f"{sep}<tool_call>\n<function={fn['name']}>\n{params}</function>\n</tool_call>")
        else:  # JSON style; string arguments exactly as the user wrote them
            args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"], ensure_ascii=False)
            calls.append(f'{sep}<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>')
    body = content + "".join(calls) + END
    reasoning = (m.get("reasoning_content") or "").strip("\n")
    if kind == "hybrid" and thinking:
        return f"<think>\n{reasoning}\n</think>\n\n" + body.lstrip("\n")
    if kind == "thinking":  # the generation prompt already holds "<think>\n"
        return f"{reasoning}\n</think>\n\n" + body.lstrip("\n")
    return body


def _segments(tok, text: str, spans: list[tuple[int, int]]):
    ids, labels, pos = [], [], 0
    for s, e in [*spans, (len(text), len(text))]:
        for a, b, trained in ((pos, s, False), (s, e, True)):
            piece = tok(text[a:b], add_special_tokens=False)["input_ids"] if b > a else []
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        pos = e
    labels[0] = IGNORE_INDEX
    return ids, labels


def _reference(tok, kind, messages, *, per_turn: bool, kwargs=None):
    """Expected (input_ids, labels) of every sample."""
    kwargs = kwargs or {}
    clean = validate_conversation({"messages": messages})["messages"]
    view = [{k: v for k, v in m.items() if k != "loss"} for m in clean]
    if kind == "coder":  # it iterates over arguments: give JSON strings to it as objects
        for m in view:
            m["tool_calls"] = [_call(c["function"]["name"], json.loads(c["function"]["arguments"])
                                     if isinstance(c["function"]["arguments"], str) else c["function"]["arguments"])
                               for c in m.get("tool_calls", [])] or None
            if m["tool_calls"] is None:
                del m["tool_calls"]
    trained = [i for i, m in enumerate(clean) if m["role"] == "assistant" and m.get("loss", True)]
    thinking = kwargs.get("enable_thinking", True)

    def prompt(i):
        return tok.apply_chat_template(view[:i], tools=TOOLS, tokenize=False, add_generation_prompt=True, **kwargs)

    samples = []
    if per_turn:
        for i in trained:
            p, a = prompt(i), _reference_answer(kind, clean[i], thinking=thinking)
            text = tok.apply_chat_template(view[:i + 1], tools=TOOLS, tokenize=False, **kwargs)
            assert text == p + a + "\n", (kind, i)  # the hand-written turn is the template's
            samples.append(_segments(tok, text, [(len(p), len(p) + len(a))]))
        return samples
    full = tok.apply_chat_template(view, tools=TOOLS, tokenize=False, **kwargs)
    spans = []
    for i in trained:
        p, a = prompt(i), _reference_answer(kind, clean[i], thinking=thinking)
        assert full.startswith(p) and full[len(p):].startswith(a), (kind, i)
        spans.append((len(p), len(p) + len(a)))
    return [_segments(tok, full, spans)]


def _encode(tok, messages, mode="auto", kwargs=None):
    settings = EncodeSettings(max_length=4096, template_mode=mode, template_kwargs=tuple(sorted((kwargs or {}).items())))
    return encode_conversation(tok, validate_conversation({"messages": messages, "tools": TOOLS}), settings)


@pytest.mark.parametrize("kind", list(TEMPLATES))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_trained_tokens_are_the_assistants_own(tok, kind, name):
    t = _with_template(tok, TEMPLATES[kind])
    messages = CONVERSATIONS[name]
    row = _encode(t, messages)
    # The Coder-like template is prefix-stable: one sample. The reasoning ones drop the empty think
    # block of every earlier turn: one sample per trained turn as soon as there are several.
    per_turn = kind != "coder" and sum(m["role"] == "assistant" and m.get("loss", True) for m in messages) > 1
    assert row.strategy == ("per_turn" if per_turn else "incremental")
    for mode in (["auto", "per_turn"] if not per_turn else ["auto"]):
        row = _encode(t, messages, mode)
        expected = _reference(t, kind, [{**m} for m in messages], per_turn=per_turn or mode == "per_turn")
        got = [(s.input_ids.tolist(), s.labels.tolist()) for s in row.samples]
        assert got == expected
    has_reasoning = any(m.get("reasoning_content") for m in messages)
    assert row.reasoning_dropped == (kind == "coder" and has_reasoning)


def test_segments_keep_the_newline_leading_answer_apart(tok):
    """Tokenised at once, `\\n\\n` would merge across the prompt/answer edge; segments keep the
    prompt's own tokens (as at inference) and train every character of the answer."""
    for kind, answer_start in (("coder", "\n\nx = 1"), ("thinking", "\n</think>")):
        t = _with_template(tok, TEMPLATES[kind])
        messages = CONVERSATIONS["newline_leading_answer"]
        prompt = t.apply_chat_template(messages[:1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
        full = t.apply_chat_template(messages, tools=TOOLS, tokenize=False)
        assert full[len(prompt):].startswith(answer_start)
        whole = t(full, add_special_tokens=False)["input_ids"]
        ids_prompt = t(prompt, add_special_tokens=False)["input_ids"]
        assert whole[:len(ids_prompt)] != ids_prompt  # the straddling token exists with this BPE
        sample = _encode(t, messages).samples[0]
        assert sample.input_ids.tolist()[:len(ids_prompt)] == ids_prompt
        assert (sample.labels[:len(ids_prompt)] == IGNORE_INDEX).all()
        trained = sample.input_ids[len(ids_prompt):][sample.labels[len(ids_prompt):] != IGNORE_INDEX]
        assert t.decode(trained.tolist()) == full[len(prompt):].rstrip("\n")


def test_enable_thinking_false_trains_the_answer_only(tok):
    t = _with_template(tok, HYBRID)
    messages = CONVERSATIONS["single_turn"]
    row = _encode(t, messages, kwargs={"enable_thinking": False})
    expected = _reference(t, "hybrid", messages, per_turn=False, kwargs={"enable_thinking": False})
    assert [(s.input_ids.tolist(), s.labels.tolist()) for s in row.samples] == expected
    trained = row.samples[0].input_ids[row.samples[0].labels != IGNORE_INDEX]
    assert t.decode(trained.tolist()) == "Sunny, 21 degrees." + END


def test_string_arguments_verbatim_where_the_template_prints_strings(tok):
    messages = CONVERSATIONS["tool_calls_dict_and_string_arguments"]
    hybrid = _with_template(tok, HYBRID)
    text = hybrid.decode(_encode(hybrid, messages).samples[1].input_ids.tolist())
    assert '"arguments": {"city":"Paris","day":2}}' in text
    coder = _with_template(tok, CODER)
    text = coder.decode(_encode(coder, messages).samples[0].input_ids.tolist())
    assert "<parameter=day>\n2\n</parameter>" in text


def test_incremental_mode_refuses_a_rewriting_template(tok):
    from megalora.data.errors import RowProblem

    t = _with_template(tok, HYBRID)
    with pytest.raises(RowProblem) as e:
        _encode(t, CONVERSATIONS["system_and_three_turns"], "incremental")
    assert e.value.reason == "unmaskable_template"


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(r + "\n" for r in rows))
    return path


def test_bad_rows_are_counted_or_named(tok, tmp_path):
    """Rows that cannot be masked or even tokenised never stop a non-strict build; strict names file:line."""
    t = _with_template(tok, THINKING)
    good = json.dumps({"messages": CONVERSATIONS["system_and_three_turns"]})
    # No user query: the thinking template renders the turn without the `<think>\n` its generation prompt ends with.
    unmaskable = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}]})
    surrogate = '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}'
    nested = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge = json.dumps({"messages": [{"role": "user", "content": "word " * 400_000}, {"role": "assistant", "content": "ok"}]})
    path = _write(tmp_path / "rows.jsonl", [good, unmaskable, good, surrogate, nested, huge, good])
    with path.open("ab") as f:
        f.write(b'{"messages": "\xff"}\n')  # not UTF-8
    settings = RowSettings(encode=EncodeSettings(max_length=256))
    out = process_rows(read_jsonl(path), t, settings, strict=False)
    assert out.stats.kept == 3 and out.stats.rows_read == 8
    assert out.stats.skipped == {"not_utf8": 1, "unmaskable_template": 1, "row_error": 2, "too_long": 1}
    by_line = {p.line: p for p in out.problems}
    assert by_line[8].reason == "not_utf8"
    assert by_line[2].reason == "unmaskable_template"
    assert by_line[4].reason == "row_error" and "TypeError" in by_line[4].detail
    assert by_line[5].reason == "row_error" and "RecursionError" in by_line[5].detail
    assert by_line[6].reason == "too_long" and "characters" in by_line[6].detail  # measured before tokenising
    assert out.stats.num_samples == 9 and out.stats.rows_per_turn == 3 and out.stats.tokens_added > 0
    with pytest.raises(DataError, match=f"{path}:2: .*unmaskable_template"):
        process_rows(read_jsonl(path), t, settings, strict=True)
    for name, bad in (("surrogate", surrogate), ("nested", nested)):
        path = _write(tmp_path / f"{name}.jsonl", [good, bad])
        with pytest.raises(DataError, match=f"{path}:2: .*row_error"):
            process_rows(read_jsonl(path), t, settings, strict=True)


ROOT = Path(__file__).resolve().parents[1]


def test_hybrid_template_model_dry_run_dump_and_train(train_assets, tmp_path):
    """A model with the hybrid template, multi-turn and tool-call data: dry run (strategy, expansion,
    --dump_encoded), then two training steps on the demo path."""
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(train_assets.model_dir, model)
    hybrid = AutoTokenizer.from_pretrained(model)
    hybrid.chat_template = HYBRID
    hybrid.save_pretrained(model)
    names = ["system_and_three_turns", "tool_calls_dict_and_string_arguments", "multi_step_agent", "single_turn",
             "reasoning_in_every_turn"]
    data = _write(tmp_path / "chats.jsonl", [json.dumps({"messages": CONVERSATIONS[n], "tools": TOOLS}) for n in names])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("NPROC_PER_NODE", "NNODES", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    common = [sys.executable, "-m", "megalora", "sft", "--model", str(model), "--dataset", str(data), "--max_length",
              "512", "--micro_batch_size", "2", "--global_batch_size", "2", "--lora_rank", "4"]
    dump = tmp_path / "encoded.jsonl"
    r = subprocess.run([*common, "--dry-run", "--dump_encoded", str(dump)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "template_mode=auto; 1 rows as one sample, 4 rows as one sample per trained turn (13 samples" in r.stdout
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    assert len(lines) == 13
    assert [x["source"] for x in lines[:3]] == [f"{data}:1"] * 3
    expected = _reference(hybrid, "hybrid", CONVERSATIONS["system_and_three_turns"], per_turn=True)
    assert [(x["input_ids"], x["labels"]) for x in lines[:3]] == expected
    r = subprocess.run([*common, "--train_iters", "2", "--save", str(tmp_path / "run")], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_template_options_from_flags_and_yaml(tmp_path):
    from megalora.config import ConfigError, load_config
    from megalora.data.dataset import row_settings

    cfg, _ = load_config(argv=["--enable_thinking", "false", "--chat_template_kwargs", '{"add_vision_id": true}',
                               "--template_mode", "per_turn"])
    encode = row_settings(cfg.data).encode
    assert encode.template_kwargs == (("add_vision_id", True), ("enable_thinking", False))
    assert encode.template_mode == "per_turn"
    (tmp_path / "c.yaml").write_text("data:\n  chat_template_kwargs: {enable_thinking: true}\n")
    cfg, _ = load_config(tmp_path / "c.yaml")
    assert row_settings(cfg.data).encode.template_kwargs == (("enable_thinking", True),)
    with pytest.raises(ConfigError, match="chat_template_kwargs"):
        load_config(argv=["--chat_template_kwargs", "[1, 2]"])
    with pytest.raises(ConfigError, match="template_mode"):
        load_config(argv=["--template_mode", "whole"])


def test_masking_report_per_dataset(tok, tmp_path):
    from megalora.data.pipeline import masking_line

    t = _with_template(tok, HYBRID)
    one = _write(tmp_path / "one.jsonl", [json.dumps({"messages": CONVERSATIONS["single_turn"]})] * 2)
    many = _write(tmp_path / "many.jsonl", [json.dumps({"messages": CONVERSATIONS["system_and_three_turns"]})])
    out = process_rows(read_jsonl(one) + read_jsonl(many), t, RowSettings(encode=EncodeSettings(max_length=512)))
    lengths = np.diff(out.offsets)
    assert out.stats.tokens_added == lengths[2:].sum() - lengths[2:].max()
    report = masking_line(out.stats)
    assert "2 rows as one sample, 1 rows as one sample per trained turn (5 samples in all" in report
    assert f"{one}: 2 rows as one sample, 0 per trained turn (2 samples, +0 tokens)" in report
    assert f"{many}: 0 rows as one sample, 1 per trained turn (3 samples, +{out.stats.tokens_added} tokens)" in report
