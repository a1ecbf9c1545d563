"""Multi-rank LoRA: the wrappers under TP=2 (with and without SP) against full-weight math, and
LoRA on every target of a tiny Qwen3-Next (Gated DeltaNet and gated attention layers, MoE with
a gated shared expert) built by `build_model` under TP=2+SP, EP=2 and TP=2 x EP=2+SP, with
both token dispatchers and full recomputation, == one process.

The model oracle is a single-process run (in this process) of the same checkpoint with the same
adapters (random non-zero B), in float64 so summation order stays far below the tolerance.
Each layout loads its slices of the base weights (the loader) and of the adapters, runs
forward/backward on its DP share of the batch, reduces the LoRA gradients with
`reduce_lora_grads`, and the gathered full-shape gradients must match to 1e-5 relative. The
same worlds check `groups.layout`, the rank table the dry run prints, against the ranks, groups
and experts megatron itself gives every rank.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.train.model.tiny import make_tiny_checkpoint

from support.multiprocess import spawn
from test_lora_apply import make_batch, randomize_lora_b

RTOL = 1e-5
SEED = 11
TARGETS = ["all-linear", "router", "shared_expert_gate", "output_layer"]
# (name, world size, tp, ep, sequence parallel, token dispatcher, full recomputation)
LAYOUTS = [("tp2_sp", 2, 2, 1, True, "alltoall", False), ("ep2_allgather", 2, 1, 2, False, "allgather", False),
           ("tp2_ep2_sp", 4, 2, 2, True, "alltoall", False),
           ("tp2_ep2_sp_allgather_recompute", 4, 2, 2, True, "allgather", True)]
# Rank tables checked against megatron's groups without a model: (world size, tp, ep, expert tp).
GROUPS_ONLY = [(4, 2, 2, 2)]
NUM_EXPERTS = 8  # of the tiny qwen3_next_a


def _lora_cfg() -> Any:
    from megalora.config import LoraSection

    return LoraSection(lora_rank=4, lora_alpha=8.0, target_modules=TARGETS, lora_dtype="float64")


def _build(model_dir: str, *, dispatcher: str = "alltoall", recompute: bool = False) -> Any:
    from megalora.train.model.build import build_model

    extra = ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
             if recompute else {})
    model, _ = build_model(model_dir, dtype=torch.float64, moe_token_dispatcher_type=dispatcher,
                           moe_aux_loss_coeff=0.0, **extra)
    return model


def _step(model: Any, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, position_ids, None, labels=labels).mean()
    loss.backward()
    return loss.detach()


S, B, IN, OUT, R = 4, 2, 12, 10, 3


def _layer(kind: str, sp: bool) -> torch.nn.Module:
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, tensor_model_parallel_size=2,
                            sequence_parallel=sp, use_cpu_initialization=True)
    torch.manual_seed(0)  # the same master weight on every rank; each keeps its shard
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    if kind == "column":
        return ColumnParallelLinear(IN, OUT, config=cfg, init_method=init, bias=False,
                                    keep_master_weight_for_test=True)
    return RowParallelLinear(IN, OUT, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                             skip_bias_add=False, keep_master_weight_for_test=True)


def wrapper_checks(rank: int) -> list[str]:
    """TP=2 column/row wrappers, without and with SP, against full-weight math on this rank."""
    from megalora.parallel import groups
    from megalora.train.lora.grads import reduce_lora_grads
    from megalora.train.lora.layers import LoraLinear
    from megalora.train.lora.options import LoraOptions

    checked = []
    for sp in (False, True):
        groups.initialize(tp=2, sequence_parallel=sp)
        for kind in ("column", "row"):
            base = _layer(kind, sp)
            layer = LoraLinear(base, options=LoraOptions(rank=R, alpha=5.0), init_seed=9)
            gen = torch.Generator().manual_seed(1)
            full_a = layer.lora_A.detach().clone() if kind == "column" else None
            full_b = torch.randn(OUT, R, generator=gen)
            x = torch.randn(S, B, IN, generator=gen)
            g = torch.randn(S, B, OUT, generator=gen)
            seq = slice(rank * S // 2, (rank + 1) * S // 2)
            if kind == "column":
                cols = slice(rank * OUT // 2, (rank + 1) * OUT // 2)
                with torch.no_grad():
                    layer.lora_B.copy_(full_b[cols])
                x_in = x[seq] if sp else x
                g_out = g[..., cols]
            else:
                # every rank holds its slice of the full A; rebuild the full one for the reference
                parts = [torch.empty_like(layer.lora_A) for _ in range(2)]
                torch.distributed.all_gather(parts, layer.lora_A.detach().contiguous())
                full_a = torch.cat(parts, dim=1)
                with torch.no_grad():
                    layer.lora_B.copy_(full_b)
                x_in = x[..., rank * IN // 2:(rank + 1) * IN // 2]
                g_out = g[seq] if sp else g
            x_in = x_in.clone().requires_grad_(True)
            out, _ = layer(x_in)
            (out * g_out).sum().backward()
            reduce_lora_grads(layer)

            a = full_a.clone().requires_grad_(True)
            b = full_b.clone().requires_grad_(True)
            xr = x.clone().requires_grad_(True)
            ref = xr @ base.master_weight.T + layer.scaling * (xr @ a.T) @ b.T
            (ref * g).sum().backward()
            if kind == "column":
                torch.testing.assert_close(out, ref[..., cols])  # SP: the base all-gathers the sequence
                torch.testing.assert_close(layer.lora_A.grad, a.grad)
                torch.testing.assert_close(layer.lora_B.grad, b.grad[cols])
                torch.testing.assert_close(x_in.grad, xr.grad[seq] if sp else xr.grad)
            else:
                in_cols = slice(rank * IN // 2, (rank + 1) * IN // 2)
                torch.testing.assert_close(out, ref[seq] if sp else ref)
                torch.testing.assert_close(layer.lora_A.grad, a.grad[:, in_cols])
                torch.testing.assert_close(layer.lora_B.grad, b.grad)
                torch.testing.assert_close(x_in.grad, xr.grad[..., in_cols])
            checked.append(f"{kind}:sp={sp}")
            if kind == "column" and not sp:  # the output layer's form: all-gather the vocab split
                with torch.no_grad():
                    gathered, _ = layer(x, runtime_gather_output=True)
                torch.testing.assert_close(gathered, ref.detach())
                checked.append("column:gather")
            # dropout: ranks holding different slices of the input must not share one mask
            drop = LoraLinear(_layer(kind, sp), options=LoraOptions(rank=R, dropout=0.5), init_seed=9)
            mask = (drop.input_dropout(torch.ones(64, IN)) != 0).float()
            masks = [torch.empty_like(mask) for _ in range(2)]
            torch.distributed.all_gather(masks, mask)
            split = kind == "row" or sp
            assert torch.equal(masks[0], masks[1]) != split, (kind, sp)
    return checked


def reference_run(model_dir: str) -> dict[str, Any]:
    """One process: adapters (random B), loss and LoRA gradients."""
    from megalora.parallel import groups
    from megalora.train.lora.apply import apply_lora
    from megalora.train.lora.grads import lora_parameters

    groups.initialize(seed=SEED)
    model = _build(model_dir)
    apply_lora(model, _lora_cfg(), seed=SEED, verbose=False)
    randomize_lora_b(model)
    lora = {n: p.detach().clone() for n, p in lora_parameters(model)}
    tokens, labels = make_batch()
    loss = _step(model, tokens, labels)
    grads = {n: p.grad.clone() for n, p in lora_parameters(model)}
    groups.destroy()
    return {"lora": lora, "loss": loss.item(), "grads": grads}


def _megatron_placement(experts: list[int] | None) -> dict[str, Any]:
    """Where megatron itself put this rank: its ranks, group members (and experts, from the model)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def members(group: Any) -> list[int]:
        return dist.get_process_group_ranks(group)

    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(), "dp_rank": ps.get_data_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(), "etp_rank": ps.get_expert_tensor_parallel_rank(),
        "expert_dp_rank": ps.get_expert_data_parallel_rank(), "experts": experts,
        "tp_group": members(ps.get_tensor_model_parallel_group()), "dp_group": members(ps.get_data_parallel_group()),
        "ep_group": members(ps.get_expert_model_parallel_group()),
        "etp_group": members(ps.get_expert_tensor_parallel_group()),
        "expert_dp_group": members(ps.get_expert_data_parallel_group()),
    }


