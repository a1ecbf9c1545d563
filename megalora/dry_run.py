"""`megalora sft --dry-run`: resolve and validate everything a launch needs, train nothing.

It prints the resolved config, the parallel layout (which global rank holds which
TP/EP/DP coordinate and which experts), the compatibility flags and what happens to
them, and the data summary, for the world size the launch would have. It never starts
ranks itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from megalora.config import Config, ConfigError, Extras, ModelShape, check_layout

def resolve_model_dir(cfg: Config, *, log=print) -> Path:
    return resolve_model_dir_from_name(cfg.model.model, use_hf=cfg.model.use_hf, log=log)


def resolve_model_dir_from_name(name: str, *, use_hf: bool = False, log=print) -> Path:
    """The local folder of a model: the embedded demo, a local folder, or a hub id.

    Under torch.distributed call it on every rank: each node's local rank 0 downloads while
    the others wait, and a failed download raises on every rank instead of hanging them."""
    import os

    import torch.distributed as dist

    from megalora.demo import DEMO, ensure_demo_assets

    if name == DEMO:
        return ensure_demo_assets(log=log).model_dir
    from megalora.hub import resolve_model

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if world > 1 else 0))
    return Path(resolve_model(name, use_hf=use_hf, rank=local_rank, world_size=world))


def read_model_shape(model_dir: Path) -> tuple[dict, ModelShape]:
    """The model's HF config and what layout validation needs of it (one parser for all)."""
    from megalora.train.model.hf_config import read_hf_config

    try:
        spec = read_hf_config(model_dir)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"`model`: {model_dir}: {e}") from None
    shape = spec.shape(f"{model_dir} ({spec.model_type})")
    return spec.raw, shape


