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

from megalora.config import Config, ConfigError, Extras, check_layout
from megalora.data.dataset import build_datasets
from megalora.data.sampler import BatchLoader
from megalora.data.summary import summarize
from megalora.demo import DEMO, ensure_demo_assets
from megalora.parallel.groups import layout
from megalora.train.inputs import (check_inputs, check_model_files, data_cache_dir, describe_extras, load_tokenizer,
                                    read_model_shape, resolve_model_dir)


def format_layout(rows: list[dict]) -> str:
    out = ["rank  tp  ep  dp  expert_dp  experts"]
    for r in rows:
        experts = r["experts"]
        span = f"{experts[0]}-{experts[-1]}" if len(experts) > 1 else (str(experts[0]) if experts else "-")
        out.append(f"{r['rank']:>4}  {r['tp_rank']:>2}  {r['ep_rank']:>2}  {r['dp_rank']:>2}  {r['expert_dp_rank']:>9}  {span}")
    return "\n".join(out)


def data_summary(cfg: Config, *, model_dir: Path, log=print):
    """Read, validate and tokenise the data exactly as training would; (summary text, train, val)."""

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
