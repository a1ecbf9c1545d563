"""Tokenisation with the tokenizer's own chat template, and the assistant-only label mask.

How trained text is found, for any template (also those without generation markers): for a
trained assistant turn i, `render(messages[:i], generation prompt)` is what the model is given
at inference and `render(messages[:i+1])` ends after its turn; the characters in between are
what the assistant produces (reasoning block, content, tool-call rendering and its end-of-turn
token `<|im_end|>`; whitespace the template puts after that token is not trained).

Masking strategies (`template_mode`):
- `incremental`: one sample per conversation, the whole rendering, every trained turn located
  by the prefixes above. Exact only where the template is prefix-stable (every such prefix
  rendering starts the full one: Qwen3-Coder, Instruct-2507). A row where it is not (the Qwen3
  hybrid template drops history reasoning and the empty `<think>\\n\\n</think>\\n\\n` of
  earlier turns; Thinking-2507 ends its generation prompt with `<think>\\n`) is skipped as
  `unmaskable_template`.
- `per_turn`: one sample per trained turn, `render(messages[:i+1])` with only turn i trained,
  so every trained turn sees exactly the context the template gives it at inference. Exact for
  every template; costs the history's tokens again for each turn.
- `auto` (default): `incremental` for rows whose renderings are prefix-stable, `per_turn` for
  the others. Exact for every template, and as cheap as `incremental` where that is exact.

The rendering is tokenised in segments cut at span edges (prompt, each trained span, the rest),
so no token crosses a boundary and the prompt ends on its own token, as at inference. The first
token of every sample is never trained (nothing before it in the sample predicts it), so packed
samples never predict across their boundary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from megalora.data.errors import DataError, RowProblem
from megalora.data.swift_options import LOSS_SCALES, apply_loss_scale

IGNORE_INDEX = -100
TEMPLATE_MODES = ("auto", "per_turn", "incremental")


@dataclass(frozen=True)
class EncodeSettings:
    max_length: int
    truncation_strategy: str = "delete"
    loss_on: str = "all_assistant"
    template_mode: str = "auto"
    template_kwargs: tuple = ()  # sorted (name, value) pairs passed to the chat template
    loss_scale: str = "default"  # data.swift_options: which characters of trained spans keep their loss

    def __post_init__(self) -> None:
        if self.loss_scale not in LOSS_SCALES:
            raise ValueError(f"`loss_scale` must be one of {', '.join(LOSS_SCALES)}; got {self.loss_scale!r}")
        if self.truncation_strategy not in ("delete", "left", "right"):
            raise ValueError(f"`truncation_strategy` must be delete, left or right; got {self.truncation_strategy!r}")
        if self.loss_on not in ("all_assistant", "last_turn"):
            raise ValueError(f"`loss_on` must be all_assistant or last_turn; got {self.loss_on!r}")
        if self.template_mode not in TEMPLATE_MODES:
            raise ValueError(f"`template_mode` must be one of {', '.join(TEMPLATE_MODES)}; got {self.template_mode!r}")
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be >= 2; got {self.max_length}")


@dataclass
class Encoded:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], aligned with input_ids (not shifted)
    truncated: str | None  # "left" / "right" when cut to max_length


@dataclass
class EncodedRow:
    """The samples one conversation gives, and how."""
    samples: list[Encoded]
    strategy: str  # "incremental" (one sample) or "per_turn" (one sample per trained turn)
    reasoning_dropped: bool  # a trained turn's reasoning_content is not in what the template renders


@dataclass(frozen=True)
class TemplateInfo:
    """What is learned once per tokenizer (not per row)."""
    markers: tuple[str, ...]  # special and added token strings, longest first
    verbatim_arguments: bool  # the template prints JSON-string tool arguments as written
    max_token_chars: int  # no token covers more characters: a cheap lower bound on a text's token count
    kwargs: dict  # chat-template keyword arguments (enable_thinking, ...)


_PROBE_ARGUMENTS = '{"probe_argument":"as written"}'  # compact: a re-serialisation (tojson) differs


def template_info(tokenizer, settings: EncodeSettings) -> TemplateInfo:
    """End markers, whether the template prints string tool arguments as written (probed once), the longest token."""
    markers = set(getattr(tokenizer, "all_special_tokens", []) or [])
    markers.update(tokenizer.get_added_vocab().keys())
    kwargs = dict(settings.template_kwargs)
    probe = [{"role": "user", "content": "probe"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "probe", "arguments": _PROBE_ARGUMENTS}}]}]
    try:
        verbatim = _PROBE_ARGUMENTS in tokenizer.apply_chat_template(probe, tokenize=False, **kwargs)
    except Exception:  # templates that iterate over the arguments fail on a string: they need objects
        verbatim = False
    return TemplateInfo(markers=tuple(sorted(markers, key=len, reverse=True)), verbatim_arguments=verbatim,
                        max_token_chars=max(1, max(len(t) for t in tokenizer.get_vocab())), kwargs=kwargs)


def _for_template(m: dict, verbatim_arguments: bool) -> dict:
    # Our own keys (loss) stay out of the template's view; JSON-string arguments become objects
    # unless the template prints them as written.
    out = {k: v for k, v in m.items() if k != "loss"}
    if "tool_calls" in out and not verbatim_arguments:
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments_object(c["function"]["arguments"])}}
                             for c in out["tool_calls"]]
    return out


def _arguments_object(arguments):
    if isinstance(arguments, str):
        return json.loads(arguments) if arguments.strip() else {}
    return arguments


def render(tokenizer, messages: list[dict], tools: list | None, *, add_generation_prompt: bool,
           info: TemplateInfo) -> str:
    """The chat template's text for `messages` (never tokenised here)."""
    return tokenizer.apply_chat_template([_for_template(m, info.verbatim_arguments) for m in messages], tools=tools,
                                         tokenize=False, add_generation_prompt=add_generation_prompt, **info.kwargs)


def _difference(full: str, part: str) -> str:
    at = next((k for k, (a, b) in enumerate(zip(full, part)) if a != b), min(len(full), len(part)))
    return f"first difference at character {at}: {part[max(0, at - 30):at + 30]!r} vs {full[max(0, at - 30):at + 30]!r}"


def _turn_end(body: str, markers: tuple[str, ...]) -> int:
    """Length of the trained part of an assistant body: whitespace after its end-of-turn token is not trained."""
    stripped = body.rstrip()
    return len(stripped) if stripped != body and stripped.endswith(markers) else len(body)


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # [start, end) character spans of trained turns, in order
    turns: list[int]  # the message index of each span


def _incremental(tokenizer, messages, tools, chosen, info) -> Rendered | str:
    """One rendering with every chosen turn located, or why the template is not prefix-stable here."""
    full = render(tokenizer, messages, tools, add_generation_prompt=False, info=info)
    spans = []
    for i in chosen:
        prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True, info=info)
        if not full.startswith(prompt):
            return f"messages[:{i}] with the generation prompt render differently ({_difference(full, prompt)})"
        upto = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False, info=info)
        if not full.startswith(upto) or len(upto) < len(prompt):
            return f"messages[:{i + 1}] render differently ({_difference(full, upto)})"
        start = len(prompt)
        spans.append((start, start + _turn_end(full[start:len(upto)], info.markers)))
    return Rendered(full, spans, list(chosen))


def _per_turn(tokenizer, messages, tools, chosen, info) -> list[Rendered]:
    out = []
    for i in chosen:
        prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True, info=info)
        text = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False, info=info)
        if not text.startswith(prompt):
            options = f" with chat-template options {info.kwargs}" if info.kwargs else ""
            raise RowProblem("unmaskable_template", f"messages[{i}]", f"the generation prompt{options} is not where "
                             f"messages[{i}] starts ({_difference(text, prompt)})")
        start = len(prompt)
        out.append(Rendered(text, [(start, start + _turn_end(text[start:], info.markers))], [i]))
    return out


