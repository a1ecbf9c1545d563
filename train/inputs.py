"""What a run reads, resolved and checked before any weight is loaded: the model folder (the
embedded demo, a local folder or a hub id), its shape and weight files, its tokenizer, the LoRA
targets, the adapters to start from, the checkpoint to resume, and the data cache folder.

The dry run and training call the same functions, so a mistake fails the same way in both,
as one line naming the key (`ConfigError`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

from megalora.config import GPU_FUSIONS, Config, ConfigError, Extras, ModelShape
from megalora.demo import DEMO, ensure_demo_assets
from megalora.hub import resolve_model
from megalora.swift_keys import REPORTED
from megalora.train.lora.apply import check_targets
from megalora.train.model.hf_config import read_hf_config
from megalora.train.model.loader import CheckpointReader
from megalora.train.run_dir import resolve_resume


def resolve_model_dir(cfg: Config, *, log=print) -> Path:
    """The folder of the config's `model` (see `resolve_model_dir_from_name`)."""
    return resolve_model_dir_from_name(cfg.model.model, use_hf=cfg.model.use_hf, log=log)


def resolve_model_dir_from_name(name: str, *, use_hf: bool = False, log=print) -> Path:
    """The local folder of a model: the embedded demo, a local folder, or a hub id.

    Under torch.distributed call it on every rank: each node's local rank 0 downloads while
    the others wait, and a failed download raises on every rank instead of hanging them."""
    if name == DEMO:
        return ensure_demo_assets(log=log).model_dir
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if world > 1 else 0))
    return Path(resolve_model(name, use_hf=use_hf, rank=local_rank, world_size=world))


def read_model_shape(model_dir: Path) -> tuple[dict, ModelShape]:
    """The model's HF config and what layout validation needs of it (one parser for all)."""
    try:
        spec = read_hf_config(model_dir)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"`model`: {model_dir}: {e}") from None
    shape = spec.shape(f"{model_dir} ({spec.model_type})")
    return spec.raw, shape


def check_model_files(model_dir: Path) -> None:
    """Open every weight file's header (cheap): a missing, truncated or corrupt shard fails here."""
    try:
        CheckpointReader(model_dir)
    except ValueError as e:
        raise ConfigError(f"`model`: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: Path):
    """The model folder's tokenizer, or a one-line error naming the folder. (transformers builds
    an empty tokenizer from a folder without vocabulary files rather than failing.)"""
    problem = None
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        problem = f"none of {', '.join(TOKENIZER_FILES)} found"
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        else:
            if len(tokenizer) == 0:
                problem = "it has an empty vocabulary"
    if problem:
        raise ConfigError(f"`model`: {model_dir}: no usable tokenizer ({problem}); the folder needs the model's "
                          "tokenizer files") from None
    return tokenizer


def data_cache_dir() -> Path:
    """Where tokenised datasets are cached (under MEGALORA_HOME, else ~/.cache/megalora)."""
    base = os.environ.get("MEGALORA_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "megalora")
    return Path(base) / "data"


def check_inputs(cfg: Config, *, resume: bool = True) -> None:
    """What can fail before step 1 and needs no weights, besides layout and data: LoRA targets and the
    folders named (the checkpoint to resume from too, unless `resume` is false: training resolves it
    itself once the run folder is cleaned of partial saves)."""
    check_targets(cfg.lora)
    if cfg.lora.adapters is not None and not (Path(cfg.lora.adapters) / "adapter_config.json").is_file():
        raise ConfigError(f"`adapters`: {cfg.lora.adapters} is not a PEFT adapter folder (no adapter_config.json)")
    if resume and cfg.checkpoint.resume is not None:
        resolve_resume(cfg.checkpoint.resume, Path(cfg.checkpoint.save))


def describe_extras(extras: Extras) -> list[str]:
    """One line per accepted key that takes no effect (named, with why), the notes and the ENV block."""
    lines = list(extras.notes)
    for key, value in extras.not_applicable.items():
        lines.append(f"--{key} {value}: not applicable ({REPORTED[key]})")
    for key, value in extras.gpu_fusions.items():
        lines.append(f"--{key} {value}: accepted, nothing to apply ({GPU_FUSIONS[key][1]})")
    if extras.env:
        lines.append("ENV (from the YAML): " + " ".join(f"{k}={v}" for k, v in extras.env.items()))
    return lines
