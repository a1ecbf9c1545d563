"""LoRA on every target of a tiny MoE GPTModel: TP=2+SP, EP=2 and TP=2 x EP=2+SP == one process.

The oracle is a single-process run (spawned, world size 1) of the same seeded base model with
the same adapters (random non-zero B). Each layout loads its slices of the base weights and of
the adapters, runs forward/backward on its DP share of the batch, reduces the LoRA gradients
with `reduce_lora_grads`, and the gathered full-shape gradients must match to 1e-5 relative.
"""
from __future__ import annotations

from typing import Any

import torch

from megalora.parallel.multiprocess import spawn
from test_lora_apply import build_model, make_batch, randomize_lora_b

RTOL = 1e-5
SEED = 11
TARGETS = ["all-linear", "router", "shared_expert_gate", "output_layer"]
# (name, world size, tp, ep, sequence parallel)
LAYOUTS = [("tp2_sp", 2, 2, 1, True), ("ep2", 2, 1, 2, False), ("tp2_ep2_sp", 4, 2, 2, True)]


def _lora_cfg() -> Any:
    from megalora.config import LoraSection

    return LoraSection(lora_rank=4, lora_alpha=8.0, target_modules=TARGETS)


def _step(model: Any, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, position_ids, None, labels=labels).mean()
    loss.backward()
    return loss.detach()


def reference_worker(rank: int, world_size: int) -> dict[str, Any]:
    """One process: base state, adapters (random B), loss and LoRA gradients."""
    from megalora.parallel import groups
    from megalora.train.lora.apply import apply_lora
    from megalora.train.lora.grads import lora_parameters

    groups.initialize(seed=SEED)
    torch.manual_seed(SEED)
    model = build_model()
    base = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    apply_lora(model, _lora_cfg(), seed=SEED, verbose=False)
    randomize_lora_b(model)
    lora = {n: p.detach().clone() for n, p in lora_parameters(model)}
    tokens, labels = make_batch()
    loss = _step(model, tokens, labels)
    grads = {n: p.grad.clone() for n, p in lora_parameters(model)}
    return {"base": base, "lora": lora, "loss": loss.item(), "grads": grads}


def layout_worker(rank: int, world_size: int, ref: dict[str, Any], cases: list[tuple]) -> dict[str, Any]:
    """Every layout of this world size: loss and local LoRA grads after the reductions."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megalora.parallel import groups
    from megalora.parallel.sharding import gpt_rules, shard_state_dict
    from megalora.train.lora.apply import apply_lora
    from megalora.train.lora.grads import lora_parameters, reduce_lora_grads
    from megalora.train.lora.layout import lora_layout, shard_lora_state

    out = {}
    for name, tp, ep, sp in cases:
        info = groups.initialize(tp=tp, ep=ep, sequence_parallel=sp, seed=SEED)
        model = build_model(tp=tp, ep=ep, sp=sp)
        where = {"tp_rank": info["tp_rank"], "tp_size": tp, "ep_rank": info["ep_rank"], "ep_size": ep}
        model.load_state_dict(shard_state_dict(ref["base"], rules=gpt_rules(), **where), strict=True)
        apply_lora(model, _lora_cfg(), seed=SEED, verbose=False)
        layout = lora_layout(model)
        shard = shard_lora_state(ref["lora"], layout, **where)
        params = dict(lora_parameters(model))
        assert params.keys() == shard.keys()
        with torch.no_grad():
            for key, value in shard.items():
                if not key.endswith("_B"):  # A is seeded by module name: every layout starts equal
                    torch.testing.assert_close(params[key], value, rtol=0, atol=0)
                params[key].copy_(value)
        tokens, labels = make_batch()
        dp_rank, dp = info["dp_rank"], info["dp"]
        loss = _step(model, tokens.chunk(dp)[dp_rank], labels.chunk(dp)[dp_rank])
        reduce_lora_grads(model)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        out[name] = {"loss": loss.item() / dp, "layout": layout,
                     "grads": {n: p.grad.clone() for n, p in params.items()},
                     "row": {"tp_rank": info["tp_rank"], "ep_rank": info["ep_rank"]}}
    groups.destroy()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_lora_grads_match_single_process_under_tp_sp_ep() -> None:
    from megalora.train.lora.layout import gather_lora_state

    ref = spawn(reference_worker, 1, timeout=300)[0]
    assert len(ref["grads"]) == 2 * 16 + 2  # per layer: 4 dense pairs, 4 expert, router and gate pairs; head
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())
    for world in (2, 4):
        cases = [(n, tp, ep, sp) for n, w, tp, ep, sp in LAYOUTS if w == world]
        per_rank = spawn(layout_worker, world, args=(ref, cases), timeout=400)
        for name, tp, ep, _ in cases:
            results = [r[name] for r in per_rank]
            assert abs(results[0]["loss"] - ref["loss"]) <= RTOL * abs(ref["loss"]), name
            grads = gather_lora_state([r["grads"] for r in results], results[0]["layout"],
                                      rows=[r["row"] for r in results], tp_size=tp, ep_size=ep)
            assert grads.keys() == ref["grads"].keys()
            for key, want in ref["grads"].items():
                assert grads[key].shape == want.shape, (name, key)
                assert _rel(grads[key], want) < RTOL, (name, key, _rel(grads[key], want))