def plan(tokenizer, messages: list[dict], tools: list | None, *, settings: EncodeSettings,
         info: TemplateInfo) -> tuple[str, list[Rendered]]:
    """The strategy used for this conversation and its renderings with trained spans (untokenised)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = [i for i in (assistant[-1:] if settings.loss_on == "last_turn" else assistant)
              if messages[i].get("loss", True) is not False]
    if not chosen:
        raise RowProblem("no_trained_tokens", "messages", "every assistant turn has loss: false")
    if settings.template_mode != "per_turn":
        one = _incremental(tokenizer, messages, tools, chosen, info)
        if isinstance(one, Rendered):
            return "incremental", [one]
        if settings.template_mode == "incremental":
            raise RowProblem("unmaskable_template", "messages",
                             f"{one}; template_mode=incremental needs a prefix-stable template (auto or per_turn mask it)")
    return "per_turn", _per_turn(tokenizer, messages, tools, chosen, info)


def _reasoning_dropped(messages: list[dict], rendered: list[Rendered]) -> bool:
    for r in rendered:
        for (s, e), i in zip(r.spans, r.turns):
            reasoning = messages[i].get("reasoning_content")
            if isinstance(reasoning, str) and reasoning.strip() and reasoning.strip() not in r.text[s:e]:
                return True
    return False


def tokenise_segments(tokenizer, r: Rendered) -> tuple[list[int], list[bool]]:
    """Token ids of `r.text` cut at every span edge, and which tokens are trained."""
    ids: list[int] = []
    trained: list[bool] = []
    pos = 0
    for s, e in [*r.spans, (len(r.text), len(r.text))]:
        assert pos <= s <= e, (pos, s, e)
        for a, b, flag in ((pos, s, False), (s, e, True)):
            if b > a:
                piece = tokenizer(r.text[a:b], add_special_tokens=False)["input_ids"]
                ids.extend(piece)
                trained.extend([flag] * len(piece))
        pos = e
    return ids, trained


def _encode_one(tokenizer, r: Rendered, settings: EncodeSettings, info: TemplateInfo) -> Encoded:
    limit = settings.max_length
    if settings.truncation_strategy == "delete" and len(r.text) > limit * info.max_token_chars:
        # Measured without tokenising: no token covers more than max_token_chars characters.
        raise RowProblem("too_long", "", f"{len(r.text)} characters: at least "
                         f"{-(-len(r.text) // info.max_token_chars)} tokens > max_length {limit}")
    if settings.loss_scale != "default":
        r = Rendered(r.text, apply_loss_scale(r.text, r.spans, settings.loss_scale), r.turns)
    ids_list, trained = tokenise_segments(tokenizer, r)
    ids = np.asarray(ids_list, dtype=np.int32)
    labels = np.where(np.asarray(trained, dtype=bool), ids, IGNORE_INDEX).astype(np.int32)
    truncated = None
    if len(ids) > limit:
        if settings.truncation_strategy == "delete":
            raise RowProblem("too_long", "", f"{len(ids)} tokens > max_length {limit}")
        truncated = settings.truncation_strategy
        cut = slice(len(ids) - limit, None) if truncated == "left" else slice(0, limit)
        ids, labels = ids[cut].copy(), labels[cut].copy()
    labels[0] = IGNORE_INDEX
    return Encoded(ids, labels, truncated)


def encode_conversation(tokenizer, conv: dict, settings: EncodeSettings, *, info: TemplateInfo | None = None) -> EncodedRow:
    """Tokenise a validated conversation; RowProblem (too_long, no_trained_tokens, unmaskable_template) drops it."""
    info = template_info(tokenizer, settings) if info is None else info
    messages = conv["messages"]
    strategy, rendered = plan(tokenizer, messages, conv.get("tools"), settings=settings, info=info)
    samples = [_encode_one(tokenizer, r, settings, info) for r in rendered]
    samples = [s for s in samples if (s.labels != IGNORE_INDEX).any()]
    if not samples:
        raise RowProblem("no_trained_tokens", "messages", "every assistant token is masked or was truncated away")
    return EncodedRow(samples, strategy, _reasoning_dropped(messages, rendered))


def check_tokenizer(tokenizer) -> None:
    """Raise ValueError unless the tokenizer has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
