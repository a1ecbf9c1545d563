"""Row processing (parse, convert, validate, tokenise) over a pool of worker processes.

Rows are cut into chunks processed in order (`imap`), so `dataset_num_proc=N` gives exactly
the result of one process. Every row ends as kept or as skipped with one reason, so
`kept + sum(skipped) == rows_read` always holds.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import asdict, dataclass, field

import numpy as np

from megalora.data.encode import EncodeSettings, Encoded, TemplatePrefixError, encode_conversation, end_markers
from megalora.data.errors import BAD_ROW_REASONS, REASONS, DataError, Problem, RowProblem
from megalora.data.formats import fill_placeholders, parse_json_line, to_conversation
from megalora.data.readers import Row
from megalora.data.swift_options import with_default_system
from megalora.data.validate import validate_conversation

MAX_PROBLEMS_PER_REASON = 10


@dataclass(frozen=True)
class RowSettings:
    """Everything that decides how a row becomes tokens (part of the cache key)."""
    encode: EncodeSettings
    model_name: tuple[str, ...] = ()
    model_author: tuple[str, ...] = ()
    system: str | None = None


@dataclass
class DataStats:
    rows_read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_left: int = 0
    truncated_right: int = 0
    num_tokens: int = 0
    num_trained_tokens: int = 0

    def check(self) -> None:
        assert self.kept + sum(self.skipped.values()) == self.rows_read, self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataStats":
        return cls(**d)


@dataclass
class Processed:
    """Tokenised rows, flat: sample i is `input_ids[offsets[i]:offsets[i+1]]`."""
    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    source_index: np.ndarray  # which of `sources` each sample came from
    line: np.ndarray  # its line (or row number) there
    sources: list[str]
    stats: DataStats
    problems: list[Problem]  # in row order, at most MAX_PROBLEMS_PER_REASON per reason


def process_row(row: Row, tokenizer, settings: RowSettings, *, markers: tuple[str, ...]) -> Encoded | Problem:
    """One row to tokens and labels, or the Problem that drops it."""
    import jinja2

    where = f"{row.source}:{row.line}"
    try:
        obj = row.obj if row.obj is not None else parse_json_line(row.text)
        conv = to_conversation(obj)
        conv = fill_placeholders(conv, model_name=list(settings.model_name), model_author=list(settings.model_author), where=where)
        conv = validate_conversation(with_default_system(conv, settings.system))
        try:
            return encode_conversation(tokenizer, conv, settings.encode, markers=markers)
        except jinja2.TemplateError as e:
            raise RowProblem("template_error", "messages", str(e)) from None
    except RowProblem as p:
        return Problem(row.source, row.line, p.field, p.reason, p.detail)
    except TemplatePrefixError as e:
        raise TemplatePrefixError(f"{where}: {e}") from None
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise ValueError(f"{where}: {e}") from e


_WORKER: dict = {}


def _init_worker(tokenizer, settings: RowSettings) -> None:
    _WORKER.update(tokenizer=tokenizer, settings=settings, markers=end_markers(tokenizer))


def _process_chunk(rows: list[Row]) -> list[Encoded | Problem]:
    return [process_row(r, _WORKER["tokenizer"], _WORKER["settings"], markers=_WORKER["markers"]) for r in rows]


def _results(rows: list[Row], tokenizer, settings: RowSettings, num_proc: int, progress: bool):
    from tqdm import tqdm

    bar = tqdm(total=len(rows), desc="tokenising", unit="rows", disable=not progress, mininterval=2.0)
    num_proc = max(1, min(num_proc, len(rows) // 64 or 1))
    chunk = max(1, min(1000, len(rows) // (num_proc * 8) or 1))
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    try:
        if num_proc == 1:
            markers = end_markers(tokenizer)  # no module state here: builds in threads stay independent
            for c in chunks:
                bar.update(len(c))
                yield from (process_row(r, tokenizer, settings, markers=markers) for r in c)
            return
        methods = multiprocessing.get_all_start_methods()
        # fork shares the loaded tokenizer at no cost; spawn (where fork is missing) pickles it.
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, settings)) as pool:
            for out in pool.imap(_process_chunk, chunks):
                bar.update(len(out))
                yield from out
    finally:
        bar.close()


class _Collector:
    """Accumulates processed rows in row order."""

    def __init__(self, num_rows: int, *, strict: bool):
        self.strict = strict
        self.stats = DataStats(rows_read=num_rows)
        self.sources: dict[str, int] = {}
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.src: list[int] = []
        self.lines: list[int] = []
        self.problems: list[Problem] = []

    def add(self, row: Row, out: Encoded | Problem) -> None:
        stats = self.stats
        if isinstance(out, Problem):
            if self.strict and out.reason in BAD_ROW_REASONS:
                raise DataError.from_problem(out)
            stats.skipped[out.reason] = stats.skipped.get(out.reason, 0) + 1
            if stats.skipped[out.reason] <= MAX_PROBLEMS_PER_REASON:
                self.problems.append(out)
            return
        stats.kept += 1
        stats.num_tokens += len(out.input_ids)
        stats.num_trained_tokens += int((out.labels != -100).sum())
        stats.truncated_left += out.truncated == "left"
        stats.truncated_right += out.truncated == "right"
        self.ids.append(out.input_ids)
        self.labels.append(out.labels)
        self.src.append(self.sources.setdefault(row.source, len(self.sources)))
        self.lines.append(row.line)

    def result(self) -> Processed:
        stats = self.stats
        stats.skipped = {r: stats.skipped[r] for r in REASONS if r in stats.skipped}
        stats.check()
        lengths = np.asarray([len(x) for x in self.ids], dtype=np.int64)
        return Processed(
            input_ids=np.concatenate(self.ids) if self.ids else np.zeros(0, np.int32),
            labels=np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            source_index=np.asarray(self.src, dtype=np.int32), line=np.asarray(self.lines, dtype=np.int64),
            sources=list(self.sources), stats=stats, problems=self.problems)


def process_rows(rows: list[Row], tokenizer, settings: RowSettings, *, num_proc: int = 1, strict: bool = True,
                 progress: bool = False) -> Processed:
    """Process every row; strict mode raises DataError at the first bad row (in row order)."""
    collector = _Collector(len(rows), strict=strict)
    results = _results(rows, tokenizer, settings, num_proc, progress)
    try:
        for row, out in zip(rows, results):
            collector.add(row, out)
    finally:
        results.close()  # stops the worker pool at once when strict mode raises
    return collector.result()
