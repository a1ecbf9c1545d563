"""Streaming sharded safetensors writer for HF model folders.

The shard layout is planned before any tensor is computed, from names, dtypes and shapes
alone (a merge never changes them), so every rank knows every file name and the index
up front. Each shard file gets its header first and then each tensor's bytes as soon as
the tensor is produced: no shard is ever assembled in memory.

    plan = plan_shards(units, max_shard_bytes=parse_size("5GB"), world_size=W)
    with ShardWriter(out_dir, plan.shards_for(rank)) as w:
        for name, tensor in produced_in_plan_order: w.write(name, tensor)
    write_index(out_dir, plan)           # rank 0; every tensor exactly once

Units (a decoder layer, or the embeddings and head) are never split across ranks; the
units are dealt to ranks in order, balanced by bytes, and a rank's shards never hold
another rank's tensors. A shard holds at most `max_shard_bytes` of tensor data unless a
single tensor is larger (it then gets a shard of its own), as transformers does.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from megalora.config import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Files of a base model folder that are weights (never copied: the export writes its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "5GB" (10^9, as transformers counts), "500MB", "2GiB" or 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ConfigError(f"`max_shard_size`: cannot read {text!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value < 1:
        raise ConfigError(f"`max_shard_size` must be positive, got {text!r}")
    return value


def dtype_from_name(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype string ("BF16", "F32", ...)."""
    if name not in _DTYPES:
        raise ValueError(f"safetensors dtype {name!r} is not supported")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors dtype string of a torch dtype (the inverse of `dtype_from_name`)."""
    return _DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the output: name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        count = 1
        for d in self.shape:
            count *= d
        return count * dtype_from_name(self.dtype).itemsize


@dataclass
class Shard:
    """One output file: its name, the rank that writes it and its tensors in write order."""

    file: str
    rank: int
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Tensor data in the shard (headers not counted)."""
        return sum(t.nbytes for t in self.tensors)


@dataclass
class ShardPlan:
    """Every shard of the export and which rank writes which unit."""

    shards: list[Shard]
    unit_ranks: list[int]

    def shards_for(self, rank: int) -> list[Shard]:
        """The shards `rank` writes, in order."""
        return [s for s in self.shards if s.rank == rank]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all shards."""
        return sum(s.nbytes for s in self.shards)


def assign_units(unit_bytes: Sequence[int], *, world_size: int) -> list[int]:
    """Rank of each unit: contiguous runs of units, balanced by bytes (a unit whose middle
    byte lies in the r-th `world_size`-th of the total goes to rank r)."""
    total = max(sum(unit_bytes), 1)
    ranks, start = [], 0
    for size in unit_bytes:
        ranks.append(min(world_size - 1, (2 * start + size) * world_size // (2 * total)))
        start += size
    return ranks


def plan_shards(units: Sequence[Sequence[TensorInfo]], *, max_shard_bytes: int, world_size: int = 1) -> ShardPlan:
    """Split the tensors of `units` (in order) into shards of at most `max_shard_bytes`
    (a larger single tensor gets its own shard), each shard written by one rank."""
    unit_ranks = assign_units([sum(t.nbytes for t in u) for u in units], world_size=world_size)
    shards: list[Shard] = []
    for rank in range(world_size):
        current: Shard | None = None
        for unit, owner in zip(units, unit_ranks):
            if owner != rank:
                continue
            for info in unit:
                if current is None or current.tensors and current.nbytes + info.nbytes > max_shard_bytes:
                    current = Shard("", rank)
                    shards.append(current)
                current.tensors.append(info)
    names = [t.name for s in shards for t in s.tensors]
    assert len(names) == len(set(names)), "a tensor appears twice in the plan"
    for i, shard in enumerate(shards):
        shard.file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return ShardPlan(shards, unit_ranks)


def _header(tensors: Sequence[TensorInfo]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one rank's shards; `write` must be called once per tensor, in plan order."""

    def __init__(self, out_dir: str | Path, shards: Sequence[Shard]) -> None:
        self.out_dir = Path(out_dir)
        self._queue = [(s, t) for s in shards for t in s.tensors]
        self._next = 0
        self._shard: Shard | None = None
        self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_file()
        if exc[0] is None:
            assert self._next == len(self._queue), f"{len(self._queue) - self._next} planned tensors were not written"

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def expected(self) -> str | None:
        """Name of the tensor the plan wants next (None when done)."""
        return self._queue[self._next][1].name if self._next < len(self._queue) else None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append `tensor` to its shard (opening the next file when the current one is full)."""
        assert self._next < len(self._queue), f"tensor {name} is not in the plan"
        shard, info = self._queue[self._next]
        assert info.name == name, f"plan order wants {info.name}, got {name}"
        assert tuple(tensor.shape) == info.shape and _DTYPE_NAMES[tensor.dtype] == info.dtype, (
            f"{name}: planned {info.dtype}{list(info.shape)}, got {tensor.dtype}{list(tensor.shape)}")
        if shard is not self._shard:
            self._close_file()
            self._shard = shard
            self._file = open(self.out_dir / shard.file, "wb")
            self._file.write(_header(shard.tensors))
        data = tensor.detach().contiguous().cpu()
        assert self._file is not None
        self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else b"")
        self._next += 1


def write_index(out_dir: str | Path, plan: ShardPlan) -> Path | None:
    """`model.safetensors.index.json` naming each tensor's file (None for a single shard,
    which transformers reads without an index)."""
    if len(plan.shards) == 1:
        return None
    weight_map = {t.name: s.file for s in plan.shards for t in s.tensors}
    path = Path(out_dir) / INDEX_FILE
    path.write_text(json.dumps({"metadata": {"total_size": plan.total_size},
                                "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return path


def copy_side_files(base_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy every non-weight file of the base folder (config.json, generation_config.json,
    tokenizer files, chat template, license, ...) into `out_dir`; returns their names."""
    copied = []
    for path in sorted(Path(base_dir).iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in _WEIGHT_INDEXES:
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, Path(out_dir) / path.name)
        copied.append(path.name)
    if "config.json" not in copied:
        raise ValueError(f"{base_dir}: no config.json to copy into the export")
    return copied
