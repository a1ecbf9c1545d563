"""Row processing (parse, convert, validate, tokenise) over a pool of worker processes.

Rows are cut into chunks processed in order (`imap`), so `dataset_num_proc=N` gives exactly
the result of one process. Every row ends as kept (one or more samples) or as skipped with one
reason, so `kept + sum(skipped) == rows_read` always holds: any exception while reading,
validating or tokenising one row (a lone surrogate, JSON nested past the recursion limit, ...)
is that row's problem (`row_error`), never the end of the build.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import asdict, dataclass, field

import jinja2
import numpy as np
from tqdm import tqdm

from megalora.data.encode import EncodedRow, EncodeSettings, TemplateInfo, encode_conversation, template_info
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
    template_mode: str = "auto"
    num_samples: int = 0
    rows_per_turn: int = 0  # rows encoded as one sample per trained turn
    tokens_added: int = 0  # by those rows, over one sample each (their longest)
    reasoning_dropped: int = 0  # rows with reasoning_content the template does not render in a trained turn
    by_source: dict = field(default_factory=dict)  # source -> [rows kept, rows_per_turn, samples, tokens_added]

    def check(self) -> None:
        assert self.kept + sum(self.skipped.values()) == self.rows_read, self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataStats":
        return cls(**d)


def masking_line(s: DataStats) -> str:
    """How rows were masked: the strategy, rows expanded and tokens that cost, reasoning not rendered."""
    line = (f"masking: template_mode={s.template_mode}; {s.kept - s.rows_per_turn} rows as one sample, "
            f"{s.rows_per_turn} rows as one sample per trained turn ({s.num_samples} samples in all, "
            f"+{s.tokens_added} tokens by expansion)")
    if s.reasoning_dropped:
        line += f"; {s.reasoning_dropped} rows have reasoning_content the chat template does not render (not trained)"
    if len(s.by_source) > 1:
        line += "".join(f"\n    {source}: {rows - per_turn} rows as one sample, {per_turn} per trained turn "
                        f"({samples} samples, +{added} tokens)" for source, (rows, per_turn, samples, added) in s.by_source.items())
    return line


@dataclass
class Processed:
    """Tokenised samples (one or more per kept row), flat: sample i is `input_ids[offsets[i]:offsets[i+1]]`."""
    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    source_index: np.ndarray  # which of `sources` each sample came from
    line: np.ndarray  # its line (or row number) there
    sources: list[str]
    stats: DataStats
    problems: list[Problem]  # in row order, at most MAX_PROBLEMS_PER_REASON per reason


def process_row(row: Row, tokenizer, settings: RowSettings, *, info: TemplateInfo) -> EncodedRow | Problem:
    """One row to samples (tokens and labels), or the Problem that drops it."""
    where = f"{row.source}:{row.line}"
    try:
        if row.error is not None:
            raise RowProblem("not_utf8", "", row.error)
        obj = row.obj if row.obj is not None else parse_json_line(row.text)
        conv = to_conversation(obj)
        conv = fill_placeholders(conv, model_name=list(settings.model_name), model_author=list(settings.model_author), where=where)
        conv = validate_conversation(with_default_system(conv, settings.system))
        try:
            return encode_conversation(tokenizer, conv, settings.encode, info=info)
        except jinja2.TemplateError as e:
            raise RowProblem("template_error", "messages", str(e)) from None
    except RowProblem as p:
        return Problem(row.source, row.line, p.field, p.reason, p.detail)
    except DataError:
        raise  # a config mistake (an unset placeholder key): every row would fail alike
    except Exception as e:  # noqa: BLE001 - one row's failure of any kind is that row's problem
        return Problem(row.source, row.line, "", "row_error", f"{type(e).__name__}: {str(e)[:300]}")


_WORKER: dict = {}


def _init_worker(tokenizer, settings: RowSettings) -> None:
    _WORKER.update(tokenizer=tokenizer, settings=settings, info=template_info(tokenizer, settings.encode))


def _process_chunk(rows: list[Row]) -> list[EncodedRow | Problem]:
    return [process_row(r, _WORKER["tokenizer"], _WORKER["settings"], info=_WORKER["info"]) for r in rows]


def _results(rows: list[Row], tokenizer, settings: RowSettings, num_proc: int, progress: bool):
    bar = tqdm(total=len(rows), desc="tokenising", unit="rows", disable=not progress, mininterval=2.0)
    num_proc = max(1, min(num_proc, len(rows) // 64 or 1))
    chunk = max(1, min(1000, len(rows) // (num_proc * 8) or 1))
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    try:
        if num_proc == 1:
            info = template_info(tokenizer, settings.encode)  # no module state here: builds in threads stay independent
            for c in chunks:
                bar.update(len(c))
                yield from (process_row(r, tokenizer, settings, info=info) for r in c)
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

    def __init__(self, num_rows: int, *, strict: bool, template_mode: str):
        self.strict = strict
        self.stats = DataStats(rows_read=num_rows, template_mode=template_mode)
        self.sources: dict[str, int] = {}
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.src: list[int] = []
        self.lines: list[int] = []
        self.problems: list[Problem] = []

    def add(self, row: Row, out: EncodedRow | Problem) -> None:
        stats = self.stats
        if isinstance(out, Problem):
            if self.strict and out.reason in BAD_ROW_REASONS:
                raise DataError.from_problem(out)
            stats.skipped[out.reason] = stats.skipped.get(out.reason, 0) + 1
            if stats.skipped[out.reason] <= MAX_PROBLEMS_PER_REASON:
                self.problems.append(out)
            return
        stats.kept += 1
        stats.reasoning_dropped += out.reasoning_dropped
        counts = stats.by_source.setdefault(row.source, [0, 0, 0, 0])
        counts[0] += 1
        counts[2] += len(out.samples)
        if out.strategy == "per_turn":
            lengths = [len(s.input_ids) for s in out.samples]
            stats.rows_per_turn += 1
            stats.tokens_added += sum(lengths) - max(lengths)
            counts[1] += 1
            counts[3] += sum(lengths) - max(lengths)
        source = self.sources.setdefault(row.source, len(self.sources))
        for sample in out.samples:
            stats.num_samples += 1
            stats.num_tokens += len(sample.input_ids)
            stats.num_trained_tokens += int((sample.labels != -100).sum())
            stats.truncated_left += sample.truncated == "left"
            stats.truncated_right += sample.truncated == "right"
            self.ids.append(sample.input_ids)
            self.labels.append(sample.labels)
            self.src.append(source)
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
    collector = _Collector(len(rows), strict=strict, template_mode=settings.encode.template_mode)
    results = _results(rows, tokenizer, settings, num_proc, progress)
    try:
        for row, out in zip(rows, results):
            collector.add(row, out)
    finally:
        results.close()  # stops the worker pool at once when strict mode raises
    return collector.result()
