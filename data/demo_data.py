"""A learnable demo set: short templated coding chats with tool calls and tool results.

Every conversation follows one of a few fixed patterns with small random fillers (numbers,
file and function names), so a tiny model learns the structure within ~100 steps and its
loss visibly falls. Written as messages JSONL, one conversation per line.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are a helpful coding assistant."
TOOLS = [
    {"type": "function", "function": {
        "name": "run_python", "description": "Run a Python snippet and return its output.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the project.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]
_NAMES = ["main", "utils", "app", "server", "parser", "model", "config", "train", "data", "cli"]
_FUNCS = ["add", "scale", "total", "count", "square", "double", "area", "offset", "size", "score"]


def _call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _arith(rng: random.Random) -> dict:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What is {a} plus {b}? Use Python."},
        {"role": "assistant", "content": "", "tool_calls": [_call("run_python", code=f"print({a} + {b})")]},
        {"role": "tool", "content": str(a + b)},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]}


def _read(rng: random.Random) -> dict:
    name, fn, n = rng.choice(_NAMES), rng.choice(_FUNCS), rng.randint(1, 9)
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"What does {name}.py define?"},
        {"role": "assistant", "content": f"Let me read {name}.py.", "tool_calls": [_call("read_file", path=f"{name}.py")]},
        {"role": "tool", "content": f"def {fn}(x):\n    return x * {n}"},
        {"role": "assistant", "content": f"{name}.py defines {fn}(x), which returns x times {n}."},
    ]}


def _write(rng: random.Random) -> dict:
    fn, n = rng.choice(_FUNCS), rng.randint(2, 9)
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Write a function {fn} that multiplies x by {n}."},
        {"role": "assistant", "content": f"def {fn}(x):\n    return x * {n}"},
    ]}


def _two_files(rng: random.Random) -> dict:
    a, b = rng.sample(_NAMES, 2)
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Show me {a}.py and {b}.py."},
        {"role": "assistant", "content": "", "tool_calls": [_call("read_file", path=f"{a}.py"),
                                                              _call("read_file", path=f"{b}.py")]},
        {"role": "tool", "content": f"# {a}"},
        {"role": "tool", "content": f"# {b}"},
        {"role": "assistant", "content": f"{a}.py and {b}.py each hold one comment."},
    ]}


_PATTERNS = (_arith, _read, _write, _two_files)


def demo_conversations(*, num_samples: int = 256, seed: int = 0) -> list[dict]:
    """The demo conversations as dicts (`messages`, optional `tools`); the same list for the same seed."""
    rng = random.Random(seed)
    return [_PATTERNS[i % len(_PATTERNS)](rng) for i in range(num_samples)]


def write_demo_chats(path: str | Path, *, num_samples: int = 256, seed: int = 0) -> Path:
    """Write `num_samples` demo conversations as messages JSONL to `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for conv in demo_conversations(num_samples=num_samples, seed=seed):
            f.write(json.dumps(conv, ensure_ascii=False) + "\n")
    return path
