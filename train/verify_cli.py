"""`megalora verify`: megatron (with an adapter in our LoRA modules) vs transformers (with the
adapter loaded by peft) on the same tokens, on any layout.

Runs as one process or under `torchrun --nproc_per_node N -m megalora verify ...`. Ends with
one line a script can read and exits non-zero on FAIL:
    verify: rel_l2=<float> max_abs=<float> argmax_agree=<fraction> status=ok|FAIL
Both sides run in `--torch_dtype`, megatron on `--device` (transformers too, except in fp32,
where it runs on the CPU, its exact path); the pass bounds are the export's: fp32
relative L2 <= 1e-5 with every argmax equal, bf16 <= 2e-2 with >= 90% equal.
In bf16 a line before it gives each side's distance from transformers in fp32.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from megalora.config import bool_flag

_DTYPES = ("float32", "bfloat16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalora verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model folder or hub id (`demo`: the embedded tiny model)")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder to load on both sides")
    p.add_argument("--layers", type=int, default=None, help="check only the first N decoder layers")
    p.add_argument("--tensor_model_parallel_size", type=int, default=1)
    p.add_argument("--expert_model_parallel_size", type=int, default=1)
    p.add_argument("--sequence_parallel", type=bool_flag, default=False)
    p.add_argument("--use_hf", type=bool_flag, default=False, help="resolve hub ids through the Hugging Face hub")
    p.add_argument("--seq_length", type=int, default=64, help="tokens per sample")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--torch_dtype", default="float32", choices=sorted(_DTYPES),
                   help="dtype of both models (weights and compute)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where megatron runs, and transformers in bf16 (auto: cuda when available); the fp32 reference runs on the CPU")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest relative L2 error that passes (default: 1e-5 fp32, 2e-2 bf16)")
    p.add_argument("--seed", type=int, default=0)
    return p


def cmd_verify(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from megalora.config import ConfigError, check_parallel_sizes

    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {args.adapter} is not a PEFT adapter folder (no adapter_config.json)")
    check_parallel_sizes(tp=tp, ep=ep, world_size=world)
    sequence_parallel = args.sequence_parallel and tp > 1
    import functools

    from megalora.dry_run import resolve_model_dir_from_name
    from megalora.parallel import groups
    from megalora.train.lora.build import build_lora_model
    from megalora.train.model.hf_config import read_hf_config
    from megalora.train.model.verify import run_verify

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    dims = groups.initialize(tp=tp, ep=ep, sequence_parallel=sequence_parallel, device=args.device)
    model_dir = resolve_model_dir_from_name(args.model, use_hf=args.use_hf)
    # With an adapter, megatron takes its targets, rank and alpha and loads it (the one builder).
    build = functools.partial(build_lora_model, adapter=args.adapter) if args.adapter else None
    try:
        result = run_verify(model_dir, adapter=args.adapter, num_layers=args.layers, dims=dims,
                            tolerance=args.tolerance, dtype=getattr(torch, args.torch_dtype),
                            seq_length=args.seq_length, batch_size=args.batch_size, seed=args.seed, build=build)
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
