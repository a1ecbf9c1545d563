"""Two ms-swift data options, kept apart from the chat-template encoder that calls them.

- `system`: a default system prompt, put first in a conversation that has no system message
  (ms-swift's `--system`). A conversation's own system message always wins.
- `loss_scale`: which characters of the trained assistant spans keep their loss.
  `default` keeps all of them; `ignore_empty_think` takes out every empty reasoning block
  (`<think>` + whitespace + `</think>` + whitespace, as the Qwen3 hybrid template writes
  `<think>\\n\\n</think>\\n\\n` into a non-thinking answer), so the model is not taught to
  emit it. The encoder works on character spans of the rendered text; a token is trained
  when it starts inside a kept span, so the block's tokens drop out and the answer's stay.
"""
from __future__ import annotations

import re

LOSS_SCALES = ("default", "ignore_empty_think")
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


def with_default_system(conv: dict, system: str | None) -> dict:
    """`conv` with `system` as its first message when it has none (unchanged when `system` is None)."""
    messages = conv.get("messages")
    if system is None or not isinstance(messages, list) or any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        return conv
    return {**conv, "messages": [{"role": "system", "content": system}, *messages]}


def apply_loss_scale(text: str, spans: list[tuple[int, int]], loss_scale: str) -> list[tuple[int, int]]:
    """The [start, end) character spans of `text` still trained under `loss_scale`."""
    if loss_scale not in LOSS_SCALES:
        raise ValueError(f"`loss_scale` must be one of {', '.join(LOSS_SCALES)}; got {loss_scale!r}")
    if loss_scale == "default":
        return list(spans)
    kept = []
    for start, end in spans:
        at = start
        for m in EMPTY_THINK.finditer(text, start, end):
            if m.start() > at:
                kept.append((at, m.start()))
            at = max(at, m.end())
        if end > at:
            kept.append((at, end))
    return kept
