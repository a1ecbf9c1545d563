"""Tokenisation with the tokenizer's own chat template, and the assistant-only label mask.

How trained tokens are found, for any template (also those without generation markers):
render the whole conversation once; for each trained assistant turn i render the prefix
`messages[:i]` with the generation prompt (where the assistant starts writing) and
`messages[:i+1]` (where its turn ends). Both renderings must be prefixes of the full one
(checked; a template that rewrites earlier turns fails with a clear error). The characters
in between are what the assistant produces: content, tool-call rendering and its end-of-turn
token (`<|im_end|>`); whitespace the template puts after that token is not trained. The full
text is tokenised once with character offsets and a token is trained when it starts inside a
trained span. The first token of every sample is never trained (nothing before it in the
sample predicts it), so packed samples never predict across their boundary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megalora.data.errors import RowProblem
from megalora.data.swift_options import LOSS_SCALES, apply_loss_scale

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodeSettings:
    max_length: int
    truncation_strategy: str = "delete"
    loss_on: str = "all_assistant"
    loss_scale: str = "default"

    def __post_init__(self) -> None:
        if self.loss_scale not in LOSS_SCALES:
            raise ValueError(f"`loss_scale` must be one of {', '.join(LOSS_SCALES)}; got {self.loss_scale!r}")
        if self.truncation_strategy not in ("delete", "left", "right"):
            raise ValueError(f"`truncation_strategy` must be delete, left or right; got {self.truncation_strategy!r}")
        if self.loss_on not in ("all_assistant", "last_turn"):
            raise ValueError(f"`loss_on` must be all_assistant or last_turn; got {self.loss_on!r}")
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be >= 2; got {self.max_length}")


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], aligned with input_ids (not shifted)
    truncated: str | None  # "left" / "right" when cut to max_length


class TemplatePrefixError(ValueError):
    """The chat template cannot be masked by incremental rendering."""


def _for_template(m: dict) -> dict:
    # Our own keys (loss) stay out of the template's view.
    return {k: v for k, v in m.items() if k != "loss"}


def render(tokenizer, messages: list[dict], tools: list | None, *, add_generation_prompt: bool) -> str:
    """The chat template's text for `messages` (never tokenised here)."""
    return tokenizer.apply_chat_template([_for_template(m) for m in messages], tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def end_markers(tokenizer) -> tuple[str, ...]:
    """Special and added token strings (longest first): whitespace after them ends a turn untrained."""
    markers = set(getattr(tokenizer, "all_special_tokens", []) or [])
    markers.update(tokenizer.get_added_vocab().keys())
    return tuple(sorted(markers, key=len, reverse=True))


def _check_prefix(full: str, part: str, what: str) -> None:
    if full.startswith(part):
        return
    at = next((k for k, (a, b) in enumerate(zip(full, part)) if a != b), min(len(full), len(part)))
    raise TemplatePrefixError(
        f"the chat template renders {what} differently from the same messages inside the whole conversation "
        f"(first difference at character {at}: {part[max(0, at - 30):at + 30]!r} vs {full[max(0, at - 30):at + 30]!r}); "
        "assistant tokens cannot be located by incremental rendering with this template")


def trained_spans(tokenizer, messages: list[dict], tools: list | None, *, loss_on: str,
                  markers: tuple[str, ...] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Full rendering and the [start, end) character spans the assistant produces in trained turns."""
    markers = end_markers(tokenizer) if markers is None else markers
    full = render(tokenizer, messages, tools, add_generation_prompt=False)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = assistant[-1:] if loss_on == "last_turn" else assistant
    spans = []
    for i in chosen:
        if messages[i].get("loss", True) is False:
            continue
        prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        upto = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False)
        _check_prefix(full, prompt, f"messages[:{i}] with the generation prompt")
        _check_prefix(full, upto, f"messages[:{i + 1}]")
        start, end = len(prompt), len(upto)
        body = full[start:end]
        stripped = body.rstrip()
        if stripped != body and stripped.endswith(markers):
            end = start + len(stripped)
        if end > start:
            spans.append((start, end))
    return full, spans


def encode_conversation(tokenizer, conv: dict, settings: EncodeSettings, *,
                        markers: tuple[str, ...] | None = None) -> Encoded:
    """Tokenise a validated conversation; RowProblem(too_long / no_trained_tokens) when it must be dropped."""
    full, spans = trained_spans(tokenizer, conv["messages"], conv.get("tools"), loss_on=settings.loss_on, markers=markers)
    spans = apply_loss_scale(full, spans, settings.loss_scale)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
    trained = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        trained |= (starts >= s) & (starts < e)
    labels = np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
    truncated = None
    limit = settings.max_length
    if len(ids) > limit:
        if settings.truncation_strategy == "delete":
            raise RowProblem("too_long", "", f"{len(ids)} tokens > max_length {limit}")
        truncated = settings.truncation_strategy
        cut = slice(len(ids) - limit, None) if truncated == "left" else slice(0, limit)
        ids, labels = ids[cut].copy(), labels[cut].copy()
    labels[0] = IGNORE_INDEX
    if not (labels != IGNORE_INDEX).any():
        raise RowProblem("no_trained_tokens", "messages", "every assistant token is masked or was truncated away")
    return Encoded(ids, labels, truncated)


def check_tokenizer(tokenizer) -> None:
    """Raise ValueError unless the tokenizer can map characters to tokens and has a chat template."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast tokenizer: "
                         "label masks need character offsets (tokenizer.json)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
