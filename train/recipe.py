"""The LoRA fine-tuning recipe: setup -> train -> save -> cleanup. Every rank runs `train`.

Features and the config keys that control them:
- model: `model` (HF folder, hub id or `demo`), `torch_dtype`, `use_hf`
- parallel layout: `tensor_model_parallel_size`, `sequence_parallel`, `expert_model_parallel_size`,
  `moe_token_dispatcher_type`; data parallel is what remains of the world size
- LoRA: `lora_rank`, `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules`, `target_regex`,
  `exclude_modules`; base weights frozen, AdamW over LoRA parameters only
- data: `dataset`, `val_dataset`, `split_dataset_ratio`, `max_length`, `packing`, `strict`, `loss_on`, ...
- batches: `micro_batch_size`, `global_batch_size` (= micro x DP x accumulation), loss = mean over all
  trained tokens of the global batch; `moe_aux_loss_coeff`
- optimizer and schedule: `lr`, `min_lr`, `lr_warmup_fraction`/`lr_warmup_iters`, `lr_decay_style`,
  `weight_decay`, `adam_beta1/2`, `adam_eps`, `clip_grad`; `train_iters` or `max_epochs`; `seed`
- recomputation: `recompute_granularity`, `recompute_method`, `recompute_num_layers`
- evaluation: `eval_interval`, `eval_iters` (loss and token accuracy)
- checkpoints: `save`, `save_interval`, `save_total_limit`, `resume`, `no_save_optim`, `no_save_rng`
- logging: progress line with loss, lr, grad norm, tokens/s and ETA; `metrics.jsonl`; `report_to` wandb
- faults: SIGTERM/SIGINT finish the step, save and exit; a non-finite loss stops with the step named
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megalora.config import Config, ConfigError, Extras, check_layout, save_config
from megalora.data.dataset import build_datasets
from megalora.data.sampler import BatchLoader
from megalora.demo import DEMO, ensure_demo_assets
from megalora.errors import UserError
from megalora.export.run import export_checkpoint
from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.checkpoint import first_error
from megalora.train.inputs import (check_inputs, check_model_files, data_cache_dir, describe_extras, load_tokenizer,
                                   read_model_shape, resolve_model_dir)
from megalora.train.loop import Trainer
from megalora.train.lora.build import build_lora_model
from megalora.train.lora.peft_format import peft_equivalent_count
from megalora.train.lora.spec import LoraSpec
from megalora.train.run_dir import CHECKPOINT_RE, RUN_FILE, clean_partial


@dataclass
class Runtime:
    """The parallel layout of this rank and the rank-0 log."""

    dims: ParallelDims

    def log(self, msg: str = "") -> None:
        if self.dims.rank == 0:
            print(msg, flush=True)


def _dtype(cfg: Config) -> torch.dtype:
    name = cfg.model.torch_dtype
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}[name]


def setup_distributed(cfg: Config) -> Runtime:
    p = cfg.parallel
    dims = groups.initialize(tp=p.tensor_model_parallel_size, ep=p.expert_model_parallel_size,
                             sequence_parallel=p.sequence_parallel, backend=p.distributed_backend,
                             timeout_minutes=p.distributed_timeout_minutes)
    return Runtime(dims)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resolve_inputs(cfg: Config, rt: Runtime) -> Path:
    """Model folder on every rank (rank 0 creates the demo / downloads first); `demo` data resolved."""
    needs_demo = cfg.model.model == DEMO or DEMO in cfg.data.dataset or DEMO in cfg.data.val_dataset
    if needs_demo and rt.dims.rank == 0:
        ensure_demo_assets(log=rt.log)
    _barrier()
    if needs_demo:
        assets = ensure_demo_assets(log=rt.log)
        cfg.data.dataset = [str(assets.data_file) if d == DEMO else d for d in cfg.data.dataset]
        cfg.data.val_dataset = [str(assets.data_file) if d == DEMO else d for d in cfg.data.val_dataset]
    return resolve_model_dir(cfg, log=rt.log)


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """A new run in a used folder: move the earlier run's files into `previous-<time>/`, so
    its checkpoints and metrics are neither mixed with the new ones nor lost."""
    old = [p for p in run_dir.iterdir()
           if CHECKPOINT_RE.match(p.name) or p.name in ("metrics.jsonl", "latest", "config.yaml", RUN_FILE)]
    if not any(CHECKPOINT_RE.match(p.name) or p.name == "metrics.jsonl" for p in old):
        return None
    target = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    target.mkdir()
    for p in old:
        p.rename(target / p.name)
    return target


def prepare_run_dir(cfg: Config, run_dir: Path, rt: Runtime) -> None:
    """Rank 0 readies the run folder; a folder it cannot write stops every rank with one line."""
    error = None
    if rt.dims.rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            for partial in clean_partial(run_dir):
                rt.log(f"megalora: removed {partial}, left by a save that did not finish")
            if cfg.checkpoint.resume is None:
                moved = set_aside_previous_run(run_dir)
                if moved is not None:
                    rt.log(f"megalora: {run_dir} held an earlier run; moved it to {moved} (use --resume latest to "
                           "continue one)")
            save_config(cfg, run_dir / "config.yaml")
        except OSError as e:
            error = f"`save`: cannot write the run folder: {e.filename or run_dir}: {e.strerror or e}"
    error = first_error(error)
    if error is not None:
        raise ConfigError(error)


def train(cfg: Config, extras: Extras) -> int:
    # A caller that started torch.distributed itself (a test harness) keeps its process group.
    owns_process_group = not (dist.is_available() and dist.is_initialized())
    rt = setup_distributed(cfg)
    try:
        return _train(cfg, extras, rt)
    except UserError as e:
        # A mistake in the user's input names the key, file or row: one line, exit 2. Anything
        # else is a bug and keeps its traceback.
        # One write per line: the ranks share the terminal, and print's separate newline interleaves.
        sys.stderr.write(f"megalora sft: error (rank {rt.dims.rank}): {e}\n")
        sys.stderr.flush()
        return 2
    finally:
        if owns_process_group:
            groups.destroy()
        else:
            parallel_state.destroy_model_parallel()


def _train(cfg: Config, extras: Extras, rt: Runtime) -> int:
    model_dir = resolve_inputs(cfg, rt)
    _, shape = read_model_shape(model_dir)
    check_model_files(model_dir)
    dims = rt.dims
    degrees = check_layout(cfg, world_size=dims.world_size, shape=shape)
    for line in describe_extras(extras):
        rt.log(f"megalora: {line}")
    check_inputs(cfg, resume=False)
    run_dir = Path(cfg.checkpoint.save)
    prepare_run_dir(cfg, run_dir, rt)
    rt.log(f"megalora: world {dims.world_size} = TP {dims.tp} x DP {dims.dp}; EP {dims.ep}; "
           f"gradient accumulation {degrees['grad_accum']}; run folder {run_dir}")

    tokenizer = load_tokenizer(model_dir)
    train_ds, val_ds = build_datasets(cfg.data, tokenizer, cache_dir=data_cache_dir(), rank=dims.rank, log=rt.log,
                                      use_hf=cfg.model.use_hf)
    pad_multiple = dims.tp if dims.sequence_parallel else 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader_kw = dict(micro_batch_size=cfg.train.micro_batch_size, dp_rank=dims.dp_rank, dp_size=dims.dp,
                     packing=cfg.data.packing, max_length=cfg.data.max_length, pad_to_multiple_of=pad_multiple,
                     pad_token_id=pad_id, num_workers=cfg.data.num_workers)
    loader = BatchLoader(train_ds, seed=cfg.data.data_seed, accumulation=degrees["grad_accum"], **loader_kw)
    val_loader = BatchLoader(val_ds, seed=cfg.data.data_seed, shuffle=False, **loader_kw) if val_ds else None

    t = cfg.train
    overrides = dict(moe_aux_loss_coeff=t.moe_aux_loss_coeff,
                     moe_token_dispatcher_type=cfg.parallel.moe_token_dispatcher_type)
    if t.recompute_granularity is not None:
        overrides.update(recompute_granularity=t.recompute_granularity)
        if t.recompute_granularity == "full":
            overrides.update(recompute_method=t.recompute_method, recompute_num_layers=t.recompute_num_layers)
    if not shape.num_experts:
        overrides.pop("moe_token_dispatcher_type")
        overrides.pop("moe_aux_loss_coeff")
    # Resume builds the same way; the loop then loads the checkpoint's LoRA and optimizer state.
    model, info = build_lora_model(model_dir, lora=LoraSpec.from_section(cfg.lora), dims=dims,
                                   adapter=cfg.lora.adapters, dtype=_dtype(cfg), num_layers=cfg.model.num_layers,
                                   experts="grouped" if cfg.model.moe_grouped_gemm else "sequential", seed=t.seed,
                                   verbose=dims.rank == 0, **overrides)
    if info.load is not None and info.load.quantization is not None:
        dtype = str(_dtype(cfg)).removeprefix("torch.")
        rt.log(f"megalora: {model_dir} holds {info.load.quantization.describe()} weights: "
               f"{info.load.num_dequantized} tensors dequantized at load into {dtype} (each rank its slices)")
    if info.lora.per_projection:
        rt.log(f"megalora: lora_per_projection: {info.num_masked} fused layers train one adapter per HF projection")
    else:
        same = peft_equivalent_count(model, rank=info.lora.rank, vocab_size=info.vocab_size,
                                     padded_vocab_size=info.padded_vocab_size)
        rt.log(f"megalora: as a peft adapter (one A per HF projection): {same:,} trainable parameters")
    if cfg.lora.adapters is not None:
        rt.log(f"megalora: started from the PEFT adapter {cfg.lora.adapters}")
    trainer = Trainer(cfg, rt, model=model, layout=info.layout, loader=loader, val_loader=val_loader,
                      grad_accum=degrees["grad_accum"], model_dir=model_dir, report=info.report)
    code = trainer.run()
    if code == 0 and cfg.export.merge_lora and trainer.step == trainer.total_steps:
        export_final(cfg, trainer.last_checkpoint_path(), rt)
    return code


def export_final(cfg: Config, checkpoint: Path, rt: Runtime) -> None:
    """`merge_lora`: the merged HF export of the final checkpoint (verified), pushed when asked."""
    e = cfg.export
    out = Path(cfg.checkpoint.save) / f"{checkpoint.name}-merged"
    rt.log(f"megalora: merge_lora: writing the merged model to {out}")
    export_checkpoint(checkpoint, out, mode="merge", max_shard_size=e.max_shard_size, push_to_hub=e.push_to_hub,
                      hub=e.hub, token=e.hub_token, private=e.hub_private, commit_message=e.commit_message,
                      hub_timeout=e.hub_timeout, allow_base_model_change=cfg.checkpoint.allow_base_model_change,
                      log=rt.log)
