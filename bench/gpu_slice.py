"""One side of the real-width slice measurement of `bench/gpu_check.py`, in its own process.

    python bench/gpu_slice.py --side megalora|peer --device cuda|cpu --out DIR [--quick] [--recompute]

Prints one JSON line: tokens/s over the steps after the warm-up ones, the losses, the LoRA
parameter count and the peak memory (CUDA allocated/reserved, or the CPU's max RSS). `megalora`:
our model built from the slice's config.json with random bf16 weights (filled on the device),
LoRA r8 on every linear layer and every routed expert. `peer`: transformers + peft on the same
config and tokens, as `bench/bench_train.py` sets it up.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# The slice of Qwen3-Coder-Next that gpu_check measures (issue 11 item 6 (d)), and a tiny stand-in.
SLICE = dict(
    hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
    linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, num_experts=512,
    num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512, intermediate_size=5120,
    vocab_size=151936, num_hidden_layers=4, seq=4096, steps=6, warmup=2)
QUICK_SLICE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size=128,
    vocab_size=512, num_hidden_layers=4, seq=64, steps=2, warmup=1)



def slice_hf_config(dims: dict) -> dict:
    from megalora.known_models import QWEN3_CODER_NEXT

    config = dict(QWEN3_CODER_NEXT)
    config.update({k: v for k, v in dims.items() if k not in ("seq", "steps", "warmup")})
    config["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
    return config


def slice_cfg(dims: dict, *, recompute: bool):
    from megalora.config import load_config

    flags = ["--max_length", str(dims["seq"]), "--micro_batch_size", "1", "--global_batch_size", "1",
             "--lora_rank", "8", "--target_modules", "all-linear", "--torch_dtype", "bfloat16"]
    if recompute:
        flags += ["--recompute_granularity", "full", "--recompute_method", "uniform", "--recompute_num_layers", "1"]
    return load_config(None, flags)[0]


def slice_side(side: str, *, device: str, quick: bool, recompute: bool, work: Path) -> dict:
    """One side of the slice measurement, in its own process: tokens/s, peak memory, losses."""
    import transformers

    dims = QUICK_SLICE if quick else SLICE
    hf_config = slice_hf_config(dims)
    model_dir = work / "slice_model"
    model_dir.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
    transformers.AutoConfig.for_model("qwen3_next", **fields).save_pretrained(model_dir)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dims["vocab_size"], (1, dims["seq"]), generator=gen).to(dev)
    losses, times = [], []
    notes: dict[str, Any] = {}
    if side == "megalora":
        from megalora.config import LoraSection
        from megalora.parallel import groups
        from megalora.train.lora.apply import apply_lora
        from megalora.train.model.build import build_model

        groups.initialize()
        overrides = {"perform_initialization": False}
        if recompute:
            overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        model, _ = build_model(model_dir, dtype=torch.bfloat16, load_weights=False, **overrides)
        model.to(dev)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        apply_lora(model, LoraSection(lora_rank=8), verbose=False)
        positions = torch.arange(dims["seq"], device=dev).unsqueeze(0)
        labels = torch.roll(tokens, -1, dims=1)

        def loss_fn() -> torch.Tensor:
            return model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels).float().mean()
    else:
        from peft import LoraConfig

        sys.path.insert(0, str(ROOT / "bench"))
        from bench_train import PEER_TARGET_MODULES, PEER_TARGET_PARAMETERS, _peer_lora_model

        config = transformers.AutoConfig.from_pretrained(model_dir)
        with dev:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model = _peer_lora_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                   target_modules=PEER_TARGET_MODULES,
                                                   target_parameters=PEER_TARGET_PARAMETERS))
        if recompute:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()

        import importlib.util

        notes = {"experts_implementation": str(getattr(config, "_experts_implementation", None)),
                 "gdn_kernel_library": importlib.util.find_spec("fla") is not None}

        def loss_fn() -> torch.Tensor:
            return model(input_ids=tokens, labels=tokens, use_cache=False).loss.float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(dims["warmup"] + dims["steps"]):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    measured = times[dims["warmup"]:]
    result = {"tokens_per_s": dims["seq"] * len(measured) / sum(measured), "losses": losses,
              "lora_params": sum(p.numel() for p in params), **notes}
    if dev.type == "cuda":
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2 ** 30)
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", required=True, choices=("megalora", "peer"))
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--recompute", action="store_true")
    args = p.parse_args()
    print(json.dumps(slice_side(args.side, device=args.device, quick=args.quick, recompute=args.recompute,
                                work=Path(args.out))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
