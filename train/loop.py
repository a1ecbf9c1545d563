"""The step loop: optimizer, schedule, evaluation, checkpoints, resume, signals, logging."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from megalora.config import ConfigError
from megalora.train.checkpoint import load_checkpoint, save_checkpoint
from megalora.train.logging import Progress, make_sinks
from megalora.train.lora.grads import reduce_lora_grads
from megalora.train.run_dir import (check_base_model, checkpoint_name, fingerprint_model, prune_checkpoints, read_latest,
                                    resolve_resume, start_run, truncate_metrics)
from megalora.train.schedule import lr_at, warmup_steps
from megalora.train.signals import StopRequest, pause_point
from megalora.train.step import dp_all_reduce, eval_step, train_step


class NonFiniteLoss(RuntimeError):
    pass


# How a collective fails when a peer process has died (gloo over TCP).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


class Trainer:
    def __init__(self, cfg, rt, *, model, layout: dict[str, str], loader, val_loader, grad_accum: int,
                 model_dir: Path, report):
        self.cfg, self.rt, self.model, self.layout = cfg, rt, model, layout
        self.loader, self.val_loader, self.grad_accum = loader, val_loader, grad_accum
        self.model_dir, self.report = model_dir, report
        self.reduce_grads = reduce_lora_grads
        self.run_dir = Path(cfg.checkpoint.save)
        t = cfg.train
        self.params = [p for n, p in model.named_parameters() if p.requires_grad]
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(layout), \
            "every trainable parameter must be a LoRA tensor with a sharding plan"
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                           weight_decay=t.weight_decay)
        self.steps_per_epoch = loader.batches_per_epoch // grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"one epoch has {loader.batches_per_epoch} micro-batches per DP rank, fewer than the "
                              f"{grad_accum} one step needs: lower `global_batch_size` or add data")
        self.total_steps = t.train_iters if t.train_iters is not None else t.max_epochs * self.steps_per_epoch
        self.warmup = warmup_steps(total_steps=self.total_steps, warmup_fraction=t.lr_warmup_fraction,
                                   warmup_iters=t.lr_warmup_iters)
        self.step = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.fingerprint = fingerprint_model(model_dir)
        self.run_id: str | None = None

    # -- setup ---------------------------------------------------------------------------
    def _layout_signature(self) -> dict:
        return self.rt.dims.signature()

    def maybe_resume(self) -> None:
        ck = self.cfg.checkpoint
        if ck.resume is None:
            self._start_run(None)
            return
        path = resolve_resume(ck.resume, self.run_dir)
        meta = json.loads((path / "meta.json").read_text())
        check_base_model(meta, self.model_dir, where=f"`resume`: {path}",
                         allow_change=ck.allow_base_model_change, fingerprint=self.fingerprint)
        same = meta.get("layout") == self._layout_signature()
        meta = load_checkpoint(path, model=self.model, optimizer=self.optimizer, layout=self.layout,
                               same_layout=same, log=self.rt.log, dims=self.rt.dims)
        self.step = int(meta["step"])
        self.loader.load_state_dict(self._loader_state_for_this_layout(meta["data_loader"], path))
        self.last_checkpoint = path
        self._start_run(meta.get("run_id"))
        if self.rt.dims.rank == 0:
            dropped = truncate_metrics(self.run_dir, self.step)
            if dropped:
                self.rt.log(f"megalora: dropped {dropped} metrics.jsonl rows after step {self.step} (they are "
                            "logged again from here)")
        self.rt.log(f"megalora: resumed from {path} at step {self.step}")

    def _start_run(self, run_id: str | None) -> None:
        """The run id every checkpoint of this run carries (the resumed one's, or a new one)."""
        if self.rt.dims.rank == 0:
            self.run_id = start_run(self.run_dir, run_id)

    def _loader_state_for_this_layout(self, saved: dict, path: Path) -> dict:
        """The saved position counts the saving layout's micro-batches; convert it through the
        number of samples consumed in the epoch, which every layout agrees on."""
        sampler = self.loader.sampler
        consumed = saved["position"] * saved.get("micro_batch_size", sampler.micro_batch_size) * \
            saved.get("dp_size", sampler.dp_size)
        per_round = sampler.micro_batch_size * sampler.dp_size
        if consumed % per_round:
            raise ConfigError(f"`resume`: {path} stopped after {consumed} samples of its epoch, not a whole number "
                              f"of this run's micro-batch rounds ({per_round} samples); keep global_batch_size")
        return {"epoch": saved["epoch"], "position": consumed // per_round}

    # -- pieces --------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {"base_model": str(Path(self.model_dir).resolve()), "base_model_fingerprint": self.fingerprint,
                "data_loader": {**self.loader.state_dict(), "micro_batch_size": self.loader.sampler.micro_batch_size,
                                "dp_size": self.loader.sampler.dp_size}, "layout": self._layout_signature(),
                "config": self.cfg.to_dict(), "total_steps": self.total_steps, "run_id": self.run_id}

    def save(self) -> None:
        ck = self.cfg.checkpoint
        path = save_checkpoint(self.run_dir, step=self.step, model=self.model, optimizer=self.optimizer,
                               layout=self.layout, meta=self._meta(), save_optim=not ck.no_save_optim,
                               save_rng=not ck.no_save_rng, dims=self.rt.dims)
        if self.rt.dims.rank == 0:
            self.last_checkpoint = path
            prune_checkpoints(self.run_dir, ck.save_total_limit, run_id=self.run_id)
            self.rt.log(f"megalora: saved {path}")

    def evaluate(self) -> dict:
        eval_iters = self.cfg.train.eval_iters
        if self.val_loader is None or eval_iters == 0:
            return {}
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        it = iter(self.val_loader)
        whole = self.val_loader.batches_per_epoch
        for _ in range(whole if eval_iters < 0 else min(eval_iters, whole)):
            loss, n, correct = eval_step(self.model, next(it), device=self.rt.dims.device,
                                         packed=self.cfg.data.packing)
            sums += torch.tensor([loss, n, correct], dtype=torch.float64)
        self.val_loader.load_state_dict({"epoch": 0, "position": 0})
        self.model.train()
        sums = dp_all_reduce(sums, dims=self.rt.dims)
        return {"eval_loss": float(sums[0] / max(sums[1], 1)), "eval_acc": float(sums[2] / max(sums[1], 1))}

    def last_checkpoint_path(self) -> Path:
        """The newest checkpoint of this run, on every rank (only rank 0 tracks it while saving)."""
        return self.run_dir / checkpoint_name(self.step)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        cfg, rt = self.cfg, self.rt
        self.maybe_resume()
        sinks = make_sinks(rank=rt.dims.rank, run_dir=self.run_dir, report_to=cfg.logging.report_to,
                           wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
                           wandb_name=cfg.logging.wandb_exp_name, config=cfg.to_dict())
        progress = Progress(total_steps=self.total_steps, start_step=self.step, rank=rt.dims.rank)
        stop = StopRequest().install()
        batches = iter(self.loader)
        self.model.train()
        rt.log(f"megalora: training {self.total_steps} steps ({self.steps_per_epoch} per epoch) from step {self.step}")
        try:
            while self.step < self.total_steps:
                lr = lr_at(self.step, lr=cfg.train.lr, min_lr=cfg.train.min_lr, total_steps=self.total_steps,
                           warmup=self.warmup, style=cfg.train.lr_decay_style)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(self.grad_accum)]
                result = train_step(self.model, micro, dims=rt.dims, packed=cfg.data.packing, layout=self.layout,
                                    params=self.params, clip_grad=cfg.train.clip_grad, reduce_grads=self.reduce_grads)
                if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
                    where = self.last_checkpoint or "none (no checkpoint was written yet)"
                    raise NonFiniteLoss(f"non-finite loss {result.loss} / grad norm {result.grad_norm} at step "
                                        f"{self.step + 1}; the last good checkpoint is {where}")
                pause_point(f"step-{self.step + 1}", rank=rt.dims.rank)
                self.optimizer.step()
                self.step += 1
                elapsed = time.perf_counter() - t0
                metrics = {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                           "trained_tokens": result.trained_tokens,
                           "tokens_per_s": result.tokens * rt.dims.dp / max(elapsed, 1e-9),
                           "epoch": self.loader.state.epoch}
                interval = cfg.train.eval_interval
                if interval and (self.step % interval == 0 or self.step == self.total_steps):
                    metrics.update(self.evaluate())
                self.first_loss = self.first_loss if self.first_loss is not None else result.loss
                self.last_loss = result.loss
                if self.step % cfg.train.log_interval == 0 or self.step == self.total_steps:
                    sinks.log(self.step, metrics)
                    progress.update(self.step, metrics)
                stopping = stop.should_stop()
                save_every = cfg.checkpoint.save_interval
                if stopping or self.step == self.total_steps or (save_every and self.step % save_every == 0):
                    self.save()
                    # A signal that came during the save stops here: the checkpoint is this step's.
                    stopping = stopping or (self.step < self.total_steps and stop.should_stop())
                if stopping:
                    rt.log(f"megalora: stopped by signal {stop.agreed} after step {self.step}; resume with "
                           f"--resume latest --save {self.run_dir}")
                    return 0
        except NonFiniteLoss as e:
            print(f"megalora sft: error (rank {rt.dims.rank}): {e}", flush=True)
            return 3
        except RuntimeError as e:
            if not any(words in str(e) for words in PEER_GONE):
                raise
            # Another rank died (killed, out of memory): its own message, or the launcher's, says why.
            latest = read_latest(self.run_dir)
            sys.stderr.write(f"megalora sft: error (rank {rt.dims.rank}): another rank of the job is gone (after step "
                             f"{self.step}); the last complete checkpoint is {latest or 'none'}\n")
            return 1
        finally:
            stop.restore()
            sinks.close()
        if self.first_loss is not None:
            rt.log(f"megalora: loss {self.first_loss:.4f} at the first step of this run, {self.last_loss:.4f} at the last")
        rt.log(f"megalora: done; final checkpoint {self.last_checkpoint}")
        return 0
