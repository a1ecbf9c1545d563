"""Readers: files, folders, globs, `datasets` folders, hub ids (offline error), `#N` sampling, mixing."""
from __future__ import annotations

import collections
import json
import time

import pytest

from megalora.data.hub_datasets import HubDatasetError, load_hub_dataset
from megalora.data.readers import parse_spec, read_datasets, read_source


def _conv(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def _write(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(_conv(i)) + "\n" for i in ids))
    return path


def _ids(rows) -> list[int]:
    return [int(json.loads(r.text)["messages"][0]["content"][1:]) if r.text else int(r.obj["messages"][0]["content"][1:])
            for r in rows]


def test_file_folder_glob(tmp_path):
    a = _write(tmp_path / "d" / "a.jsonl", range(0, 3))
    _write(tmp_path / "d" / "sub" / "b.jsonl", range(3, 5))
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    rows = read_source(str(a))
    assert _ids(rows) == [0, 1, 2] and [r.line for r in rows] == [1, 2, 3] and rows[0].source == str(a)
    assert _ids(read_source(str(tmp_path / "d"))) == [0, 1, 2, 3, 4]
    assert _ids(read_source(str(tmp_path / "d" / "**" / "*.jsonl"))) == [0, 1, 2, 3, 4]
    assert _ids(read_source(str(tmp_path / "d" / "sub" / "*.jsonl"))) == [3, 4]
    with pytest.raises(ValueError, match="matches no files"):
        read_source(str(tmp_path / "nothing*.jsonl"))
    with pytest.raises(ValueError, match="not found"):
        read_source(str(tmp_path / "missing.jsonl"))


def test_datasets_folder(tmp_path):
    import datasets

    rows = [_conv(i) for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    got = read_source(str(tmp_path / "ds"))
    assert _ids(got) == [0, 1, 2, 3] and [r.line for r in got] == [1, 2, 3, 4]
    assert got[2].obj["messages"] == rows[2]["messages"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert _ids(read_source(str(tmp_path / "dd"))) == [0, 1]


def test_sampling_below_and_above_size(tmp_path):
    path = _write(tmp_path / "a.jsonl", range(10))
    assert parse_spec(f"{path}#4") == (str(path), 4) and parse_spec("owner/name") == ("owner/name", None)
    few = _ids(read_datasets([f"{path}#4"], seed=1))
    assert len(few) == 4 and len(set(few)) == 4 and set(few) <= set(range(10))
    assert few == _ids(read_datasets([f"{path}#4"], seed=1))  # seeded
    draws = {tuple(_ids(read_datasets([f"{path}#4"], seed=s))) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    many = _ids(read_datasets([f"{path}#23"], seed=1))
    counts = collections.Counter(many)
    assert len(many) == 23 and set(counts) == set(range(10))
    assert sorted(counts.values()) == [2] * 7 + [3] * 3  # two full repeats, then 3 distinct rows
    assert _ids(read_datasets([f"{path}#10"], seed=5)) == list(range(10))


def test_mixing_several_datasets(tmp_path):
    a = _write(tmp_path / "a.jsonl", range(0, 5))
    b = _write(tmp_path / "b.jsonl", range(100, 103))
    rows = read_datasets([str(a), f"{b}#6"], seed=0)
    ids = _ids(rows)
    assert ids[:5] == [0, 1, 2, 3, 4] and sorted(ids[5:]) == [100, 100, 101, 101, 102, 102]
    assert {r.source for r in rows} == {str(a), str(b)}


@pytest.mark.parametrize("use_hf", [False, True])
def test_hub_offline_error_names_the_id(monkeypatch, use_hf):
    # Port 9 on localhost refuses at once: the machine behaves as offline, whatever its network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MODELSCOPE_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(HubDatasetError) as e:
        load_hub_dataset("someone/no-such-set", use_hf=use_hf, timeout=3)
    assert time.monotonic() - start < 15
    msg = str(e.value)
    assert "`someone/no-such-set`" in msg and ("Hugging Face" if use_hf else "ModelScope") in msg
    assert "local path" in msg
    with pytest.raises(ValueError, match="someone/no-such-set.*no local file or folder"):
        read_datasets(["someone/no-such-set#5"], seed=0, use_hf=use_hf, hub_timeout=3)
