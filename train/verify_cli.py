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

import os
from pathlib import Path

import torch

from megalora.commands import parse_command, render_help, wants_help
from megalora.config import ConfigError


def _apply_adapter(model, info, adapter_dir) -> None:
    """The PEFT adapter into our LoRA modules (targets, rank and alpha taken from the adapter)."""
    from megalora.train.lora.peft_format import apply_peft_adapter

    apply_peft_adapter(model, adapter_dir, hf_spec=info.spec)


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
    if world % tp or world % ep:
        raise ConfigError(f"world size {world} is not divisible by `tensor_model_parallel_size`={tp} and "
                          f"`expert_model_parallel_size`={ep}")
    if own.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    on_cuda = own.device == "cuda" or (own.device == "auto" and torch.cuda.is_available())
    dtype = cfg.model.torch_dtype if cfg.model.torch_dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--torch_dtype {dtype}: verify compares in float32 or bfloat16 (its pass bounds are for those)")
    sequence_parallel = cfg.parallel.sequence_parallel and tp > 1
    from megalora.train.inputs import resolve_model_dir_from_name
    from megalora.train.lora.adapter_formats import peft_readable
    from megalora.parallel import groups
    from megalora.train.model.hf_config import read_hf_config
    from megalora.train.model.verify import run_verify

    groups.initialize(tp=tp, ep=ep, sequence_parallel=sequence_parallel)
    device = "cuda" if on_cuda else "cpu"
    if device == "cuda":
        # The rank's own GPU, chosen by groups.initialize from LOCAL_RANK.
        device = f"cuda:{torch.cuda.current_device()}"
    model_dir = resolve_model_dir_from_name(cfg.model.model, use_hf=cfg.model.use_hf)
    try:
        result = run_verify(model_dir, adapter=adapter, num_layers=cfg.model.num_layers, tp=tp, ep=ep,
                            sequence_parallel=sequence_parallel, tolerance=own.tolerance,
                            dtype=getattr(torch, dtype), device=device,
                            seq_length=own.seq_length, batch_size=own.batch_size, seed=cfg.train.seed,
                            apply_adapter=_apply_adapter if adapter else None,
                            prepare_adapter=peft_readable if adapter else None)
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
