"""A readable account of the data: counts, and one sample with its trained tokens marked."""
from __future__ import annotations

import numpy as np

from megalora.data.errors import REASONS
from megalora.data.pipeline import masking_line
from megalora.data.pack import best_fit_decreasing, packing_efficiency

GREEN, RESET = "\x1b[32m", "\x1b[0m"


def render_sample(tokenizer, input_ids, labels, *, color: bool = False) -> str:
    """The sample's text with trained spans wrapped in [[...]] (or ANSI green when `color`)."""
    open_, close = (GREEN, RESET) if color else ("[[", "]]")
    ids = [int(t) for t in input_ids]
    trained = [int(x) != -100 for x in labels]
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or trained[k] != trained[start]:
            text = tokenizer.decode(ids[start:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(f"{open_}{text}{close}" if trained[start] else text)
            start = k
    return "".join(out)


def summarize(dataset, *, tokenizer=None, max_length: int | None = None, packing: bool = False,
              sample_index: int = 0, color: bool = False) -> str:
    """Counts (rows read, kept, skipped per reason, truncated, tokens, trained tokens, packing
    efficiency) and, given the tokenizer, one rendered sample with its trained tokens marked."""
    s = dataset.stats
    lines = [f"data[{dataset.name}]: {s.rows_read} rows read, {s.kept} kept, {sum(s.skipped.values())} skipped"]
    for reason, n in s.skipped.items():
        lines.append(f"  skipped {n:>8} {reason}: {REASONS[reason]}")
        example = next((p for p in dataset.problems if p.reason == reason), None)
        if example is not None:
            lines.append(f"           e.g. {example.message}")
    lines.append(f"  truncated: {s.truncated_left} left, {s.truncated_right} right")
    lines.append(f"  {masking_line(s)}")
    lengths = dataset.lengths
    if len(lengths):
        lines.append(f"  tokens: {s.num_tokens} ({s.num_trained_tokens} trained, "
                     f"{s.num_trained_tokens / max(1, s.num_tokens):.1%}); sample length mean {lengths.mean():.1f}, "
                     f"max {int(lengths.max())}")
    if packing and max_length is not None and len(lengths):
        bins = best_fit_decreasing(lengths, max_length)
        lines.append(f"  packing: {len(lengths)} samples into {len(bins)} sequences of {max_length}, "
                     f"efficiency {packing_efficiency(lengths, bins, max_length):.1%}")
    if tokenizer is not None and len(dataset):
        index = int(np.clip(sample_index, 0, len(dataset) - 1))
        source, line = dataset.provenance(index)
        ids, labels = dataset[index]
        marks = "green" if color else "[[...]]"
        lines.append(f"  sample {index} ({source}:{line}), trained tokens in {marks}:")
        lines.append(render_sample(tokenizer, ids, labels, color=color))
    return "\n".join(lines)
