"""`megalora export`: merge a training checkpoint's LoRA into the base model, write HF
safetensors, verify against the unmerged model, optionally push to a hub.

    export_checkpoint("runs/x/checkpoint-100", "out/merged", max_shard_size="5GB")

The base model is processed one mapping rule at a time (one HF tensor, or the few HF
tensors fused into one megatron weight): read with `safe_open` (files opened per decoder
layer, so their mapped pages are released layer by layer), merged by `megalora.export.merge`,
and streamed into shard files planned up front (`megalora.export.writer`). Under torchrun
(or any initialised torch.distributed world) the decoder layers are dealt to ranks in
contiguous runs balanced by bytes; each rank writes its own shard files and rank 0 writes
the index, copies config / tokenizer files, verifies and pushes. Every rank must see the
same output folder (a shared file system when several nodes export).

Memory bound of the merge, per rank (verify off):

    peak RSS <= baseline + U + 4 * F + L + C

where baseline is the process after imports (torch, safetensors), U the on-disk bytes of
the largest decoder layer (the base files' mapped pages of the layer being read), F the
fp32 size of the largest megatron weight merged at once (e.g. the LM head, or one fused
`linear_qkv`), L the LoRA tensors of that weight, and C a fixed overhead of about 24 MiB
(code pages of the math kernels touched on first use, allocator retention; measured on
CPU: a 56 MiB model grew the peak by 17-24 MiB whatever the shard size). No shard is
held in memory, so the bound does not depend on `max_shard_size`, and the model as a
whole is never held.

Verify (on by default) builds the whole base model twice in fp32 on rank 0 (megatron with
the checkpoint's LoRA, and transformers on the export), so it needs about 2 x 4 bytes per
parameter; `verify_num_layers` checks only the first N decoder layers. Pass criterion:
relative L2 of the logits <= 1e-5 and every argmax equal for fp32 bases; for bf16/fp16
bases the merged weights are rounded to the base dtype, so the bound is 2e-2 (bf16) /
5e-3 (fp16) with at least 90% equal argmax (near-ties may flip).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open

from megalora.config import ConfigError
from megalora.export.merge import LoraKeys, lora_delta_factors, lora_keys_for, merge_rule
from megalora.export.push import DEFAULT_COMMIT_MESSAGE, push_folder
from megalora.export.writer import (
    ShardWriter, TensorInfo, copy_side_files, dtype_from_name, dtype_name, parse_size, plan_shards, write_index)
from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.lora.adapter_formats import FORMATS, write_adapter
from megalora.train.lora.build import build_lora_model
from megalora.train.lora.spec import read_trained_model
from megalora.train.model.hf_config import read_hf_config
from megalora.train.model.loader import CheckpointReader
from megalora.train.model.mapping import Rule, rules_for
# Pass criteria of the verify step per base dtype, shared with `megalora verify`.
from megalora.train.model.verify import TOLERANCES, compare_logits, default_tokens, megatron_logits, transformers_logits
from megalora.train.run_dir import check_base_model, verify_checkpoint

MODES = ("merge", "adapter")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Block-FP8 base weights are merged in fp32 and written in this dtype (a bf16 model).
DEQUANTIZED_DTYPE = torch.bfloat16


class ExportVerifyError(RuntimeError):
    """The merged export's logits differ from the unmerged model beyond tolerance."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Item:
    """HF tensors produced together: one mapping rule (with its LoRA, if any), or one base
    tensor the mapping table does not know (copied unchanged, e.g. multi-token prediction)."""

    sources: tuple[str, ...]
    rule: Rule | None = None
    lora: LoraKeys | None = None


