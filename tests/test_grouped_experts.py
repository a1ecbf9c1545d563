"""Our grouped-GEMM experts (`GroupedExperts`, base and LoRA in grouped matrix products) equal
megatron's loop experts (`SequentialMLP` + LoRA hooks), values and LoRA gradients in float64,
on 1 rank, EP=2, TP=2+SP and TP=2xEP=2+SP, with and without full recompute, padded and
packed (THD) input."""
import torch

from support.multiprocess import spawn


LAYOUTS = [(1, 1, False), (1, 2, False), (2, 1, True), (2, 2, True)]  # (tp, ep, sequence_parallel)
RECOMPUTE = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


def _forward_backward(model, info, *, packed: bool):
    from megatron.core.packed_seq_params import PackedSeqParams

    from support.models import PACKED_CU_SEQLENS, packed_sample_tokens, sample_tokens
    from megalora.train.model.verify import packed_positions

    kwargs = {}
    if packed:
        tokens = packed_sample_tokens(info.vocab_size)
        cu = torch.tensor(PACKED_CU_SEQLENS, dtype=torch.int32)
        positions = packed_positions(cu)
        longest = int((cu[1:] - cu[:-1]).max())
        kwargs["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                      max_seqlen_q=longest, max_seqlen_kv=longest)
    else:
        tokens = sample_tokens(info.vocab_size)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    model.train()
    logits = model(tokens, positions, None, **kwargs)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=logits.dtype)
    (logits * weights).sum().backward()
    return logits.detach()


def _rank_compare(rank, world_size, model_dir):
    """Spawn target: per layout / recompute / packing, the largest relative difference between
    grouped and loop experts in logits and in any LoRA gradient (this rank's shards)."""
    from megalora.config import LoraSection
    from megalora.parallel import groups
    from megalora.train.lora.apply import apply_lora
    from megalora.train.model.build import build_model
    from megalora.train.model.experts import GroupedExperts

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-300))

    out = {}
    for tp, ep, sp in LAYOUTS:
        groups.initialize(tp=tp, ep=ep, sequence_parallel=sp)
        for recompute in (False, True):
            for packed in (False, True):
                runs = {}
                for experts in ("grouped", "sequential"):
                    model, info = build_model(model_dir, dtype=torch.float64, experts=experts,
                                              **(RECOMPUTE if recompute else {}))
                    num_grouped = sum(isinstance(m, GroupedExperts) for m in model.modules())
                    assert num_grouped == (info.spec.num_layers if experts == "grouped" else 0), num_grouped
                    apply_lora(model, LoraSection(lora_rank=4, lora_dtype="float64"), seed=3, verbose=False)
                    with torch.no_grad():
                        for name, p in model.named_parameters():
                            if p.requires_grad:  # B starts at zero: give every adapter a non-zero delta
                                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name) + rank))
                    logits = _forward_backward(model, info, packed=packed)
                    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
                    runs[experts] = (logits, grads)
                (lg, gg), (ls, gs) = runs["grouped"], runs["sequential"]
                assert gg.keys() == gs.keys()
                expert_grads = [n for n in gs if ".experts.lora_" in n]
                out[(tp, ep, sp, recompute, packed)] = {
                    "logits": rel(lg, ls),
                    "grads": max(rel(gg[n], gs[n]) for n in gs),
                    "num_expert_grads": len(expert_grads),
                    "expert_grad_norm": min(float(gs[n].norm()) for n in expert_grads),
                }
    return out


def test_grouped_experts_equal_loop_experts_on_every_layout(train_assets):
    results = spawn(_rank_compare, 4, args=(str(train_assets.model_dir),), timeout=900)
    for rank, per_case in enumerate(results):
        assert len(per_case) == len(LAYOUTS) * 4
        for case, r in per_case.items():
            assert r["logits"] <= 1e-10, (rank, case, r)
            assert r["grads"] <= 1e-10, (rank, case, r)
            # Both projections of every MoE layer's experts have adapters with real gradients.
            assert r["num_expert_grads"] == 4 * 2, (rank, case, r)
            assert r["expert_grad_norm"] > 0, (rank, case, r)


def test_grouped_experts_keep_per_expert_parameters_as_views(train_assets):
    """Loader, export and merge write per-expert parameters; forward reads the stacks."""
    from megalora.parallel import groups
    from megalora.train.model.build import build_model
    from megalora.train.model.experts import GroupedExperts

    groups.initialize()
    try:
        model, _ = build_model(train_assets.model_dir)
        experts = next(m for m in model.modules() if isinstance(m, GroupedExperts))
        fc1 = experts.local_experts[3].linear_fc1.weight
        assert fc1.data_ptr() == experts.fc1_weight_EOH[3].data_ptr()
        assert not fc1.requires_grad
        with torch.no_grad():
            fc1.add_(1.0)
        assert torch.equal(experts.fc1_weight_EOH[3], fc1)
        model.to(torch.float64)  # moving the model keeps the aliasing
        assert experts.fc1_weight_EOH.dtype == torch.float64
        assert experts.local_experts[3].linear_fc1.weight.data_ptr() == experts.fc1_weight_EOH[3].data_ptr()
        names = [n for n, _ in model.named_parameters()]
        assert not any("weight_E" in n for n in names) and len(names) == len(set(names))
    finally:
        groups.destroy()


def test_grouped_experts_in_float32_take_the_grouped_kernel_and_match(train_assets):
    """fp32 runs CPU `torch._grouped_mm` (fp64 above runs the padded bmm): same check, fp32 tolerance."""
    from megalora.config import LoraSection
    from megalora.parallel import groups
    from megalora.train.lora.apply import apply_lora
    from megalora.train.model.build import build_model
    from megalora.train.ops import grouped_gemm

    calls = []
    real = grouped_gemm.grouped_mm_cpu

    def spy(*args):
        calls.append(args[0].dtype)
        return real(*args)

    groups.initialize()
    try:
        runs = {}
        for experts in ("grouped", "sequential"):
            model, info = build_model(train_assets.model_dir, dtype=torch.float32, experts=experts)
            apply_lora(model, LoraSection(lora_rank=4), seed=3, verbose=False)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.requires_grad:
                        p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
            grouped_gemm.grouped_mm_cpu = spy
            try:
                logits = _forward_backward(model, info, packed=False)
            finally:
                grouped_gemm.grouped_mm_cpu = real
            runs[experts] = (logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert calls and set(calls) == {torch.float32}
        (lg, gg), (ls, gs) = runs["grouped"], runs["sequential"]
        assert float((lg - ls).norm() / ls.norm()) <= 1e-5
        for n in gs:
            assert float((gg[n] - gs[n]).norm() / gs[n].norm().clamp_min(1e-30)) <= 1e-4, n
    finally:
        groups.destroy()
