"""`megalora verify`: megatron (with an adapter in our LoRA modules) vs transformers (with the
adapter loaded by peft) on the same tokens, on any layout.

Runs as one process or under `torchrun --nproc_per_node N -m megalora verify ...`. Ends with
one line a script can read and exits non-zero on FAIL:
    verify: rel_l2=<float> max_abs=<float> argmax_agree=<fraction> status=ok|FAIL
Both sides run in `--torch_dtype` (auto: bfloat16 on CUDA, float32 on the CPU), megatron on `--device` (transformers too, except in fp32,
where it runs on the CPU, its exact path); the pass bounds are the export's: fp32
relative L2 <= 1e-5 with every argmax equal, bf16 <= 2e-2 with >= 90% equal.
In bf16 a line before it gives each side's distance from transformers in fp32.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from megalora.commands import parse_command, render_help, wants_help
from megalora.config import ConfigError, check_parallel_sizes
from megalora.parallel import groups
from megalora.train.inputs import resolve_model_dir_from_name
from megalora.train.lora.adapter_formats import peft_readable
from megalora.train.lora.build import build_lora_model
from megalora.train.model.hf_config import read_hf_config
from megalora.train.model.verify import run_verify


def cmd_verify(argv: list[str]) -> int:
    if wants_help(argv):
        print(render_help("verify"))
        return 0
    parsed = parse_command("verify", argv)
    cfg, own = parsed.config, parsed.own
    tp, ep = cfg.parallel.tensor_model_parallel_size, cfg.parallel.expert_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    adapter = cfg.lora.adapters
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {adapter} is not a PEFT adapter folder (no adapter_config.json)")
    check_parallel_sizes(tp=tp, ep=ep, world_size=world)
    if own.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    on_cuda = own.device == "cuda" or (own.device == "auto" and torch.cuda.is_available())
    dtype = cfg.model.torch_dtype if cfg.model.torch_dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--torch_dtype {dtype}: verify compares in float32 or bfloat16 (its pass bounds are for those)")
    sequence_parallel = cfg.parallel.sequence_parallel and tp > 1
    dims = groups.initialize(tp=tp, ep=ep, sequence_parallel=sequence_parallel, device="cuda" if on_cuda else "cpu")
    model_dir = resolve_model_dir_from_name(cfg.model.model, use_hf=cfg.model.use_hf)
    # With an adapter, megatron takes its targets, rank and alpha and loads it (the one builder);
    # transformers reads it through peft, converted first where peft misreads the layout.
    build = functools.partial(build_lora_model, adapter=adapter) if adapter else None
    try:
        result = run_verify(model_dir, adapter=adapter, num_layers=cfg.model.num_layers, dims=dims,
                            tolerance=own.tolerance, dtype=getattr(torch, dtype),
                            seq_length=own.seq_length, batch_size=own.batch_size, seed=cfg.train.seed,
                            build=build, prepare_adapter=peft_readable if adapter else None)
    finally:
        groups.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        quantization = read_hf_config(model_dir).quantization
        if quantization is not None:
            print(f"verify: {model_dir} holds {quantization.describe()} weights: megatron dequantizes them at "
                  "load, transformers with its own fp8 dequantization", flush=True)
        if result.fp32_line() is not None:
            print(result.fp32_line(), flush=True)
        print(result.summary_line(), flush=True)
    return 0 if result.ok else 1
