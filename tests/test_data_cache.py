"""build_dataset end to end: worker processes, the on-disk cache, rank ordering, eval split, summarize."""
from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest

from megalora.config import DataSection
from megalora.data import DataError, build_dataset, build_datasets, summarize, write_demo_chats
from megalora.data.pack import best_fit_decreasing, packing_efficiency
from megalora.data.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture()
def data_file(tmp_path):
    path = write_demo_chats(tmp_path / "demo.jsonl", num_samples=150, seed=3)
    lines = path.read_text().splitlines()
    lines[7] = '{"messages": ['  # invalid JSON
    lines[40] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    path.write_text("\n".join(lines) + "\n")
    return path


def _same(a, b):
    for name in ("input_ids", "labels", "offsets", "source_index", "line"):
        assert np.array_equal(getattr(a.data, name), getattr(b.data, name)), name
    assert a.stats == b.stats and a.problems == b.problems and a.data.sources == b.data.sources


def _build(tok, path, cache_dir=None, logs=None, **kw):
    cfg = DataSection(dataset=[str(path)], max_length=kw.pop("max_length", 512), strict=kw.pop("strict", False), **kw)
    return build_dataset(cfg, tok, cache_dir=cache_dir, log=(logs.append if logs is not None else lambda s: None),
                         progress=False)


def test_two_workers_equal_one(tok, data_file):
    one = _build(tok, data_file, dataset_num_proc=1)
    two = _build(tok, data_file, dataset_num_proc=2)
    _same(one, two)
    assert one.stats.skipped == {"invalid_json": 1, "no_assistant_turn": 1} and one.stats.kept == 148
    errors = []
    for num_proc in (1, 2):
        with pytest.raises(DataError) as e:
            _build(tok, data_file, dataset_num_proc=num_proc, strict=True)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{data_file}:8: ")


def test_cache_hit_and_misses(tok, data_file, tmp_path):
    cache = tmp_path / "cache"
    logs: list[str] = []
    first = _build(tok, data_file, cache, logs)
    assert not any("cache hit" in s for s in logs) and len(list(cache.glob("tokenized-*"))) == 1
    uncached = _build(tok, data_file)
    _same(first, uncached)

    logs.clear()
    again = _build(tok, data_file, cache, logs, dataset_num_proc=2)  # worker count is not part of the key
    assert any("cache hit" in s for s in logs) and again.key == first.key
    _same(first, again)

    for change in ({"max_length": 400}, {"loss_on": "last_turn"}, {"truncation_strategy": "right"},
                   {"model_name": ["x"]}):
        logs.clear()
        other = _build(tok, data_file, cache, logs, **change)
        assert not any("cache hit" in s for s in logs), change
        assert other.key != first.key
    logs.clear()
    _build(tok, data_file, cache, logs, load_from_cache_file=False)
    assert not any("cache hit" in s for s in logs)

    # One character of the file changed: a miss, and the new content is what comes back.
    data_file.write_text(data_file.read_text().replace("helpful coding assistant", "helpful coding assistent", 1))
    logs.clear()
    edited = _build(tok, data_file, cache, logs)
    assert not any("cache hit" in s for s in logs) and edited.key != first.key
    _same(edited, _build(tok, data_file))


def test_tokenizer_change_misses(tok, data_file, tmp_path):
    cache = tmp_path / "cache"
    base = _build(tok, data_file, cache)
    original = tok.chat_template
    tok.chat_template = original.replace("You may call these functions:", "Functions:")
    try:
        logs: list[str] = []
        changed = _build(tok, data_file, cache, logs)
        assert not any("cache hit" in s for s in logs) and changed.key != base.key
    finally:
        tok.chat_template = original


def test_strict_on_a_cached_entry_raises_like_uncached(tok, data_file, tmp_path):
    cache = tmp_path / "cache"
    _build(tok, data_file, cache, strict=False)
    with pytest.raises(DataError) as cached:
        _build(tok, data_file, cache, strict=True)
    with pytest.raises(DataError) as fresh:
        _build(tok, data_file, None, strict=True)
    assert str(cached.value) == str(fresh.value) and f"{data_file}:8:" in str(fresh.value)


def test_rank_zero_tokenises_first_others_read_the_cache(tok, data_file, tmp_path):
    cache = tmp_path / "cache"
    barrier = threading.Barrier(2)
    results, errors, logs = {}, {}, {0: [], 1: []}

    def run(rank, strict):
        cfg = DataSection(dataset=[str(data_file)], max_length=512, strict=strict)
        try:
            results[rank] = build_dataset(cfg, tok, cache_dir=cache, rank=rank, log=logs[rank].append, progress=False,
                                          barrier=lambda: barrier.wait(timeout=120))
        except DataError as e:
            errors[rank] = str(e)

    for strict in (False, True):
        results.clear()
        threads = [threading.Thread(target=run, args=(r, strict)) for r in (1, 0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        if strict:
            assert errors[0] == errors[1] and ":8:" in errors[0]  # every rank raises, none hangs
        else:
            _same(results[0], results[1])
            assert logs[1] == []  # only rank 0 reports


def test_eval_split_and_val_dataset(tok, data_file, tmp_path):
    cfg = DataSection(dataset=[str(data_file)], max_length=512, strict=False, split_dataset_ratio=0.1)
    train, val = build_datasets(cfg, tok, cache_dir=None, log=lambda s: None, progress=False)
    assert train.stats.rows_read + val.stats.rows_read == 150 and val.stats.rows_read == 15
    lines = {train.provenance(i)[1] for i in range(len(train))} | {val.provenance(i)[1] for i in range(len(val))}
    assert len(lines) == len(train) + len(val) == 148  # disjoint, and all kept rows are somewhere
    other = write_demo_chats(tmp_path / "val.jsonl", num_samples=5, seed=9)
    cfg = DataSection(dataset=[str(data_file)], val_dataset=[str(other)], max_length=512, strict=False)
    train, val = build_datasets(cfg, tok, cache_dir=None, log=lambda s: None, progress=False)
    assert len(train) == 148 and len(val) == 5 and val.provenance(0) == (str(other), 1)


def test_summarize_and_progress(tok, data_file, capsys):
    cfg = DataSection(dataset=[str(data_file)], max_length=512, strict=False)
    ds = build_dataset(cfg, tok, cache_dir=None, log=lambda s: None, progress=True)
    assert "tokenising" in capsys.readouterr().err
    text = summarize(ds, tokenizer=tok, max_length=1024, packing=True, sample_index=2)
    s = ds.stats
    assert f"{s.rows_read} rows read, {s.kept} kept, 2 skipped" in text
    assert re.search(r"skipped\s+1 invalid_json", text) and re.search(r"skipped\s+1 no_assistant_turn", text)
    assert f"{data_file}:8:" in text and f"tokens: {s.num_tokens} ({s.num_trained_tokens} trained" in text
    eff = packing_efficiency(ds.lengths, best_fit_decreasing(ds.lengths, 1024), 1024)
    assert f"efficiency {eff:.1%}" in text
    ids, labels = ds[2]
    body = text.split("trained tokens in [[...]]:\n", 1)[1]
    assert re.sub(r"\[\[|\]\]", "", body) == tok.decode(ids.tolist())
    marked = re.findall(r"\[\[(.*?)\]\]", body, flags=re.S)
    assert marked == [tok.decode(ids[labels != -100].tolist())] and marked[0].endswith("<|im_end|>")
    assert "\x1b[32m" in summarize(ds, tokenizer=tok, color=True)