def check_model_files(model_dir: Path) -> None:
    """Open every weight file's header (cheap): a missing, truncated or corrupt shard fails here."""
    from megalora.train.model.loader import CheckpointReader

    try:
        CheckpointReader(model_dir)
    except ValueError as e:
        raise ConfigError(f"`model`: {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_dir: Path):
    """The model folder's tokenizer, or a one-line error naming the folder. (transformers builds
    an empty tokenizer from a folder without vocabulary files rather than failing.)"""
    from transformers import AutoTokenizer

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


def describe_extras(extras: Extras) -> list[str]:
    """One line per accepted key that takes no effect (named, with why), the notes and the ENV block."""
    from megalora.config import GPU_FUSIONS
    from megalora.swift_keys import REPORTED

    lines = list(extras.notes)
    for key, value in extras.not_applicable.items():
        lines.append(f"--{key} {value}: not applicable ({REPORTED[key]})")
    for key, value in extras.gpu_fusions.items():
        lines.append(f"--{key} {value}: accepted, nothing to apply ({GPU_FUSIONS[key][1]})")
    if extras.env:
        lines.append("ENV (from the YAML): " + " ".join(f"{k}={v}" for k, v in extras.env.items()))
    return lines


def format_layout(rows: list[dict]) -> str:
    out = ["rank  tp  ep  dp  expert_dp  experts"]
    for r in rows:
        experts = r["experts"]
        span = f"{experts[0]}-{experts[-1]}" if len(experts) > 1 else (str(experts[0]) if experts else "-")
        out.append(f"{r['rank']:>4}  {r['tp_rank']:>2}  {r['ep_rank']:>2}  {r['dp_rank']:>2}  {r['expert_dp_rank']:>9}  {span}")
    return "\n".join(out)


def check_inputs(cfg: Config, *, resume: bool = True) -> None:
    """What can fail before step 1 and needs no weights, besides layout and data: LoRA targets and the
    folders named (the checkpoint to resume from too, unless `resume` is false: training resolves it
    itself once the run folder is cleaned of partial saves)."""
    from megalora.train.lora.apply import check_targets

    try:
        check_targets(cfg.lora)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.lora.adapters is not None and not (Path(cfg.lora.adapters) / "adapter_config.json").is_file():
        raise ConfigError(f"`adapters`: {cfg.lora.adapters} is not a PEFT adapter folder (no adapter_config.json)")
    if resume and cfg.checkpoint.resume is not None:
        from megalora.train.run_dir import resolve_resume

        try:
            resolve_resume(cfg.checkpoint.resume, Path(cfg.checkpoint.save))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def data_summary(cfg: Config, *, model_dir: Path, log=print):
    """Read, validate and tokenise the data exactly as training would; (summary text, train, val)."""
    from megalora.data.dataset import build_datasets
    from megalora.data.summary import summarize
    from megalora.demo import DEMO, ensure_demo_assets
    from megalora.train.recipe import data_cache_dir

    if DEMO in cfg.data.dataset or DEMO in cfg.data.val_dataset:
        data_file = str(ensure_demo_assets(log=log).data_file)
        cfg.data.dataset = [data_file if d == DEMO else d for d in cfg.data.dataset]
        cfg.data.val_dataset = [data_file if d == DEMO else d for d in cfg.data.val_dataset]
    tokenizer = load_tokenizer(model_dir)
    train, val = build_datasets(cfg.data, tokenizer, cache_dir=data_cache_dir(), rank=0, log=log,
                                use_hf=cfg.model.use_hf, barrier=lambda: None)
    parts = [summarize(train, tokenizer=tokenizer, max_length=cfg.data.max_length, packing=cfg.data.packing)]
    if val is not None:
        parts.append(summarize(val, max_length=cfg.data.max_length, packing=cfg.data.packing))
    return "\n".join(parts), train, val


def check_splits(cfg: Config, degrees: dict, *, vocab_size: int, splits: dict) -> list[str]:
    """Each split against what launch builds from it: token ids inside the model's vocabulary, and at
    least one optimizer step (train) or one micro-batch (val) on every data-parallel rank. The batch
    loaders are the ones training builds, so the same numbers pass or fail. One line per split."""
    from megalora.data.sampler import BatchLoader

    lines = []
    for name, ds in splits.items():
        if ds is None:
            continue
        top = int(ds.data.input_ids.max()) if len(ds.data.input_ids) else -1
        if top >= vocab_size:
            raise ConfigError(f"data[{name}]: token id {top} is outside the model's vocabulary of {vocab_size}: "
                              "the tokenizer does not belong to this model")
        accumulation = degrees["grad_accum"] if name == "train" else 1
        try:
            loader = BatchLoader(ds, micro_batch_size=cfg.train.micro_batch_size, dp_size=degrees["dp"],
                                 packing=cfg.data.packing, max_length=cfg.data.max_length, accumulation=accumulation)
        except ValueError as e:
            fix = ("raise split_dataset_ratio, give a larger val_dataset" if name == "val"
                   else "give more data") + " or lower micro_batch_size"
            raise ConfigError(f"data[{name}]: {e}; {fix}") from None
        unit = "optimizer steps" if name == "train" else "micro-batches per rank"
        lines.append(f"data[{name}]: {loader.batches_per_epoch // accumulation} {unit} per epoch")
    return lines


def dry_run(cfg: Config, extras: Extras, *, world_size: int, out=None) -> int:
    out = out or sys.stdout  # looked up per call: sys.stdout may be replaced after import

    from megalora.parallel.groups import layout

    def log(msg=""):
        print(msg, file=out)

    model_dir = resolve_model_dir(cfg, log=log)
    raw, shape = read_model_shape(model_dir)
    check_model_files(model_dir)
    degrees = check_layout(cfg, world_size=world_size, shape=shape)
    check_inputs(cfg)
    log("resolved config:")
    log(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    log("")
    log(f"model: {model_dir}")
    log(f"layout: world {world_size} = TP {degrees['tp']} x DP {degrees['dp']}; experts: EP {degrees['ep']} x "
        f"expert-DP {degrees['expert_dp']}; sequence_parallel={cfg.parallel.sequence_parallel}; "
        f"gradient accumulation {degrees['grad_accum']}")
    log(format_layout(layout(world_size, tp=degrees["tp"], ep=degrees["ep"], num_experts=shape.num_experts)))
    for line in describe_extras(extras):
        log(line)
    if cfg.data.dataset:
        log("")
        summary, train, val = data_summary(cfg, model_dir=model_dir, log=log)
        log(summary)
        for line in check_splits(cfg, degrees, vocab_size=int(raw["vocab_size"]), splits={"train": train, "val": val}):
            log(line)
    log("dry run: ok (nothing was trained)")
    return 0