@dataclass
class Unit:
    """The items of one decoder layer, or of everything outside the layers."""

    name: str
    items: list[Item]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def read_meta(checkpoint_dir: str | Path) -> dict:
    """meta.json of a training checkpoint, checked for what export needs."""
    ckpt = Path(checkpoint_dir)
    meta_path = ckpt / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{ckpt}: not a megalora checkpoint folder (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{meta_path}: not valid JSON ({err})") from None
    for key in ("base_model", "config"):
        if key not in meta:
            raise ConfigError(f"{meta_path}: missing key {key!r}")
    if not (ckpt / "adapter_model.safetensors").is_file():
        raise ConfigError(f"{ckpt}: no adapter_model.safetensors")
    if not (Path(meta["base_model"]) / "config.json").is_file():
        raise ConfigError(f"{meta_path}: base_model {meta['base_model']!r} is not an HF model folder (no config.json)")
    return meta


def check_checkpoint(ckpt: Path, meta: dict, *, allow_base_model_change: bool) -> None:
    """The checkpoint's files match their recorded checksums and its base model is unchanged."""
    verify_checkpoint(ckpt)
    check_base_model(meta, Path(meta["base_model"]), where=f"export: {ckpt}", allow_change=allow_base_model_change)


def _catalog(base_dir: Path) -> dict[str, TensorInfo]:
    """Name, dtype and shape of every tensor the export writes (headers only): block-FP8
    weights are written dequantized in `DEQUANTIZED_DTYPE`, their scales not at all."""
    with CheckpointReader(base_dir) as reader:
        return {name: TensorInfo(name, dtype_name(DEQUANTIZED_DTYPE) if reader.is_quantized(name)
                                 else reader.dtype(name), tuple(reader.shape(name)))
                for name in reader.names()}


def plan_units(rules: list[Rule], catalog: dict[str, TensorInfo], lora_names: set[str], *,
               base_dir: Path) -> list[Unit]:
    """Group the work by decoder layer (plus one unit for everything else, first); every
    LoRA tensor must be used, every base tensor written exactly once."""
    units: dict[str, Unit] = {}
    used_lora: set[str] = set()
    covered: set[str] = set()

    def unit_of(hf_name: str) -> Unit:
        m = _LAYER_RE.match(hf_name)
        key = f"layer {int(m.group(1)):06d}" if m else "other"
        return units.setdefault(key, Unit(key, []))

    for rule in rules:
        names = tuple(s.name for s in rule.sources)
        for n in names:
            if n not in catalog:
                raise ConfigError(f"{base_dir}: tensor {n!r} is missing from the base model's safetensors")
        keys = lora_keys_for(rule.megatron, lora_names)
        if keys is not None:
            if keys.b not in lora_names:
                raise ConfigError(f"adapter_model.safetensors has {keys.a} but not {keys.b}")
            used_lora.update((keys.a, keys.b))
        unit_of(names[0]).items.append(Item(names, rule, keys))
        covered.update(names)
    for name in sorted(set(catalog) - covered):
        unit_of(name).items.append(Item((name,)))
    unused = sorted(lora_names - used_lora)
    if unused:
        hint = (" (LoRA on the output layer of a model with tied embeddings cannot be merged)"
                if any(n.startswith("output_layer.") for n in unused) else "")
        raise ConfigError(f"adapter_model.safetensors: LoRA tensors that adapt no weight of {base_dir}: "
                          f"{unused[:4]}{hint}")
    return [units[k] for k in sorted(units, key=lambda k: (k != "other", k))]


def _merge_unit(unit: Unit, *, base_dir: Path, adapter_path: Path, scale: float, writer: ShardWriter) -> None:
    # Files are opened per unit: closing them drops the mapped pages read so far.
    with CheckpointReader(base_dir) as reader, safe_open(str(adapter_path), "pt") as adapter:
        for item in unit.items:
            sources = [reader.read(n) for n in item.sources]
            if item.lora is not None:
                a, b = adapter.get_slice(item.lora.a), adapter.get_slice(item.lora.b)
                if item.lora.expert is not None:
                    e = item.lora.expert
                    a, b = a[e:e + 1], b[e:e + 1]
                else:
                    a, b = a[:], b[:]
                assert item.rule is not None
                rows = sum(s.shape[0] for s in sources)  # fused layouts keep every source row
                keys = LoraKeys(item.lora.a, item.lora.b, 0 if item.lora.expert is not None else None)
                try:
                    lora = lora_delta_factors(a, b, keys, out_rows=rows)
                    outputs = merge_rule(item.rule, sources, lora, scale=scale)
                except ValueError as err:
                    raise ConfigError(f"{adapter_path}: {item.lora.a} / {item.lora.b} for "
                                      f"{', '.join(item.sources)}: {err}") from None
            else:
                outputs = tuple(sources)
            del sources
            for name, tensor in zip(item.sources, outputs):
                writer.write(name, tensor.to(DEQUANTIZED_DTYPE) if reader.is_quantized(name) else tensor)


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder")


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, *, mode: str = "merge",
                      max_shard_size: str | int = "5GB", verify: bool = True, verify_num_layers: int | None = None,
                      push_to_hub: str | None = None, hub: str = "modelscope", token: str | None = None,
                      private: bool = True, commit_message: str = DEFAULT_COMMIT_MESSAGE,
                      hub_endpoint: str | None = None, adapter_format: str = "vllm", hub_timeout: float = 60.0,
                      allow_base_model_change: bool = False, log: Callable[[str], None] = print) -> Path:
    """Export `checkpoint_dir` (a `checkpoint-<step>/` folder) to `out_dir`; returns `out_dir`.

    `mode="merge"` writes the base model with LoRA merged as HF safetensors shards of at
    most `max_shard_size`, plus config, generation config and tokenizer files; `verify`
    compares it with the unmerged model (see the module docstring) and raises
    `ExportVerifyError` beyond tolerance, before any push. `mode="adapter"` writes the LoRA
    adapter in `adapter_format` ("vllm", "sglang" or "peft"; see `train.lora.adapter_formats`)
    and logs, per server, whether its constraints hold. `push_to_hub` ("owner/name") uploads
    the folder to `hub` ("modelscope" or "huggingface"; `hub_endpoint` overrides the hub's
    address). Call it on every rank of a torch.distributed world, or in one process."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if adapter_format not in FORMATS:
        raise ValueError(f"--adapter_format: expected one of {FORMATS}, got {adapter_format!r}")
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    meta = read_meta(ckpt)
    check_checkpoint(ckpt, meta, allow_base_model_change=allow_base_model_change)
    rank, world = _world()
    _check_out_dir(out)
    _barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    if mode == "adapter":
        if rank == 0:
            _write_adapter(ckpt, out, adapter_format=adapter_format, log=log)
    else:
        _export_merged(ckpt, out, meta, max_shard_size=max_shard_size, log=log)
        if verify:
            _verify(ckpt, out, meta, num_layers=verify_num_layers, log=log)
    _barrier()
    if push_to_hub and rank == 0:
        push_folder(out, push_to_hub, hub=hub, token=token, private=private, commit_message=commit_message,
                    endpoint=hub_endpoint, timeout_s=hub_timeout, log=log)
    _barrier()
    return out


def _write_adapter(ckpt: Path, out: Path, *, adapter_format: str, log: Callable[[str], None]) -> None:
    write_adapter(ckpt, out, adapter_format=adapter_format, log=log)


def _export_merged(ckpt: Path, out: Path, meta: dict, *, max_shard_size: str | int,
                   log: Callable[[str], None]) -> None:
    rank, world = _world()
    max_bytes = parse_size(max_shard_size)
    trained = read_trained_model(meta, where=ckpt / "meta.json")
    base = trained.base_model
    scale = trained.lora.options.scaling
    spec = read_hf_config(base)
    if trained.num_layers is not None and trained.num_layers != spec.num_layers:
        raise ConfigError(f"{ckpt}: trained on the first {trained.num_layers} of {spec.num_layers} layers "
                          "(model.num_layers); a merged export needs an adapter for the whole model")
    adapter_path = ckpt / "adapter_model.safetensors"
    with safe_open(str(adapter_path), "pt") as handle:
        lora_names = set(handle.keys())
    catalog = _catalog(base)
    units = plan_units(rules_for(spec), catalog, lora_names, base_dir=base)
    infos = [[catalog[n] for item in u.items for n in item.sources] for u in units]
    plan = plan_shards(infos, max_shard_bytes=max_bytes, world_size=world)
    if rank == 0:
        log(f"export: merging {ckpt} into {base} (scale {scale:g}, {len(lora_names)} LoRA tensors) -> {out}: "
            f"{plan.total_size / 2**20:.1f} MiB in {len(plan.shards)} shard(s) over {world} rank(s)")
    with ShardWriter(out, plan.shards_for(rank)) as writer:
        for unit, owner in zip(units, plan.unit_ranks):
            if owner == rank:
                _merge_unit(unit, base_dir=base, adapter_path=adapter_path, scale=scale, writer=writer)
    _barrier()
    if rank == 0:
        write_index(out, plan)
        copied = copy_side_files(base, out)
        log(f"export: wrote {len(plan.shards)} shard(s); copied {', '.join(copied)}")
        if spec.quantization is not None:
            _drop_quantization_config(out / "config.json")
            log(f"export: the base holds {spec.quantization.describe()} weights: written dequantized and merged "
                f"in {str(DEQUANTIZED_DTYPE).removeprefix('torch.')}, config.json without quantization_config")


def _drop_quantization_config(path: Path) -> None:
    """The exported config.json describes the dequantized bf16 weights."""
    config = json.loads(path.read_text())
    config.pop("quantization_config", None)
    dtype = str(DEQUANTIZED_DTYPE).removeprefix("torch.")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _base_dtype(out: Path) -> torch.dtype:
    """The floating dtype of the exported weights (that of the largest tensor)."""
    infos = _catalog(out).values()
    return dtype_from_name(max(infos, key=lambda t: t.nbytes).dtype)


def _verify(ckpt: Path, out: Path, meta: dict, *, num_layers: int | None, log: Callable[[str], None]) -> None:
    rank, world = _world()
    owned = not (dist.is_available() and dist.is_initialized())
    # fp32 on the CPU: the exact path, whatever the machine.
    dims = groups.initialize(tp=1, ep=1, device="cpu")
    try:
        line_and_ok: list[tuple[str, bool] | None] = [None]
        if rank == 0:
            line_and_ok[0] = verify_export(ckpt, out, meta, num_layers=num_layers, dims=dims)
        if world > 1:
            dist.broadcast_object_list(line_and_ok, src=0)
    finally:
        if owned:
            groups.destroy()
    assert line_and_ok[0] is not None
    line, ok = line_and_ok[0]
    if rank == 0:
        log(line)
    if not ok:
        raise ExportVerifyError(f"export verify failed: the merged model in {out} differs from the unmerged "
                                f"model of {ckpt} ({line}); the folder is left for inspection", line)


def verify_export(ckpt: Path, out: Path, meta: dict, *, num_layers: int | None = None,
                  num_tokens: int = 32, dims: ParallelDims | None = None) -> tuple[str, bool]:
    """The verify summary line and pass/fail: megatron + the checkpoint's LoRA (unmerged) vs
    transformers on the merged folder, both fp32, on the same seeded tokens. `dims`: a one-rank
    layout (TP=1, EP=1; default `groups.current()`)."""
    model, info = build_lora_model(meta["base_model"], checkpoint=ckpt, dims=dims, dtype=torch.float32,
                                   num_layers=num_layers, expert_impl="loop")
    tokens = default_tokens(info.vocab_size, num_tokens=num_tokens)
    ours = megatron_logits(model, info, tokens)
    del model
    reference = transformers_logits(out, tokens, num_layers=num_layers, dtype=torch.float32)
    tol, min_agree = TOLERANCES.get(_base_dtype(out), TOLERANCES[torch.bfloat16])
    result = compare_logits(ours, reference, tolerance=tol)
    ok = result.rel_l2 <= tol and result.argmax_agree >= min_agree
    line = (f"verify: rel_l2={result.rel_l2:.3e} max_abs={result.max_abs:.3e} "
            f"argmax_agree={result.argmax_agree:.4f} status={'ok' if ok else 'FAIL'}")
    return line, ok
