"""On-disk cache of tokenised data.

The key hashes the rows read (file contents after `#N` sampling), the tokenizer (its
vocabulary/merges, special tokens and chat template) and the settings that change tokens or
labels (max_length, truncation, loss_on, self-cognition names). Worker count and strictness
are not in the key: they do not change the result (a strict run on a cache entry that holds
skipped bad rows raises the first of them, as the uncached run would).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from megalora.data.errors import Problem
from megalora.data.pipeline import DataStats, Processed, RowSettings
from megalora.data.readers import Row

CACHE_VERSION = 2
_ARRAYS = ("input_ids", "labels", "offsets", "source_index", "line")


def _sha() -> "hashlib._Hash":
    return hashlib.sha256()


def rows_fingerprint(rows: list[Row]) -> str:
    """Hash of every row's provenance and content."""
    h = _sha()
    for r in rows:
        body = r.text if r.text is not None else json.dumps([r.obj, r.error], sort_keys=True, ensure_ascii=False, default=str)
        h.update(f"{r.source}\0{r.line}\0".encode())
        h.update(body.encode("utf-8", "surrogatepass"))
        h.update(b"\1")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the tokenizer's output: model (vocab, merges), added tokens, chat template."""
    h = _sha()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(sorted(tokenizer.get_added_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    template = tokenizer.chat_template
    h.update(json.dumps(template, sort_keys=True).encode())
    return h.hexdigest()


def cache_key(rows: list[Row], tokenizer, settings: RowSettings) -> str:
    parts = {"version": CACHE_VERSION, "rows": rows_fingerprint(rows), "tokenizer": tokenizer_fingerprint(tokenizer),
             "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def entry_dir(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"tokenized-{key}"


def save_processed(cache_dir: str | Path, key: str, data: Processed) -> Path:
    """Write an entry atomically (a folder renamed into place), so readers never see half of one."""
    final = entry_dir(cache_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    np.savez(tmp / "arrays.npz", **{name: getattr(data, name) for name in _ARRAYS})
    meta = {"version": CACHE_VERSION, "sources": data.sources, "stats": data.stats.to_dict(),
            "problems": [asdict(p) for p in data.problems]}
    (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))
    if final.exists():
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:
        # Another rank wrote the same entry in between: equal contents by construction.
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_processed(cache_dir: str | Path, key: str) -> Processed | None:
    """The cached entry for `key`, or None when there is none (or it is unreadable)."""
    folder = entry_dir(cache_dir, key)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "arrays.npz") as z:
            arrays = {name: z[name] for name in _ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("version") != CACHE_VERSION:
        return None
    return Processed(**arrays, sources=meta["sources"], stats=DataStats.from_dict(meta["stats"]),
                     problems=[Problem(**p) for p in meta["problems"]])
