"""Validation of one conversation: the first problem found raises `RowProblem` naming the field.

A valid conversation comes back normalised: every content a string, every tool call in the
form `{"type": "function", "function": {"name": str, "arguments": dict | str}}` (arguments given
as a JSON string are checked to parse to an object and kept as written: templates that print
strings print the user's text; encode.py parses them for templates that iterate over them),
`tools` a list or None.
"""
from __future__ import annotations

import json

from megalora.data.errors import RowProblem

ROLES = ("system", "user", "assistant", "tool")
_OWN_KEYS = ("role", "content", "tool_calls", "loss")


def _tool_call(call, field: str) -> dict:
    if not isinstance(call, dict):
        raise RowProblem("malformed_tool_calls", field, f"expected an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise RowProblem("malformed_tool_calls", f"{field}.function", f"expected an object, got {type(fn).__name__}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise RowProblem("malformed_tool_calls", f"{field}.function.name", f"expected a non-empty string, got {name!r}")
    arguments = fn.get("arguments")
    if arguments is None:
        arguments = {}
    parsed = arguments
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise RowProblem("malformed_tool_calls", f"{field}.function.arguments", f"not valid JSON: {e.msg}") from None
    if not isinstance(parsed, dict):
        raise RowProblem("malformed_tool_calls", f"{field}.function.arguments",
                         f"expected an object of named arguments, got {type(parsed).__name__}")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _tools(tools) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowProblem("malformed_tools", "tools", f"not valid JSON: {e.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowProblem("malformed_tools", "tools", "expected a list of function schemas (objects)")
    return tools or None


def validate_conversation(conv: dict) -> dict:
    """Check `{"messages", "tools"}`; return the normalised conversation or raise RowProblem."""
    messages = conv.get("messages")
    if not isinstance(messages, list):
        raise RowProblem("missing_messages", "messages", f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RowProblem("empty_conversation", "messages", "the list of messages is empty")
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowProblem("missing_messages", field, f"expected an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RowProblem("unknown_role", f"{field}.role", f"{role!r} (known: {', '.join(ROLES)})")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise RowProblem("malformed_tool_calls", f"{field}.tool_calls", f"only assistant messages make tool calls, not {role}")
        if calls is not None and (not isinstance(calls, list) or not calls):
            raise RowProblem("malformed_tool_calls", f"{field}.tool_calls", "expected a non-empty list of calls")
        content = m.get("content")
        if content is None and calls:
            content = ""  # an assistant turn made only of tool calls
        if not isinstance(content, str):
            raise RowProblem("non_string_content", f"{field}.content", f"expected a string, got {type(content).__name__}")
        loss = m.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise RowProblem("malformed_loss", f"{field}.loss", f"expected true or false, got {loss!r}")
        # Other keys (reasoning_content, name, ...) reach the template; empty ones (None, as a `datasets`
        # table fills in for keys other rows have) do not.
        clean = {k: v for k, v in m.items() if k not in _OWN_KEYS and v is not None}
        clean.update(role=role, content=content)
        if calls:
            clean["tool_calls"] = [_tool_call(c, f"{field}.tool_calls[{j}]") for j, c in enumerate(calls)]
        if loss is not None:
            clean["loss"] = loss
        if role == "tool":
            before = next((p for p in reversed(out) if p["role"] != "tool"), None)
            if before is None or before["role"] != "assistant" or "tool_calls" not in before:
                raise RowProblem("tool_without_call", field, "the closest earlier non-tool message is not an assistant tool call")
        out.append(clean)
    if not any(m["role"] == "assistant" for m in out):
        raise RowProblem("no_assistant_turn", "messages", "nothing to train on: add an assistant message")
    return {"messages": out, "tools": _tools(conv.get("tools"))}
