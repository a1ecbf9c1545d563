"""Read each rank's slice of an HF safetensors checkpoint straight into a megatron model.

Every tensor is read with `safe_open(...).get_slice`, only the rows/columns this rank
owns (its TP shard, its EP experts), single-file or sharded (`model.safetensors.index.json`)
checkpoints alike; the full model is never assembled on any rank. Block-FP8 checkpoints
(`megalora.train.model.quant`) are dequantized slice by slice as they are read: a rank
reads its slice of each fp8 tensor and only the scale rows/columns that cover it.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megalora.config import ConfigError
from megalora.parallel.dims import ParallelDims
from megalora.train.model.hf_config import HFModelSpec
from megalora.train.model.mapping import Rule, Source, local_expert_name, rules_for, source_slices, vocab_rows
from megalora.train.model.quant import (
    SCALE_SUFFIX, BlockFP8, dequantize_slice, read_quantization, scale_range, scale_shape)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_header(path: Path) -> dict:
    """The tensor entries of a safetensors file's header, after checking that the file holds all
    the bytes the header describes; a one-line error naming the file otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < length <= size - 8:
                raise ConfigError(f"{path}: corrupt or truncated safetensors file (bad header length); "
                                  "download it again")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise ConfigError(f"{path}: weight file missing; download the model again") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied while reading the weights") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{path}: corrupt safetensors header (not JSON); download it again") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise ConfigError(f"{path}: corrupt safetensors header (no data_offsets); download it again") from None
    if size < 8 + length + end:
        raise ConfigError(f"{path}: truncated ({size} bytes; its header describes {8 + length + end}); "
                          "download it again")
    return tensors


def check_weight_files(paths: list[Path], *, index: Path | None = None) -> None:
    """Every weight file present, readable, with a sound header and all its bytes (headers only)."""
    for path in paths:
        if index is not None and not path.is_file():
            raise ConfigError(f"{path}: shard named in {index} is missing; download the model again")
        read_header(path)


class CheckpointReader:
    """Lazy access to the tensors of an HF folder, single-file or sharded; block-FP8
    weights read as their float32 values (their `_scale_inv` companions are not listed)."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConfigError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from err
            self.files = {name: self.model_dir / fname for name, fname in weight_map.items()}
        elif single.is_file():
            self.files = {name: single for name in read_header(single)}
        else:
            raise ConfigError(f"{self.model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        check_weight_files(sorted(set(self.files.values())), index=index if index.is_file() else None)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.bytes_read = 0
        self.dequantized: set[str] = set()
        self.quantization: BlockFP8 | None = None
        if (self.model_dir / "config.json").is_file():
            self.quantization = read_quantization(self.model_dir)
        scaled = [n for n in self.files if n.endswith(SCALE_SUFFIX)]
        if scaled and self.quantization is None:
            raise ConfigError(f"{self.model_dir}: holds {scaled[0]} (and {len(scaled) - 1} more scale tensors) but "
                              "config.json declares no block-FP8 quantization_config")

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._handles.clear()

    def _slice(self, name: str) -> Any:
        path = self.files.get(name)
        if path is None:
            raise ConfigError(f"{self.model_dir}: tensor {name!r} is missing from the checkpoint")
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(self._safe_open(str(path), "pt"))
        return self._handles[path].get_slice(name)

    def shape(self, name: str) -> list[int]:
        """Shape of tensor `name` on disk (reads only the header)."""
        return list(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors dtype string ("BF16", "F8_E4M3", ...) of tensor `name` on disk."""
        return str(self._slice(name).get_dtype())

    def names(self) -> list[str]:
        """The model's tensors: every tensor but the scales of quantized ones."""
        return [n for n in self.files if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in self.files)]

    def is_quantized(self, name: str) -> bool:
        """True when `name` is stored as block FP8 (it has a `_scale_inv` companion)."""
        return self.quantization is not None and name + SCALE_SUFFIX in self.files

    def _read_dequantized(self, name: str, handle: Any, *, dim: int | None, start: int, stop: int | None) -> Tensor:
        assert self.quantization is not None
        block = self.quantization.block
        shape = tuple(handle.get_shape())
        scale_name = name + SCALE_SUFFIX
        scales = self._slice(scale_name)
        if len(shape) != 2 or tuple(scales.get_shape()) != scale_shape(shape, block):
            raise ConfigError(f"{self.model_dir}: {scale_name} has shape {list(scales.get_shape())}; a "
                              f"{list(shape)} weight in {block[0]}x{block[1]} blocks needs "
                              f"{list(scale_shape(shape, block)) if len(shape) == 2 else 'a 2-D weight'}")
        bounds = [[0, shape[0]], [0, shape[1]]]
        if dim is not None:
            bounds[dim] = [start, shape[dim] if stop is None else stop]
        (r0, r1), (c0, c1) = bounds
        (s0, s1), (t0, t1) = scale_range(r0, r1, block[0]), scale_range(c0, c1, block[1])
        values, scale = handle[r0:r1, c0:c1], scales[s0:s1, t0:t1]
        self.bytes_read += values.numel() * values.element_size() + scale.numel() * scale.element_size()
        self.dequantized.add(name)
        return dequantize_slice(values, scale, block=block, row0=r0, col0=c0)

    def read(self, name: str, *, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        """Read tensor `name`, or only indices [start, stop) along `dim` (block-FP8 weights:
        their float32 values)."""
        handle = self._slice(name)
        if self.is_quantized(name):
            return self._read_dequantized(name, handle, dim=dim, start=start, stop=stop)
        if str(handle.get_dtype()).startswith("F8"):
            raise ConfigError(f"{self.model_dir}: tensor {name!r} is stored as {handle.get_dtype()} but has no "
                              f"{name + SCALE_SUFFIX} scales")
        if dim is None:
            tensor = handle[:]
        else:
            index = (slice(None),) * dim + (slice(start, stop),)
            tensor = handle[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


@dataclass
class LoadReport:
    """What `load_hf_weights` did: parameters filled, bytes read from disk, and the
    quantization dequantized on the way (None: an unquantized checkpoint)."""

    loaded: list[str] = field(default_factory=list)
    bytes_read: int = 0
    quantization: BlockFP8 | None = None
    num_dequantized: int = 0


def _read_source(
    reader: CheckpointReader, source: Source, *, rank: int, world: int, spec: HFModelSpec, padded_vocab_size: int
) -> Tensor:
    if source.vocab:
        start, stop, pad = vocab_rows(
            vocab_size=spec.vocab_size, padded_vocab_size=padded_vocab_size, rank=rank, world=world
        )
        rows = reader.read(source.name, dim=0, start=start, stop=stop)
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])], dim=0)
        return rows
    if source.dim is None:
        return reader.read(source.name)
    size = reader.shape(source.name)[source.dim]
    pieces = [
        reader.read(source.name, dim=source.dim, start=a, stop=b)
        for a, b in source_slices(source, size=size, rank=rank, world=world)
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=source.dim)


