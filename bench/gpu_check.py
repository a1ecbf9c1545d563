"""The prepared proof of the GPU path (run by `launch/gpu_check.sh`; issue 11 item 6).

    python bench/gpu_check.py --out DIR [--device cuda|cpu] [--quick] [--checks a,b,...] [--perturb CHECK]

Each check prints one line `gpu_check: NAME ok|FAIL key=value ...`; `DIR/summary.json` holds every
figure; the exit code is 1 when any check fails (the last line names them), 0 otherwise.

verify_{qwen3_next,qwen3_moe}_{float32,bfloat16}
    `megalora verify` on the device for the tiny Qwen3-Next and Qwen3-MoE (made by transformers at
    run time). fp32: verify's own bound (relative L2 <= 1e-5, every argmax equal). bf16: verify's
    bound (2e-2, >= 90% argmax), or, where two bf16 implementations part by more than that (the tiny
    random Qwen3-Next does, see tests/test_bf16.py), megatron bf16 no further from transformers fp32
    than 1.25x transformers bf16 is, with >= 90% equal argmax.
kernel_gdn, kernel_gdn_packed, kernel_conv_packed, kernel_attention_packed, kernel_grouped_mm
    each fast path on bf16 inputs (the GPU kernel library's chunk_gated_delta_rule without and with
    cu_seqlens, its causal conv, torch's varlen flash attention, `torch._grouped_mm`) against its
    torch reference in fp32 on the same inputs: outputs and the gradients of every input, relative
    L2 <= 2e-2 (values) and <= 5e-2 (gradients). On CUDA the check fails when the fast path is not
    the one dispatched (`path=` names it); on CPU the dispatch is the torch path (plumbing only).
train_1rank, train_ep2, train_tp2_sp
    the demo (packed batches, so the THD paths train) for STEPS steps on the device in bf16 on 1 rank,
    and on 2 ranks sharing it (`--distributed_backend gloo`) at EP=2 and at TP=2 + SP, each step's
    loss within 5% (relative) of a 1-rank fp32 run on the CPU.
slice, slice_recompute
    a real-width Qwen3-Coder-Next slice (hidden 2048, 16 q / 2 kv heads of 256, GDN 16 k / 32 v
    heads of 128, 512 experts top-10 of width 512 plus the shared expert, vocab 151936, 3 GDN layers
    + 1 attention layer, seq 4096, LoRA r8 all-linear with every routed expert), without and with full
    recompute: megalora's tokens/s, MFU from the planner's useful FLOPs per token (train/plan.py) and
    the device's bf16 dense peak, peak memory against the planner's prediction; and transformers +
    peft (with the GPU kernel library) on the same slice and tokens, as a ratio. Passes when both sides
    train (finite losses) and, on CUDA, megalora's peak allocated memory is within the planner's
    prediction. Random weights: throughput does not depend on their values.

`--quick` runs the same checks at tiny sizes (a few steps) so a CPU test can prove the plumbing;
`--perturb CHECK` scales that check's fast-path result (kernel output, device losses, megalora's
tokens/s) by 1.1, a deliberate fault it must report; a verify check, having no result of its own to
scale, is marked failed. `--budget_s` bounds the run: checks not started in time are FAILs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gpu_slice import QUICK_SLICE, SLICE, slice_cfg, slice_hf_config

ROOT = Path(__file__).resolve().parents[1]
VALUE_TOL, GRAD_TOL = 2e-2, 5e-2
TRAIN_TOL = 0.05
FP32_RATIO = 1.25
PERTURB = 1.1
# bf16 dense peak of the GPUs this check is written for (FLOP/s), by device-name substring.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}

def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        self.quick, self.out, self.perturb = args.quick, Path(args.out), args.perturb
        self.cuda = self.device.type == "cuda"
        self.jobs: dict[str, Job] = {}

    def job(self, key: str, args: list[str], *, nproc: int = 1, cpu_only: bool = False) -> "Job":
        """The job `key`, started on first request."""
        if key not in self.jobs:
            self.jobs[key] = Job(self, key, args, nproc=nproc, cpu_only=cpu_only)
        return self.jobs[key]

    def scale(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return t * PERTURB if self.perturb == name else t


# -- kernel checks ------------------------------------------------------------------------------
def _compare(ctx: Context, name: str, fast: Callable, reference: Callable, inputs: dict[str, torch.Tensor],
             path: str, expected_path: str) -> dict:
    """Outputs and input gradients of `fast` (bf16 inputs) vs `reference` (the same inputs in fp32)."""
    figures: dict[str, Any] = {"path": path}
    results = {}
    for side, fn, cast in (("fast", fast, lambda t: t), ("ref", reference, lambda t: t.float())):
        leaves = {k: cast(v).detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        out = fn(**leaves)
        if side == "fast":
            out = ctx.scale(name, out)
        # The same output weights on both sides, so both backward passes start from one gradient.
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        (out.float() * weight).sum().backward()
        results[side] = (out.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None})
    figures["value_rel_l2"] = rel_l2(results["fast"][0], results["ref"][0])
    grads = {k: rel_l2(g, results["ref"][1][k]) for k, g in results["fast"][1].items()}
    figures["grad_rel_l2_max"] = max(grads.values())
    figures["grad_worst"] = max(grads, key=grads.get)
    ok = figures["value_rel_l2"] <= VALUE_TOL and figures["grad_rel_l2_max"] <= GRAD_TOL
    if ctx.cuda and path != expected_path:
        ok, figures["why"] = False, f"dispatched {path}, expected {expected_path}"
    figures["ok"] = ok
    return figures


def _gdn_inputs(ctx: Context, *, packed: bool) -> dict[str, torch.Tensor]:
    batch, seq, hk, hv, dim = (1 if packed else 2), 64, 2, 4, 16
    if not ctx.quick:
        batch, seq, hk, hv, dim = (1 if packed else 2), (2048 if packed else 1024), 4, 8, 128
    gen = torch.Generator().manual_seed(0)
    dev, bf = ctx.device, torch.bfloat16
    return dict(q=torch.randn(batch, seq, hk, dim, generator=gen).to(dev, bf),
                k=torch.randn(batch, seq, hk, dim, generator=gen).to(dev, bf),
                v=torch.randn(batch, seq, hv, dim, generator=gen).to(dev, bf),
                g=(-torch.nn.functional.softplus(torch.randn(batch, seq, hv, generator=gen)) * 0.5).to(dev),
                beta=torch.rand(batch, seq, hv, generator=gen).to(dev, bf))


def _cu(ctx: Context, total: int) -> torch.Tensor:
    cuts = [0, total // 7, total // 2, (4 * total) // 5, total]
    return torch.tensor(cuts, dtype=torch.int32, device=ctx.device)


def check_kernel_gdn(ctx: Context, *, packed: bool) -> dict:
    import importlib

    from megalora.train.ops import chunk_gated_delta_rule, gated_delta_rule

    mod = importlib.import_module("megalora.train.ops.gated_delta_rule")
    inputs = _gdn_inputs(ctx, packed=packed)
    cu = _cu(ctx, inputs["q"].shape[1]) if packed else None
    path = "fla" if inputs["q"].is_cuda and mod._gpu_kernel() is not None else "torch"

    def fast(**t):
        return gated_delta_rule(**t, cu_seqlens=cu, use_qk_l2norm=True)[0]

    def reference(**t):
        return chunk_gated_delta_rule(**t, cu_seqlens=cu, use_qk_l2norm=True)[0]

    name = "kernel_gdn_packed" if packed else "kernel_gdn"
    return _compare(ctx, name, fast, reference, inputs, path, "fla")


def check_kernel_conv(ctx: Context) -> dict:
    import importlib

    from megalora.train.ops import causal_conv1d, torch_causal_conv1d

    mod = importlib.import_module("megalora.train.ops.causal_conv1d")
    channels, seq = (48, 64) if ctx.quick else (8192, 4096)
    gen = torch.Generator().manual_seed(2)
    inputs = dict(x=torch.randn(1, channels, seq, generator=gen).to(ctx.device, torch.bfloat16),
                  weight=(0.3 * torch.randn(channels, 4, generator=gen)).to(ctx.device, torch.bfloat16))
    cu = _cu(ctx, seq)
    path = "torch"
    if ctx.cuda:
        path = "causal_conv1d" if mod._gpu_kernel() is not None else "fla" if mod._fla_kernel() is not None else "torch"
    expected = "causal_conv1d" if path == "causal_conv1d" else "fla"
    return _compare(ctx, "kernel_conv_packed", lambda **t: causal_conv1d(**t, cu_seqlens=cu),
                    lambda **t: torch_causal_conv1d(**t, cu_seqlens=cu), inputs, path, expected)


def check_kernel_attention(ctx: Context) -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megalora.train.model.attention import SDPACoreAttention, use_varlen

    heads, groups, dim, total = (4, 2, 16, 48) if ctx.quick else (16, 2, 256, 4096)
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=dim, attention_dropout=0.0, hidden_dropout=0.0)
    core = SDPACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal).eval()
    cu = _cu(ctx, total)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                             max_seqlen_kv=longest)
    gen = torch.Generator().manual_seed(3)
    inputs = dict(query=torch.randn(total, heads, dim, generator=gen).to(ctx.device, torch.bfloat16),
                  key=torch.randn(total, groups, dim, generator=gen).to(ctx.device, torch.bfloat16),
                  value=torch.randn(total, groups, dim, generator=gen).to(ctx.device, torch.bfloat16))
    path = "varlen" if use_varlen(inputs["query"], dropout=0.0) else "torch"

    def run(**t):
        # fp32 inputs never take the varlen kernel: the reference is the masked SDPA path.
        return core(t["query"], t["key"], t["value"], None, packed_seq_params=params)

    return _compare(ctx, "kernel_attention_packed", run, run, inputs, path, "varlen")


def check_kernel_grouped_mm(ctx: Context) -> dict:
    from megalora.train.ops.grouped_gemm import grouped_mm, grouped_mm_padded

    tokens, k, n, experts = (64, 32, 48, 4) if ctx.quick else (8192, 2048, 1024, 64)
    gen = torch.Generator().manual_seed(4)
    counts = torch.multinomial(torch.ones(experts), tokens, replacement=True, generator=gen).bincount(minlength=experts)
    counts = counts.to(ctx.device)
    inputs = dict(x=torch.randn(tokens, k, generator=gen).to(ctx.device, torch.bfloat16),
                  w=(torch.randn(experts, k, n, generator=gen) * k ** -0.5).to(ctx.device, torch.bfloat16))
    path = "torch._grouped_mm" if (ctx.cuda and torch.cuda.get_device_capability(ctx.device) >= (9, 0)) else "bmm"
    return _compare(ctx, "kernel_grouped_mm", lambda **t: grouped_mm(t["x"], t["w"], counts),
                    lambda **t: grouped_mm_padded(t["x"], t["w"], counts), inputs, path, "torch._grouped_mm")


# -- subprocess checks --------------------------------------------------------------------------
def _env(ctx: Context, *, cpu_only: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPROC_PER_NODE", "NNODES", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MEGALORA_HOME=str(ctx.out / "home"), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    # Several of these run at once: share the cores rather than each claiming all of them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 4) // 4)))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    """A `megalora` command started now and collected later, so independent checks overlap.
    Output goes to log files in the run folder (no pipe to fill while nobody reads it)."""

    def __init__(self, ctx: Context, key: str, args: list[str], *, nproc: int, cpu_only: bool) -> None:
        env = _env(ctx, cpu_only=cpu_only)
        if nproc > 1:
            env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(_free_port()))
        self.stdout, self.stderr = ctx.out / f"{key}.out", ctx.out / f"{key}.err"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            # Not from the repository root: there the source folder `megalora/` (whose subpackages
            # live elsewhere in the tree) would shadow the installed package on the GPU machine.
            self.proc = subprocess.Popen([sys.executable, "-m", "megalora", *args], env=env, cwd=ctx.out,
                                         stdout=out, stderr=err, text=True)

    def result(self, timeout: float = 900) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.stdout.read_text(),
                                           self.stderr.read_text())


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr or proc.stdout).strip().splitlines()[-1][:300] if (proc.stderr or proc.stdout) else ""


_VERIFY = re.compile(r"rel_l2=(\S+) max_abs=(\S+) argmax_agree=(\S+) status=(\w+)")
_FP32 = re.compile(r"megatron rel_l2=(\S+) transformers rel_l2=(\S+)")


def verify_job(ctx: Context, name: str, model_dir: Path, dtype: str) -> Job:
    return ctx.job(name, ["verify", "--model", str(model_dir), "--torch_dtype", dtype, "--device", ctx.device.type,
                          "--seq_length", "64", "--batch_size", "2"])


def check_verify(ctx: Context, name: str, model_dir: Path, dtype: str) -> dict:
    proc = verify_job(ctx, name, model_dir, dtype).result()
    match = _VERIFY.search(proc.stdout)
    if match is None:
        return {"ok": False, "why": f"rc={proc.returncode}: {_tail(proc)}"}
    figures: dict[str, Any] = {"rel_l2": float(match[1]), "argmax_agree": float(match[3]), "status": match[4]}
    ok = match[4] == "ok" and proc.returncode == 0
    fp32 = _FP32.search(proc.stdout)
    if fp32 is not None:
        figures.update(megatron_vs_fp32=float(fp32[1]), transformers_vs_fp32=float(fp32[2]))
        ok = ok or (figures["megatron_vs_fp32"] <= FP32_RATIO * figures["transformers_vs_fp32"]
                    and figures["argmax_agree"] >= 0.9)
    if ctx.perturb == name:
        ok = False
        figures["why"] = "perturbed"
    figures["ok"] = ok
    return figures


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


TRAIN_RUNS = {  # check -> (extra flags, ranks); the CPU reference is "cpu_reference"
    "cpu_reference": (["--torch_dtype", "float32"], 1),
    "train_1rank": (["--torch_dtype", "bfloat16"], 1),
    "train_ep2": (["--torch_dtype", "bfloat16", "--expert_model_parallel_size", "2", "--distributed_backend", "gloo"], 2),
    "train_tp2_sp": (["--torch_dtype", "bfloat16", "--tensor_model_parallel_size", "2", "--sequence_parallel", "true",
                      "--distributed_backend", "gloo"], 2),
}


def train_job(ctx: Context, name: str) -> Job:
    """The demo run `name` of TRAIN_RUNS: packed batches, STEPS steps, on the device (the
    reference on the CPU)."""
    flags, nproc = TRAIN_RUNS[name]
    args = ["sft", str(ROOT / "configs" / "demo.yaml"), "--train_iters", str(3 if ctx.quick else 20), "--save",
            str(ctx.out / f"run_{name}"), "--save_interval", "100000", "--packing", "true",
            "--expert_model_parallel_size", "1", *flags]
    return ctx.job(name, args, nproc=nproc, cpu_only=name == "cpu_reference" or not ctx.cuda)


def _train(ctx: Context, name: str) -> tuple[list[float], str]:
    proc = train_job(ctx, name).result()
    if proc.returncode != 0:
        return [], f"rc={proc.returncode}: {_tail(proc)}"
    return _losses(ctx.out / f"run_{name}"), ""


def check_train(ctx: Context, name: str) -> dict:
    reference, ref_why = _train(ctx, "cpu_reference")
    losses, why = _train(ctx, name)
    if why or not reference:
        why = why or f"CPU reference: {ref_why}"
        return {"ok": False, "why": why}
    losses = [x * PERTURB for x in losses] if ctx.perturb == name else losses
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference)) if len(losses) == len(reference) else math.inf
    return {"ok": worst <= TRAIN_TOL, "steps": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "ref_last_loss": reference[-1], "worst_rel_diff": worst}


# -- the real-width slice (its two sides run bench/gpu_slice.py) ----------------------------------
def check_slice(ctx: Context, name: str, *, recompute: bool) -> dict:
    from megalora.train.plan import memory_plan, step_flops

    dims = QUICK_SLICE if ctx.quick else SLICE
    sides = {}
    for side in ("megalora", "peer"):
        cmd = [sys.executable, str(ROOT / "bench" / "gpu_slice.py"), "--side", side, "--device", str(ctx.device),
               "--out", str(ctx.out / name)] + (["--quick"] if ctx.quick else []) + (["--recompute"] if recompute else [])
        proc = subprocess.run(cmd, env=_env(ctx), cwd=ctx.out, capture_output=True, text=True, timeout=900)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"ok": False, "why": f"{side} rc={proc.returncode}: {_tail(proc)}"}
        sides[side] = json.loads(lines[-1])
    mega, peer = sides["megalora"], sides["peer"]
    cfg = slice_cfg(dims, recompute=recompute)
    plan = memory_plan(cfg, hf_config=slice_hf_config(dims), num_gpus=1, device="gpu")
    flops = step_flops(plan["spec"], adapters=plan["adapters"], cfg=cfg, num_gpus=1, padded_vocab=plan["padded_vocab"])
    per_token = sum(flops["per_token"].values())
    peak = next((v for k, v in PEAK_BF16.items() if ctx.cuda and k in torch.cuda.get_device_name(ctx.device)), None)
    mega_tps = mega["tokens_per_s"] * (PERTURB if ctx.perturb == name else 1)
    figures = {
        "tokens_per_s": mega_tps, "peer_tokens_per_s": peer["tokens_per_s"],
        "ratio_vs_peer": mega_tps / peer["tokens_per_s"], "useful_gflop_per_token": per_token / 1e9,
        "mfu": mega_tps * per_token / peak if peak else None,
        "planned_gib": plan["total"] / 2 ** 30, "lora_params": mega["lora_params"],
        "peer_lora_params": peer["lora_params"], "peer_experts_implementation": peer["experts_implementation"],
        "peer_gdn_kernel_library": peer["gdn_kernel_library"], "last_loss": mega["losses"][-1],
        "peer_last_loss": peer["losses"][-1]}
    for key in ("peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib"):
        if key in mega:
            figures[key], figures[f"peer_{key}"] = mega[key], peer[key]
    finite = all(math.isfinite(x) for x in mega["losses"] + peer["losses"])
    within = not ctx.cuda or mega["peak_allocated_gib"] <= figures["planned_gib"]
    figures["ok"] = finite and within and ctx.perturb != name
    return figures


# -- driver -------------------------------------------------------------------------------------
def all_checks(ctx: Context) -> tuple[dict[str, Callable[[], dict]], dict[str, Callable[[], Any]]]:
    """(check name -> run it and return its figures, check name -> start its subprocesses early)."""
    from megalora.train.model.tiny import make_tiny_checkpoint

    checks: dict[str, Callable[[], dict]] = {}
    starts: dict[str, Callable[[], Any]] = {}
    tiny: dict[str, Path] = {}

    def model(name: str) -> Path:
        if name not in tiny:
            tiny[name] = make_tiny_checkpoint(name, ctx.out / "tiny" / name, seed=5)
        return tiny[name]

    for name, tiny_name in (("qwen3_next", "qwen3_next_a"), ("qwen3_moe", "qwen3_moe")):
        for dtype in ("float32", "bfloat16"):
            check = f"verify_{name}_{dtype}"
            checks[check] = lambda c=check, t=tiny_name, d=dtype: check_verify(ctx, c, model(t), d)
            starts[check] = lambda c=check, t=tiny_name, d=dtype: verify_job(ctx, c, model(t), d)
    checks["kernel_gdn"] = lambda: check_kernel_gdn(ctx, packed=False)
    checks["kernel_gdn_packed"] = lambda: check_kernel_gdn(ctx, packed=True)
    checks["kernel_conv_packed"] = lambda: check_kernel_conv(ctx)
    checks["kernel_attention_packed"] = lambda: check_kernel_attention(ctx)
    checks["kernel_grouped_mm"] = lambda: check_kernel_grouped_mm(ctx)
    for name in ("train_1rank", "train_ep2", "train_tp2_sp"):
        checks[name] = lambda n=name: check_train(ctx, n)
        starts[name] = lambda n=name: (train_job(ctx, "cpu_reference"), train_job(ctx, n))
    checks["slice"] = lambda: check_slice(ctx, "slice", recompute=False)
    checks["slice_recompute"] = lambda: check_slice(ctx, "slice_recompute", recompute=True)
    return checks, starts


def _line(name: str, figures: dict) -> str:
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in figures.items() if k != "ok" and not isinstance(v, (list, dict)))
    return f"gpu_check: {name} {'ok' if figures['ok'] else 'FAIL'} {shown}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (the CPU test of this script)")
    p.add_argument("--out", default=None, help="folder for the summary and run files (default: a temporary one)")
    p.add_argument("--checks", default=None, help="comma-separated check names (default: all)")
    p.add_argument("--perturb", default=None, help="a check whose fast-path result is scaled by 1.1 (must FAIL)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds for all checks; a check not started within them is a FAIL (`not run`)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    args.out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    ctx = Context(args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    checks, starts = all_checks(ctx)
    chosen = list(checks) if args.checks is None else args.checks.split(",")
    unknown = [c for c in chosen + ([args.perturb] if args.perturb else []) if c not in checks]
    if unknown:
        print(f"gpu_check: unknown check(s) {unknown}; known: {', '.join(checks)}", file=sys.stderr)
        return 2
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name() if ctx.cuda else "cpu",
                               "torch": torch.__version__, "quick": ctx.quick, "checks": {}}
    start = time.perf_counter()
    # The verify and demo-training subprocesses need the GPU only lightly and are independent:
    # they start now and run beside the kernel checks; the slice (timed) runs once all are done.
    for name in chosen:
        if name in starts:
            starts[name]()
    for name in chosen:
        t0 = time.perf_counter()
        if args.budget_s is not None and t0 - start > args.budget_s:
            figures = {"ok": False, "why": f"not run: the {args.budget_s:g} s budget was spent"}
        else:
            try:
                figures = checks[name]()
            except Exception as exc:  # a check that crashes is a failed check, named, and the rest still run
                text = str(exc).splitlines()[0][:300] if str(exc) else ""
                figures = {"ok": False, "why": f"{type(exc).__name__}: {text}"}
        figures["seconds"] = round(time.perf_counter() - t0, 1)
        summary["checks"][name] = figures
        print(_line(name, figures), flush=True)
        # Written after every check: a run killed from outside still leaves what it measured.
        failed = [n for n, f in summary["checks"].items() if not f["ok"]]
        summary.update(failed=failed, seconds=round(time.perf_counter() - start, 1))
        (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for job in ctx.jobs.values():  # started for checks the budget left unrun
        if job.proc.poll() is None:
            job.proc.kill()
    print(f"gpu_check: summary {ctx.out / 'summary.json'}", flush=True)
    if failed:
        print(f"gpu_check: FAILED {', '.join(failed)}", flush=True)
        return 1
    print(f"gpu_check: all {len(chosen)} checks ok in {summary['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
