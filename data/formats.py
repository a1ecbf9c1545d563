"""Row formats converted to messages: messages (as is), alpaca, sharegpt, query/response.

Also fills the self-cognition placeholders `{{NAME}}` and `{{AUTHOR}}` from `model_name` /
`model_author` (lists of one or two spellings: [Chinese, English]).
"""
from __future__ import annotations

import json
import re
from typing import Any

from megalora.data.errors import DataError, RowProblem

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}
_CJK = re.compile(r"[\u4e00-\u9fff]")
PLACEHOLDERS = ("{{NAME}}", "{{AUTHOR}}")


def parse_json_line(text: str) -> dict:
    """Parse one JSONL line into an object, or raise RowProblem(invalid_json)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RowProblem("invalid_json", "", f"{e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise RowProblem("invalid_json", "", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _string(obj: dict, key: str, *, required: bool) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise RowProblem("non_string_content", key, f"expected a string, got {type(value).__name__}")
    return value


def _from_alpaca(obj: dict) -> list[dict]:
    instruction = _string(obj, "instruction", required=True)
    extra = _string(obj, "input", required=False)
    messages = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _string(obj, "system", required=True)})
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": _string(obj, "output", required=True)})
    return messages


def _from_query_response(obj: dict) -> list[dict]:
    messages = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _string(obj, "system", required=True)})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RowProblem("missing_messages", "history", "expected a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowProblem("missing_messages", f"history[{i}]", "expected a [query, response] pair")
        for j, role in enumerate(("user", "assistant")):
            if not isinstance(pair[j], str):
                raise RowProblem("non_string_content", f"history[{i}][{j}]", f"expected a string, got {type(pair[j]).__name__}")
            messages.append({"role": role, "content": pair[j]})
    messages.append({"role": "user", "content": _string(obj, "query", required=True)})
    messages.append({"role": "assistant", "content": _string(obj, "response", required=True)})
    return messages


def _from_sharegpt(obj: dict) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise RowProblem("missing_messages", "conversations", f"expected a list, got {type(turns).__name__}")
    messages: list[dict] = []
    if obj.get("system") is not None:
        messages.append({"role": "system", "content": _string(obj, "system", required=True)})
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowProblem("missing_messages", field, f"expected an object, got {type(turn).__name__}")
        speaker = turn.get("from")
        if speaker not in _SHAREGPT_ROLES:
            raise RowProblem("unknown_role", f"{field}.from", f"{speaker!r} (known: {', '.join(_SHAREGPT_ROLES)})")
        value = turn.get("value")
        if not isinstance(value, str):
            raise RowProblem("non_string_content", f"{field}.value", f"expected a string, got {type(value).__name__}")
        if speaker == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as e:
                raise RowProblem("malformed_tool_calls", f"{field}.value", f"function_call is not JSON: {e.msg}") from None
            calls = call if isinstance(call, list) else [call]
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in calls]})
        else:
            messages.append({"role": _SHAREGPT_ROLES[speaker], "content": value})
    return messages


def to_conversation(obj: dict) -> dict:
    """Return `{"messages": [...], "tools": list | None}` from any supported row format (not yet validated)."""
    if "messages" in obj:
        messages = obj["messages"]
    elif "conversations" in obj:
        messages = _from_sharegpt(obj)
    elif "instruction" in obj and "output" in obj:
        messages = _from_alpaca(obj)
    elif "query" in obj and "response" in obj:
        messages = _from_query_response(obj)
    else:
        keys = ", ".join(sorted(obj)) or "none"
        raise RowProblem("missing_messages", "messages", f"row has keys: {keys}")
    return {"messages": messages, "tools": obj.get("tools"), "tag": obj.get("tag")}


def _language_index(conv: dict) -> int:
    """0 for Chinese rows, -1 (the English spelling, or the only one) otherwise."""
    tag = conv.get("tag")
    if tag in ("zh", "en"):
        return 0 if tag == "zh" else -1
    text = "".join(m.get("content") or "" for m in conv["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str))
    return 0 if _CJK.search(text) else -1


def fill_placeholders(conv: dict, *, model_name: list[str], model_author: list[str], where: str) -> dict:
    """Replace `{{NAME}}` / `{{AUTHOR}}` in every string content; error naming the config key when unset."""
    messages = conv["messages"]
    if not isinstance(messages, list):
        return conv
    contents = [m.get("content") for m in messages if isinstance(m, dict)]
    if not any(isinstance(c, str) and any(p in c for p in PLACEHOLDERS) for c in contents):
        return conv
    index = _language_index(conv)
    values: dict[str, Any] = {}
    for placeholder, key, spellings in (("{{NAME}}", "model_name", model_name), ("{{AUTHOR}}", "model_author", model_author)):
        if any(isinstance(c, str) and placeholder in c for c in contents):
            if not spellings:
                raise DataError(f"{where}: the data uses the self-cognition placeholder {placeholder}; "
                                 f"set `{key}` (one or two spellings: Chinese, English)")
            values[placeholder] = spellings[index] if len(spellings) > 1 else spellings[0]
    filled = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            content = m["content"]
            for placeholder, value in values.items():
                content = content.replace(placeholder, value)
            m = {**m, "content": content}
        filled.append(m)
    return {**conv, "messages": filled}
