"""Errors of the data pipeline: one precise message per problem (file, line, field, reason)."""
from __future__ import annotations

from dataclasses import dataclass

from megalora.errors import UserError

# Every reason a row can be skipped for, in report order. Validation reasons are bad rows
# (strict mode stops at them); the last two are produced by tokenisation and never stop a run.
REASONS = {
    "not_utf8": "not UTF-8 text",
    "invalid_json": "not valid JSON (or not a JSON object)",
    "missing_messages": "no `messages` (nor alpaca `instruction`/`output`, sharegpt `conversations`, `query`/`response`)",
    "unknown_role": "unknown role",
    "non_string_content": "content is not a string",
    "malformed_tool_calls": "malformed tool calls",
    "malformed_tools": "malformed `tools`",
    "malformed_loss": "`loss` flag is not true/false",
    "tool_without_call": "tool message with no assistant tool call before it",
    "no_assistant_turn": "no assistant turn",
    "empty_conversation": "empty conversation",
    "template_error": "the chat template rejected the conversation",
    "unmaskable_template": "the chat template's renderings do not locate the assistant's turn",
    "row_error": "the row could not be read or tokenised",
    "too_long": "longer than max_length (truncation_strategy=delete)",
    "no_trained_tokens": "no trained tokens left (all assistant turns masked or truncated away)",
}
BAD_ROW_REASONS = tuple(r for r in REASONS if r not in ("too_long", "no_trained_tokens"))


@dataclass(frozen=True)
class Problem:
    """One bad or dropped row."""
    source: str
    line: int
    field: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        assert self.reason in REASONS, self.reason

    @property
    def message(self) -> str:
        where = f"field `{self.field}`: " if self.field else ""
        return f"{self.source}:{self.line}: {where}{REASONS[self.reason]} ({self.reason}): {self.detail}"


class DataError(UserError, ValueError):
    """A user mistake in the data; the message names file:line and field."""

    def __init__(self, message: str, problem: Problem | None = None):
        super().__init__(message)
        self.problem = problem

    @classmethod
    def from_problem(cls, problem: Problem) -> "DataError":
        return cls(problem.message, problem)


class RowProblem(Exception):
    """Raised inside row processing; turned into a `Problem` with the row's source and line."""

    def __init__(self, reason: str, field: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail
