"""LoRA training throughput and memory: megalora vs transformers + peft, side by side in one run.

    python bench/bench_train.py [--steps 10] [--warmup 2] [--threads 2] [--seq 512] [--micro 2]
                                [--experts 32] [--topk 4] [--keep]

Both sides train the same Qwen3-Next-shaped MoE (random weights saved by transformers at bench
time, float32), with LoRA rank 8 on the same weights (attention, GDN projections, shared expert,
every routed expert), AdamW over the LoRA parameters, for the same number of steps on exactly the
same token batches (megalora's own data pipeline builds them on both sides; each step's batches
are hashed and the hashes compared), with the same thread count, constant learning rate, no MoE
auxiliary loss. Each side runs in its own subprocess and reports its own peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`). Once both are set up they take turns step by step (the
other side idles meanwhile), so background load on a shared machine hits both alike.

Every sample is one long chat cut to `--seq` tokens (`truncation_strategy=right`), so every
micro-batch is `micro x seq` tokens with no padding. tokens/s counts all tokens of the steps
after the first `--warmup` ones, over the time of forward, backward and optimizer step. Each side
also reports tokens per CPU-second of its own process over the same steps: on a machine that other
work keeps busy, the wall clock of both sides stretches with that load, the CPU time much less.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The benchmark model: large enough that matmuls, not Python, dominate on 2 CPU threads.
BENCH_MODEL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,  # 3 Gated DeltaNet layers, then 1 gated full-attention layer
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=256,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    full_attention_interval=4,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    partial_rotary_factor=0.25,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
LORA_RANK = 8
LORA_ALPHA = 16.0
LR = 1e-3
# The HF names of megalora's `all-linear` targets on Qwen3-Next (router, shared-expert gate
# and output layer excluded on both sides).
PEER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
                       "gate_proj", "up_proj", "down_proj"]
PEER_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _max_rss_mib() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Turns:
    """A child's side of the step-by-step turn taking: wait for "go" before a step, say "done" after it.

    The parent alternates the two sides step by step, so while one side steps the other is idle and
    both see the same background load of a shared machine; the waits sit outside the timed spans.
    A child also says "done" when set up and waits for a last "go" after its last step, so neither
    side's setup nor its exit (saving, freeing memory) overlaps a timed step of the other.
    """

    def __init__(self, go_fd: int, done_fd: int):
        self.go_fd, self.done_fd = go_fd, done_fd

    def wait(self) -> None:
        if not os.read(self.go_fd, 1):
            raise SystemExit("bench child: the parent closed the turn pipe")

    def done(self) -> None:
        os.write(self.done_fd, b".")


def _batch_digest(batches: list[dict]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b["input_ids"].numpy().tobytes())
        h.update(b["labels"].numpy().tobytes())
    return h.hexdigest()[:16]


# -- setup (parent) ----------------------------------------------------------------------------
def make_model(out: Path, *, num_experts: int, topk: int) -> None:
    """Tokenizer (megalora's tiny demo tokenizer) and a seeded random Qwen3-Next MoE saved by transformers."""
    import torch
    from transformers import AutoTokenizer, Qwen3NextConfig, Qwen3NextForCausalLM

    from megalora.data.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = len(tokenizer)
    vocab += -vocab % 8
    config = Qwen3NextConfig(vocab_size=vocab, bos_token_id=None,
                             eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                             **{**BENCH_MODEL, "num_experts": num_experts, "num_experts_per_tok": topk})
    torch.manual_seed(0)
    Qwen3NextForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)


def write_chats(path: Path, *, num_samples: int, turns: int, seed: int = 0) -> None:
    """Long multi-turn arithmetic chats; each is cut to --seq tokens by right truncation."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(num_samples):
            messages = []
            for _ in range(turns):
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                messages.append({"role": "user", "content": f"What is {a} plus {b}?"})
                messages.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}."})
            f.write(json.dumps({"messages": messages}) + "\n")


def megalora_flags(args: argparse.Namespace, work: Path) -> list[str]:
    """The `megalora sft` flags of the run; the peer side reads the same config for data and optimizer."""
    return ["--model", str(work / "model"), "--dataset", str(work / "chats.jsonl"), "--torch_dtype", "float32",
            "--lora_rank", str(LORA_RANK), "--lora_alpha", str(LORA_ALPHA), "--target_modules", "all-linear",
            "--train_iters", str(args.steps), "--micro_batch_size", str(args.micro),
            "--global_batch_size", str(args.micro), "--max_length", str(args.seq),
            "--truncation_strategy", "right", "--packing", "false", "--lr", str(LR),
            "--lr_decay_style", "constant", "--save", str(work / "run")]


# -- children ----------------------------------------------------------------------------------
def child_megalora(work: Path, flags: list[str], turns: Turns) -> dict:
    """Train with `megalora.train.recipe.train`; record per-step batch digests and the LoRA report."""
    import megalora.train.loop as loop
    import megalora.train.lora.apply as lora_apply
    from megalora.config import load_config
    from megalora.train.recipe import train

    digests: list[str] = []
    step_tokens: list[int] = []
    reports: list = []
    real_step, real_apply = loop.train_step, lora_apply.apply_lora

    # Read-only instrumentation: the loop and the recipe look these names up at call time.
    def step_spy(model, micro_batches, **kw):
        digests.append(_batch_digest(micro_batches))
        step_tokens.append(sum(b["input_ids"].numel() for b in micro_batches))
        return real_step(model, micro_batches, **kw)

    def apply_spy(model, lora_cfg, **kw):
        report = real_apply(model, lora_cfg, **kw)
        reports.append(report)
        return report

    real_sinks = loop.make_sinks

    cpu_seconds: list[float] = []
    mark = [0.0]

    class TurnSink:
        """The loop logs each step after measuring its time: the turn hand-over goes there."""

        def __init__(self, inner):
            self.inner = inner

        def log(self, step: int, metrics: dict) -> None:
            cpu_seconds.append(time.process_time() - mark[0])
            self.inner.log(step, metrics)
            turns.done()
            turns.wait()
            mark[0] = time.process_time()

        def close(self) -> None:
            self.inner.close()

    def sinks_spy(**kw):
        sink = TurnSink(real_sinks(**kw))
        turns.done()  # set up: the sinks are made just before the first step
        turns.wait()
        mark[0] = time.process_time()
        return sink

    loop.train_step, lora_apply.apply_lora, loop.make_sinks = step_spy, apply_spy, sinks_spy
    cfg, extras = load_config(None, flags)
    code = train(cfg, extras)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report = reports[0]
    return dict(rc=code, digests=digests, losses=[r["loss"] for r in rows],
                tokens_per_s=[r["tokens_per_s"] for r in rows],
                cpu_seconds=cpu_seconds, tokens_per_step=step_tokens,
                trainable=report.total_trainable, adapted_base=sum(report.frozen.values()),
                trainable_by_kind=dict(report.trainable), max_rss_mib=_max_rss_mib())


def _peer_lora_model(model, lcfg):
    """`get_peft_model` with the targets exactly as listed.

    For Qwen2-MoE-family models (Qwen3-Next included) under transformers 5, peft rewrites every
    target named `gate_proj`/`up_proj`/`down_proj` into the fused routed-expert parameters (rank
    and alpha doubled on `gate_up_proj`), meant for loading adapters trained on the unfused
    layout. Here those names mean the shared expert's linears, so that rewrite is switched off
    for this call; `_peer_adapted` then checks what was wrapped.
    """
    import peft.utils.transformers_weight_conversion as conversion
    from peft import get_peft_model

    saved = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *a, **k: None
    try:
        return get_peft_model(model, lcfg)
    finally:
        conversion.convert_peft_config_for_transformers = saved


def _peer_adapted(model, *, rank: int) -> tuple[int, int]:
    """(base parameters under a LoRA adapter, LoRA parameters expected at `rank`) of a peft model."""
    import torch
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    adapted, expected = 0, 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, ParamWrapper):
            w = module.get_param()  # [experts, out, in]: A is [experts*r, in], B is [out, experts*r]
            adapted += w.numel()
            expected += w.shape[0] * rank * (w.shape[1] + w.shape[2])
        else:
            base = module.get_base_layer()
            assert isinstance(base, torch.nn.Linear), type(base)
            adapted += base.weight.numel()
            expected += rank * (base.in_features + base.out_features)
    return adapted, expected


def child_peer(work: Path, flags: list[str], turns: Turns) -> dict:
    """Train the same HF folder with transformers + peft on the batches megalora's data pipeline builds."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megalora.config import load_config
    from megalora.data.dataset import build_datasets
    from megalora.data.sampler import BatchLoader

    cfg, _ = load_config(None, flags)
    t = cfg.train
    model_dir = Path(cfg.model.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Built exactly as the recipe builds them for one process (DP 1, accumulation 1).
    train_ds, _ = build_datasets(cfg.data, tokenizer, cache_dir=work / "peer-data-cache", rank=0,
                                 log=lambda msg: None, use_hf=cfg.model.use_hf)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    accum = t.global_batch_size // t.micro_batch_size
    loader = BatchLoader(train_ds, seed=cfg.data.data_seed, accumulation=accum, micro_batch_size=t.micro_batch_size,
                         dp_rank=0, dp_size=1, packing=False, max_length=cfg.data.max_length, pad_to_multiple_of=1,
                         pad_token_id=pad_id, num_workers=0)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lcfg = LoraConfig(r=cfg.lora.lora_rank, lora_alpha=cfg.lora.lora_alpha, lora_dropout=0.0,
                      target_modules=PEER_TARGET_MODULES, target_parameters=PEER_TARGET_PARAMETERS)
    torch.manual_seed(t.seed)
    model = _peer_lora_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    adapted_base, expected = _peer_adapted(model, rank=cfg.lora.lora_rank)
    assert trainable == expected, f"peer LoRA has {trainable} trainable parameters, expected {expected} at rank r"
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    model.train()
    batches = iter(loader)
    digests, losses, tokens_per_s, tokens_per_step, cpu_seconds = [], [], [], [], []
    turns.done()  # set up
    for _ in range(t.train_iters):
        turns.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        micro = [next(batches) for _ in range(accum)]
        global_tokens = float(sum(int(b["num_trained_tokens"]) for b in micro))
        optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = 0.0, 0
        for b in micro:
            logits = model(input_ids=b["input_ids"], use_cache=False).logits
            # Labels are aligned with input_ids: position t is scored against labels[t + 1].
            losses_tok = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                         ignore_index=-100, reduction="sum")
            (losses_tok / global_tokens).backward()
            loss_sum += float(losses_tok.detach())
            tokens += b["input_ids"].numel()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
        optimizer.step()
        elapsed = time.perf_counter() - t0
        cpu_seconds.append(time.process_time() - c0)
        digests.append(_batch_digest(micro))
        losses.append(loss_sum / global_tokens)
        tokens_per_s.append(tokens / max(elapsed, 1e-9))
        tokens_per_step.append(tokens)
        turns.done()
    turns.wait()  # released after the other side's last step
    return dict(rc=0, digests=digests, losses=losses, tokens_per_s=tokens_per_s, tokens_per_step=tokens_per_step,
                cpu_seconds=cpu_seconds,
                trainable=trainable, adapted_base=adapted_base, max_rss_mib=_max_rss_mib())


def run_sides(work: Path, *, threads: int, steps: int, step_timeout: float = 1200.0) -> dict[str, dict]:
    """Start both sides; once both are set up, let them step in turns (alternating who goes first)."""
    import select

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               MEGALORA_HOME=str(work / "home"), PYTHONUNBUFFERED="1")
    sides = ("megalora", "peer")
    procs, go, done, logs = {}, {}, {}, {}
    for side in sides:
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        logs[side] = (work / f"{side}.log").open("w")
        procs[side] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", side, "--work", str(work),
             "--threads", str(threads), "--turn_fds", f"{go_r},{done_w}"],
            env=env, stdout=logs[side], stderr=subprocess.STDOUT, pass_fds=(go_r, done_w))
        os.close(go_r)
        os.close(done_w)
        go[side], done[side] = go_w, done_r
    failed = None

    def await_done(side: str) -> None:
        nonlocal failed
        ready, _, _ = select.select([done[side]], [], [], step_timeout)
        if not ready or not os.read(done[side], 1):
            failed = side
            raise BrokenPipeError

    try:
        for side in sides:
            await_done(side)  # set up
        for k in range(steps):
            for side in (sides if k % 2 == 0 else sides[::-1]):
                os.write(go[side], b".")
                await_done(side)
            print(f"bench: step {k + 1}/{steps} done on both sides", flush=True)
        for side in sides:
            os.write(go[side], b".")  # release: finish and exit
    except BrokenPipeError:
        failed = failed or "?"
    finally:
        for side in sides:
            os.close(go[side])
            if failed:
                procs[side].kill()
            procs[side].wait()
            os.close(done[side])
            logs[side].close()
    results = {}
    for side in sides:
        log, out = work / f"{side}.log", work / f"{side}.json"
        if procs[side].returncode != 0 or not out.is_file():
            tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
            raise SystemExit(f"bench: the {side} side failed (exit {procs[side].returncode}); last lines of {log}:\n"
                             f"{tail}")
        results[side] = json.loads(out.read_text())
    return results


def steady_tokens_per_s(result: dict, warmup: int) -> float:
    """All tokens of the steps after warmup over their total time."""
    tps, toks = result["tokens_per_s"][warmup:], result["tokens_per_step"][warmup:]
    return sum(toks) / sum(n / r for n, r in zip(toks, tps))


def cpu_tokens_per_s(result: dict, warmup: int) -> float:
    """Tokens per CPU-second of the side's own process (all its threads) after warmup: what the work
    costs, little moved by other processes' load, unlike the wall clock."""
    return sum(result["tokens_per_step"][warmup:]) / sum(result["cpu_seconds"][warmup:])


def median_step_tokens_per_s(result: dict, warmup: int) -> float:
    """Median of the per-step rates after warmup (less sensitive to other load on a shared machine)."""
    return float(statistics.median(result["tokens_per_s"][warmup:]))


def print_report(mega: dict, peer: dict, *, steps: int, warmup: int) -> bool:
    """Print the table, the ratios and the consistency checks; returns whether the batches matched."""
    same = mega["digests"] == peer["digests"] and len(mega["digests"]) == steps
    rows = [("megalora", mega), ("transformers+peft", peer)]
    tps = {name: steady_tokens_per_s(r, warmup) for name, r in rows}
    med = {name: median_step_tokens_per_s(r, warmup) for name, r in rows}
    # Other load only ever slows a step down, so the fastest step is the least disturbed one.
    best = {name: max(r["tokens_per_s"][warmup:]) for name, r in rows}
    cpu = {name: cpu_tokens_per_s(r, warmup) for name, r in rows}
    print()
    print(f"{'side':<20}{'tokens/s':>10}{'median step':>13}{'best step':>11}{'peak RSS MiB':>14}{'trainable':>12}"
          f"{'adapted base':>14}{'loss first':>12}{'loss last':>11}")
    for name, r in rows:
        print(f"{name:<20}{tps[name]:>10.0f}{med[name]:>13.0f}{best[name]:>11.0f}{r['max_rss_mib']:>14.0f}"
              f"{r['trainable']:>12,}{r['adapted_base']:>14,}{r['losses'][0]:>12.4f}{r['losses'][-1]:>11.4f}")
    peer_name = "transformers+peft"
    print(f"ratio megalora/peer: tokens/s {tps['megalora'] / tps[peer_name]:.2f}x (median step "
          f"{med['megalora'] / med[peer_name]:.2f}x, best step {best['megalora'] / best[peer_name]:.2f}x), "
          f"tokens per CPU-second {cpu['megalora'] / cpu[peer_name]:.2f}x "
          f"({cpu['megalora']:.0f} vs {cpu[peer_name]:.0f}), peak RSS {mega['max_rss_mib'] / peer['max_rss_mib']:.2f}x")
    for name, r in rows:
        print(f"{name} per-step tokens/s: {' '.join(f'{x:.0f}' for x in r['tokens_per_s'])}")
    # LoRA B starts at zero on both sides, so the first loss is the base model's on the same batch.
    print(f"first-step loss difference (same base model, same batch): "
          f"{abs(mega['losses'][0] - peer['losses'][0]):.2e}")
    print(f"same token batches on both sides: {'yes' if same else 'NO'}; same adapted base weights: "
          f"{'yes' if mega['adapted_base'] == peer['adapted_base'] else 'NO'}")
    print(f"megalora trainable by kind: {mega['trainable_by_kind']}")
    # megalora fuses q/k/v, GDN in_proj_qkvz+in_proj_ba and the shared expert's gate+up into one
    # linear each, so one A [r, hidden] serves what peft gives separate A's.
    layers, interval = BENCH_MODEL["num_hidden_layers"], BENCH_MODEL["full_attention_interval"]
    full = layers // interval
    shared_a = LORA_RANK * BENCH_MODEL["hidden_size"] * (2 * full + (layers - full) + layers)
    fused_ok = mega["trainable"] == peer["trainable"] - shared_a
    print(f"trainable counts differ only by the A's megalora's fused projections share ({peer['trainable']:,} - "
          f"{shared_a:,} = {peer['trainable'] - shared_a:,}): {'yes' if fused_ok else 'NO'}")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--experts", type=int, default=BENCH_MODEL["num_experts"], help="routed experts per layer")
    ap.add_argument("--topk", type=int, default=BENCH_MODEL["num_experts_per_tok"], help="experts per token")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (model, data, logs)")
    ap.add_argument("--child", choices=("megalora", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--turn_fds", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        work = Path(args.work)
        spec = json.loads((work / "spec.json").read_text())
        fn = child_megalora if args.child == "megalora" else child_peer
        go_fd, done_fd = (int(x) for x in args.turn_fds.split(","))
        result = fn(work, spec["flags"], Turns(go_fd, done_fd))
        (work / f"{args.child}.json").write_text(json.dumps(result))
        sys.exit(0 if result["rc"] == 0 else 1)

    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup {args.warmup} must be below --steps {args.steps}")
    work = Path(tempfile.mkdtemp(prefix="megalora-bench-train-"))
    try:
        t0 = time.perf_counter()
        make_model(work / "model", num_experts=args.experts, topk=args.topk)
        # ~14 tokens per turn pair: enough pairs that every chat is longer than --seq.
        write_chats(work / "chats.jsonl", num_samples=max(4 * args.micro * args.steps, 32), turns=args.seq // 8 + 8)
        flags = megalora_flags(args, work)
        (work / "spec.json").write_text(json.dumps({"flags": flags}))
        print(f"bench: model and data in {work} ({time.perf_counter() - t0:.1f}s); threads {args.threads}, "
              f"{args.steps} steps ({args.warmup} warmup) of {args.micro} x {args.seq} tokens, "
              f"{args.experts} experts top-{args.topk}", flush=True)
        t1 = time.perf_counter()
        results = run_sides(work, threads=args.threads, steps=args.steps)
        mega, peer = results["megalora"], results["peer"]
        print(f"bench: both sides done in {time.perf_counter() - t1:.1f}s", flush=True)

        same = print_report(mega, peer, steps=args.steps, warmup=args.warmup)
        if not same:
            raise SystemExit("bench: the two sides saw different batches; the comparison is void")
    finally:
        if args.keep:
            print(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
