"""Training checkpoints that resume exactly, on the same or a different parallel layout.

LoRA weights and AdamW moments are stored at full (unsharded) shape, gathered with the
LoRA layout plan, so any layout can shard them again on resume. RNG states are stored
per rank and restored only when the layout is the same (they mean nothing elsewhere).
Nothing here is pickled: a run folder is data, and loading it never runs code from it.

    checkpoint-<step>/
      adapter_model.safetensors   full-shape LoRA tensors, megatron names
      optimizer.safetensors       exp_avg.<name>, exp_avg_sq.<name> (unless no_save_optim)
      rng/rank-<r>.safetensors    torch / numpy / python RNG as tensors (unless no_save_rng)
      meta.json                   step, schedule, data loader position, layout, base model, config,
                                  run id, save time, sha256 of every other file (checked on resume)
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from megalora.config import ConfigError
from megalora.errors import UserError
from megalora.parallel.dims import ParallelDims
from megalora.train.lora.layout import gather_full_lora, rank_coords, shard_lora_state
from megalora.train.run_dir import commit_checkpoint, file_checksums, read_latest, tmp_checkpoint_dir, write_json
from megalora.train.signals import pause_point

FORMAT_VERSION = 1


def save_checkpoint(run_dir: Path, *, step: int, model, optimizer, layout: dict[str, str], meta: dict,
                    save_optim: bool, save_rng: bool, dims: ParallelDims | None = None) -> Path | None:
    """Write checkpoint-<step> atomically (rank 0 writes shared files, each rank its RNG); `dims`:
    the layout `model` is sharded on (default: `groups.current()`)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    named = {n: p for n, p in model.named_parameters() if n in layout}
    weights = gather_full_lora({n: p.data for n, p in named.items()}, layout, dims=dims)
    moments = None
    if save_optim:
        local = {}
        for n, p in named.items():
            state = optimizer.state.get(p, {})
            if "exp_avg" in state:
                local[f"exp_avg.{n}"] = state["exp_avg"]
                local[f"exp_avg_sq.{n}"] = state["exp_avg_sq"]
        moment_layout = {f"{m}.{n}": layout[n] for n in named for m in ("exp_avg", "exp_avg_sq")}
        moments = gather_full_lora(local, moment_layout, dims=dims)
    tmp = tmp_checkpoint_dir(run_dir, step)
    last_good = read_latest(run_dir)

    def write_rank0_dir() -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "rng").mkdir(exist_ok=True)

    def write_rng() -> None:
        save_rng_state(tmp / "rng" / f"rank-{rank}.safetensors")

    def write_shared() -> None:
        _save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "adapter_model.safetensors")
        pause_point(f"save-{step}", rank=rank)
        if moments:
            _save_file({k: v.contiguous() for k, v in moments.items()}, tmp / "optimizer.safetensors")
        opt_steps = {n: int(optimizer.state[p]["step"]) for n, p in named.items()
                     if save_optim and "step" in optimizer.state.get(p, {})}
        write_json(tmp / "meta.json", {**meta, "format_version": FORMAT_VERSION, "step": step,
                                       "optimizer_steps": opt_steps, "has_optimizer": bool(moments),
                                       "has_rng": save_rng, "lora_layout": layout, "saved_at": time.time(),
                                       "checksums": file_checksums(tmp)})

    # Each phase ends with every rank learning whether any rank failed, so a full disk or a
    # read-only folder stops all ranks with the same one line instead of hanging the others.
    _agreed(write_rank0_dir if rank == 0 else None, tmp=tmp, last_good=last_good)
    _agreed(write_rng if save_rng else None, tmp=tmp, last_good=last_good)
    _agreed(write_shared if rank == 0 else None, tmp=tmp, last_good=last_good)
    # Complete on every rank: only now may `latest` name it.
    final = commit_checkpoint(run_dir, step) if rank == 0 else None
    _barrier()
    return final


class CheckpointWriteError(UserError, ValueError):
    """A checkpoint could not be written (disk full, permission denied); every rank raises it."""


def _agreed(write, *, tmp: Path, last_good: Path | None) -> None:
    """Run this rank's `write` (if any), then share failures: every rank raises the first one."""
    error = None
    if write is not None:
        try:
            write()
        except OSError as e:
            error = f"cannot write checkpoint {tmp.name.removeprefix('.tmp-')}: {e.filename or tmp}: {e.strerror or e}"
    error = first_error(error)
    if error is not None:
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was completed"
        raise CheckpointWriteError(f"{error}; {where} (free space or fix permissions, then --resume latest)")


def first_error(error: str | None) -> str | None:
    """Every rank's view of the first rank's error (None when no rank had one): a collective, so
    that a failure on one rank stops all of them with its message instead of hanging the others."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    return error


def load_checkpoint(path: Path, *, model, optimizer, layout: dict[str, str], same_layout: bool,
                    log=print, dims: ParallelDims | None = None) -> dict:
    """Load this rank's shards of the LoRA weights (and optimizer, RNG) from `path` (verified by
    `run_dir.verify_checkpoint` first); returns meta."""
    meta = json.loads((path / "meta.json").read_text())
    coords = rank_coords(dims)
    shard_kw = dict(tp_rank=coords["tp_rank"], tp_size=coords["tp_size"], ep_rank=coords["ep_rank"],
                    ep_size=coords["ep_size"])
    full = load_file(str(path / "adapter_model.safetensors"))
    missing = sorted(set(layout) - set(full))
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks LoRA tensors this model has, e.g. {missing[:3]} "
                          "(was it trained with other target_modules?)")
    shards = shard_lora_state(full, layout, **shard_kw)
    named = {n: p for n, p in model.named_parameters() if n in layout}
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(shards[n])
    if meta.get("has_optimizer") and (path / "optimizer.safetensors").is_file():
        moments = load_file(str(path / "optimizer.safetensors"))
        moment_layout = {f"{m}.{n}": layout[n] for n in named for m in ("exp_avg", "exp_avg_sq")}
        local = shard_lora_state(moments, moment_layout, **shard_kw)
        for n, p in named.items():
            optimizer.state[p] = {"step": torch.tensor(float(meta["optimizer_steps"][n])),
                                  "exp_avg": local[f"exp_avg.{n}"].to(p.dtype).clone(),
                                  "exp_avg_sq": local[f"exp_avg_sq.{n}"].to(p.dtype).clone()}
    else:
        log(f"megalora: {path} has no optimizer state (no_save_optim); AdamW moments start from zero")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / "rng" / f"rank-{rank}.safetensors"
    if meta.get("has_rng") and same_layout and rng_file.is_file():
        load_rng_state(rng_file)
    elif meta.get("has_rng") and same_layout:
        log(f"megalora: {rng_file} is missing; RNG states are not restored (they only matter for dropout)")
    elif meta.get("has_rng") and not same_layout:
        log("megalora: resuming on a different layout; RNG states are not restored (they only matter for dropout)")
    return meta


def save_rng_state(path: Path) -> None:
    """torch, numpy, python (and CUDA) RNG states as tensors plus JSON metadata."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python": torch.tensor(words, dtype=torch.int64)}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"numpy": json.dumps([kind, pos, has_gauss, cached]), "python": json.dumps([version, gauss_next])}
    _save_file(tensors, path, metadata=meta)


def _save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O errors raised as OSError naming the file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(0, str(e).strip().splitlines()[-1], str(path)) from None


def load_rng_state(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    version, gauss_next = json.loads(meta["python"])
    torch.set_rng_state(tensors["torch"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((version, tuple(int(w) for w in tensors["python"].tolist()), gauss_next))
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