def read_rule_shard(
    reader: CheckpointReader, rule: Rule, *, rank: int, world: int, spec: HFModelSpec, padded_vocab_size: int
) -> Tensor:
    """Rank `rank` of `world`'s shard of megatron parameter `rule.megatron`, read from disk
    (`world` is the size of the group that splits the rule; 1 for replicated rules)."""
    if rule.group is None:
        rank, world = 0, 1
    pieces = [
        _read_source(reader, s, rank=rank, world=world, spec=spec, padded_vocab_size=padded_vocab_size)
        for s in rule.sources
    ]
    return rule.to_megatron(*pieces)


def _local_name(rule: Rule, dims: ParallelDims, num_experts: int | None) -> str | None:
    """This rank's parameter name for `rule`, or None if the rule's expert lives elsewhere."""
    if rule.expert is None:
        return rule.megatron
    assert num_experts is not None
    per_rank = num_experts // dims.ep
    first = dims.ep_rank * per_rank
    if not first <= rule.expert < first + per_rank:
        return None
    return local_expert_name(rule.megatron, first_expert=first)


def load_hf_weights(
    model: torch.nn.Module,
    model_dir: str | Path,
    spec: HFModelSpec,
    *,
    dims: ParallelDims,
    padded_vocab_size: int,
) -> LoadReport:
    """Fill every parameter of `model` (the shard of the rank `dims` describes) from the HF folder `model_dir`.

    Raises `ValueError` naming the tensor when the checkpoint lacks one or its shape does
    not match the config; every model parameter must be covered by the mapping table."""
    params = dict(model.named_parameters())
    report = LoadReport()
    with CheckpointReader(model_dir) as reader:
        for rule in rules_for(spec):
            name = _local_name(rule, dims, spec.num_experts)
            if name is None:
                continue
            rank, world = (dims.etp_rank, dims.etp) if rule.group == "etp" else (dims.tp_rank, dims.tp)
            tensor = read_rule_shard(reader, rule, rank=rank, world=world, spec=spec, padded_vocab_size=padded_vocab_size)
            param = params.get(name)
            assert param is not None, f"mapping names {name!r} but the model has no such parameter"
            if tuple(tensor.shape) != tuple(param.shape):
                names = ", ".join(s.name for s in rule.sources)
                raise ConfigError(
                    f"{model_dir}: {names} give shape {tuple(tensor.shape)} for {name}, "
                    f"expected {tuple(param.shape)} from config.json"
                )
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            report.loaded.append(name)
        report.bytes_read = reader.bytes_read
        report.quantization = reader.quantization
        report.num_dequantized = len(reader.dequantized)
    missing = sorted(set(params) - set(report.loaded))
    assert not missing, f"parameters not covered by the mapping table: {missing}"
    return report
