"""Forward+backward time of routed-expert LoRA: grouped path vs the per-expert loop.

    python bench/bench_expert_lora.py [--experts 64] [--tokens 2048] [--topk 8] [--device cpu|cuda]

Two measurements, each printed with the loop/grouped ratio:
1. the adapters alone (`expert_lora_delta_*` on fc1: H -> r -> 2F), plus on CPU a third
   candidate, `torch._grouped_mm` forward with a hand-written backward, which is how the CPU
   path was chosen (the padded `bmm` won);
2. a whole megatron `SequentialMLP` expert layer wrapped by `LoraExperts` (base experts +
   fc1/fc2 adapters), impl=grouped vs impl=loop.
Routing is uniform random, so every expert gets about tokens*topk/experts rows.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from megalora.train.lora.experts import LoraExperts, expert_lora_delta_grouped, expert_lora_delta_loop
from megalora.train.ops.grouped_gemm import _expert_positions
from megalora.train.lora.options import LoraOptions


class _GroupedMMForwardOnly(torch.autograd.Function):
    """CPU candidate: `torch._grouped_mm` forward (its own backward fails on CPU), bmm backward."""

    @staticmethod
    def forward(ctx, x, w, tokens_per_expert):  # type: ignore[override]
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        ctx.save_for_backward(x, w, tokens_per_expert, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w, tokens_per_expert, offs = ctx.saved_tensors
        dx = torch._grouped_mm(dy.contiguous(), w.transpose(1, 2).contiguous(), offs=offs)
        expert_id, row, max_tokens = _expert_positions(tokens_per_expert, device=x.device)
        num_experts, k, n = w.shape
        px = x.new_zeros(num_experts, max_tokens, k).index_put((expert_id, row), x)
        pd = dy.new_zeros(num_experts, max_tokens, n).index_put((expert_id, row), dy)
        return dx, torch.bmm(px.transpose(1, 2), pd), None


def _time(fn: Callable[[], None], *, iters: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def bench_adapters(args: argparse.Namespace, tpe: torch.Tensor) -> None:
    dev, dtype = args.device, getattr(torch, args.dtype)
    t = int(tpe.sum())
    x = torch.randn(t, args.hidden, device=dev, dtype=dtype, requires_grad=True)
    a = torch.randn(args.experts, args.rank, args.hidden, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(args.experts, 2 * args.ffn, args.rank, device=dev, dtype=dtype, requires_grad=True)
    counts = tpe.tolist()

    def step(kind: str) -> Callable[[], None]:
        def run() -> None:
            if kind == "loop":
                y = expert_lora_delta_loop(x, a, b, counts)
            elif kind == "grouped":
                y = expert_lora_delta_grouped(x, a, b, tpe)
            else:
                h = _GroupedMMForwardOnly.apply(x, a.transpose(1, 2).contiguous(), tpe)
                y = _GroupedMMForwardOnly.apply(h, b.transpose(1, 2).contiguous(), tpe)
            y.sum().backward()
        return run

    kinds = ["loop", "grouped"] + (["grouped_mm_fwd+bmm_bwd"] if dev == "cpu" else [])
    times = {k: _time(step(k), iters=args.iters, device=dev) for k in kinds}
    print(f"adapters only ({t} routed rows, {args.experts} experts, rank {args.rank}):")
    for k, v in times.items():
        print(f"  {k:<24} {1000 * v:9.2f} ms   loop/this = {times['loop'] / v:6.2f}x")


def bench_layer(args: argparse.Namespace, tpe: torch.Tensor) -> None:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megalora.parallel import groups

    groups.initialize(tp=1)
    dev, dtype = args.device, getattr(torch, args.dtype)
    cfg = TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=4,
                            num_moe_experts=args.experts, ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn,
                            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                            bias_activation_fusion=False, use_cpu_initialization=True, params_dtype=dtype)
    times = {}
    for impl in ("loop", "grouped"):
        base = SequentialMLP(args.experts, cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                              linear_fc2=RowParallelLinear),
                             pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        layer = LoraExperts(base, options=LoraOptions(rank=args.rank, dtype=dtype), init_seed=0,
                            first_global_expert=0, impl=impl).to(dev)
        t = int(tpe.sum())
        x = torch.randn(t, args.hidden, device=dev, dtype=dtype, requires_grad=True)
        probs = torch.rand(t, device=dev, dtype=dtype)

        def run(layer: LoraExperts = layer, x: torch.Tensor = x, probs: torch.Tensor = probs) -> None:
            out, _ = layer(x, tpe, probs)
            out.sum().backward()

        times[impl] = _time(run, iters=args.iters, device=dev)
    print(f"SequentialMLP + LoraExperts ({args.experts} experts, base experts looped by megatron):")
    for k, v in times.items():
        print(f"  impl={k:<19} {1000 * v:9.2f} ms   loop/this = {times['loop'] / v:6.2f}x")
    groups.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.experts < 1 or args.topk > args.experts:
        raise ValueError(f"--topk={args.topk} must be <= --experts={args.experts}")
    gen = torch.Generator().manual_seed(0)
    routed = torch.rand(args.tokens, args.experts, generator=gen).topk(args.topk, dim=1).indices.flatten()
    tpe = torch.bincount(routed, minlength=args.experts)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}")
    bench_adapters(args, tpe)
    bench_layer(args, tpe)


if __name__ == "__main__":
    main()