def layout_worker(rank: int, world_size: int, model_dir: str, ref: dict[str, Any], cases: list[tuple],
                  groups_only: list[tuple]) -> dict[str, Any]:
    """Every layout of this world size: loss and local LoRA grads after the reductions, and where
    megatron placed this rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megalora.parallel import groups
    from megalora.train.lora.apply import apply_lora
    from megalora.train.lora.grads import lora_parameters, reduce_lora_grads
    from megalora.train.lora.layout import lora_layout, shard_lora_state

    out: dict[str, Any] = {"wrappers": wrapper_checks(rank) if world_size == 2 else None}
    for name, tp, ep, sp, dispatcher, recompute in cases:
        dims = groups.initialize(tp=tp, ep=ep, sequence_parallel=sp, seed=SEED)
        model = _build(model_dir, dispatcher=dispatcher, recompute=recompute)
        where = {"tp_rank": dims.tp_rank, "tp_size": tp, "ep_rank": dims.ep_rank, "ep_size": ep}
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
        dp_rank, dp = dims.dp_rank, dims.dp
        loss = _step(model, tokens.chunk(dp)[dp_rank], labels.chunk(dp)[dp_rank])
        reduce_lora_grads(model)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        out[name] = {"loss": loss.item() / dp, "layout": layout,
                     "grads": {n: p.grad.clone() for n, p in params.items()},
                     "row": {"tp_rank": dims.tp_rank, "ep_rank": dims.ep_rank},
                     "megatron": _megatron_placement(list(model.decoder.layers[0].mlp.local_expert_indices))}
    for _, tp, ep, etp in groups_only:
        groups.initialize(tp=tp, ep=ep, etp=etp, seed=SEED)
        out[("groups", tp, ep, etp)] = _megatron_placement(None)
    groups.destroy()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # A vocabulary TP=2 divides: the output layer's B then has the same rows in every layout.
    return str(make_tiny_checkpoint("qwen3_next_a", tmp_path_factory.mktemp("lora-parallel"), seed=2,
                                    overrides={"vocab_size": 256}))


@pytest.fixture(scope="module")
def reference(model_dir: str) -> dict[str, Any]:
    return reference_run(model_dir)


@pytest.fixture(scope="module")
def world_results(model_dir: str, reference: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """One spawn per world size runs every check of that size (process start-up dominates)."""
    results = {}
    for world in (2, 4):
        cases = [(n, *rest) for n, w, *rest in LAYOUTS if w == world]
        groups_only = [g for g in GROUPS_ONLY if g[0] == world]
        results[world] = spawn(layout_worker, world, args=(model_dir, reference, cases, groups_only), timeout=600)
    return results


def test_tp2_wrappers_match_full_weights_with_and_without_sp(world_results: dict) -> None:
    expected = ["column:sp=False", "column:gather", "row:sp=False", "column:sp=True", "row:sp=True"]
    assert [r["wrappers"] for r in world_results[2]] == [expected, expected]


def test_lora_grads_match_single_process_under_tp_sp_ep(reference: dict, world_results: dict) -> None:
    from megalora.train.lora.layout import gather_lora_state

    ref = reference
    # every kind of target is there: GDN and attention projections, experts, shared expert, router, gate, head
    for part in ("in_proj", "out_proj", "linear_qkv", "linear_proj", "mlp.experts", "shared_experts.linear_fc1",
                 "router", "shared_experts.gate", "output_layer"):
        assert any(part in name for name in ref["grads"]), part
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())
    for name, world, tp, ep, *_ in LAYOUTS:
        results = [r[name] for r in world_results[world]]
        assert abs(results[0]["loss"] - ref["loss"]) <= RTOL * abs(ref["loss"]), name
        grads = gather_lora_state([r["grads"] for r in results], results[0]["layout"],
                                  rows=[r["row"] for r in results], tp_size=tp, ep_size=ep)
        assert grads.keys() == ref["grads"].keys()
        for key, want in ref["grads"].items():
            assert grads[key].shape == want.shape, (name, key)
            assert _rel(grads[key], want) < RTOL, (name, key, _rel(grads[key], want))


@pytest.mark.parametrize("case", [layout[:4] for layout in LAYOUTS] + [("groups", *g) for g in GROUPS_ONLY],
                         ids=[layout[0] for layout in LAYOUTS] + [f"groups_tp{g[1]}_ep{g[2]}_etp{g[3]}" for g in GROUPS_ONLY])
def test_layout_table_matches_megatron_groups(case: tuple, world_results: dict) -> None:
    from megalora.parallel.groups import layout as layout_table

    if case[0] == "groups":
        _, world_size, tp, ep, etp = case
        placements = [r[("groups", tp, ep, etp)] for r in world_results[world_size]]
    else:
        name, world_size, tp, ep = case
        etp = 1
        placements = [r[name]["megatron"] for r in world_results[world_size]]
    rows = layout_table(world_size, tp=tp, ep=ep, etp=etp, num_experts=NUM_EXPERTS)
    for row, placed in zip(rows, placements):
        for key in ("tp_rank", "dp_rank", "ep_rank", "etp_rank", "expert_dp_rank"):
            assert row[key] == placed[key], (row["rank"], key)
        if placed["experts"] is not None:
            assert row["experts"] == placed["experts"], row["rank"]

        def same(*keys: str) -> list[int]:
            return [r["rank"] for r in rows if all(r[k] == row[k] for k in keys)]

        # a group is the set of ranks that agree on every other coordinate of its grid
        assert placed["tp_group"] == same("dp_rank")
        assert placed["dp_group"] == same("tp_rank")
        assert placed["ep_group"] == same("etp_rank", "expert_dp_rank")
        assert placed["etp_group"] == same("ep_rank", "expert_dp_rank")
        assert placed["expert_dp_group"] == same("ep_rank", "etp_rank")
