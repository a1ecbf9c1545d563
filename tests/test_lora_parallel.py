"""Multi-rank LoRA: the wrappers under TP=2 (with and without SP) against full-weight math, and
LoRA on every target of a tiny MoE GPTModel under TP=2+SP, EP=2 and TP=2 x EP=2+SP == one process.

The model oracle is a single-process run (in this process) of the same seeded base model with
the same adapters (random non-zero B). Each layout loads its slices of the base weights and of
the adapters, runs forward/backward on its DP share of the batch, reduces the LoRA gradients
with `reduce_lora_grads`, and the gathered full-shape gradients must match to 1e-5 relative.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

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


def reference_run() -> dict[str, Any]:
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
    groups.destroy()
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

    out: dict[str, Any] = {"wrappers": wrapper_checks(rank) if world_size == 2 else None}
    for name, tp, ep, sp in cases:
        dims = groups.initialize(tp=tp, ep=ep, sequence_parallel=sp, seed=SEED)
        model = build_model(tp=tp, ep=ep, sp=sp)
        where = {"tp_rank": dims.tp_rank, "tp_size": tp, "ep_rank": dims.ep_rank, "ep_size": ep}
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
        dp_rank, dp = dims.dp_rank, dims.dp
        loss = _step(model, tokens.chunk(dp)[dp_rank], labels.chunk(dp)[dp_rank])
        reduce_lora_grads(model)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        out[name] = {"loss": loss.item() / dp, "layout": layout,
                     "grads": {n: p.grad.clone() for n, p in params.items()},
                     "row": {"tp_rank": dims.tp_rank, "ep_rank": dims.ep_rank}}
    groups.destroy()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return reference_run()


@pytest.fixture(scope="module")
def world_results(reference: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """One spawn per world size runs every check of that size (process start-up dominates)."""
    results = {}
    for world in (2, 4):
        cases = [(n, tp, ep, sp) for n, w, tp, ep, sp in LAYOUTS if w == world]
        results[world] = spawn(layout_worker, world, args=(reference, cases), timeout=400)
    return results


def test_tp2_wrappers_match_full_weights_with_and_without_sp(world_results: dict) -> None:
    expected = ["column:sp=False", "column:gather", "row:sp=False", "column:sp=True", "row:sp=True"]
    assert [r["wrappers"] for r in world_results[2]] == [expected, expected]


def test_lora_grads_match_single_process_under_tp_sp_ep(reference: dict, world_results: dict) -> None:
    from megalora.train.lora.layout import gather_lora_state

    ref = reference
    assert len(ref["grads"]) == 2 * 16 + 2  # per layer: 4 dense pairs, 4 expert, router and gate pairs; head
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())
    for name, world, tp, ep, _ in LAYOUTS:
        results = [r[name] for r in world_results[world]]
        assert abs(results[0]["loss"] - ref["loss"]) <= RTOL * abs(ref["loss"]), name
        grads = gather_lora_state([r["grads"] for r in results], results[0]["layout"],
                                  rows=[r["row"] for r in results], tp_size=tp, ep_size=ep)
        assert grads.keys() == ref["grads"].keys()
        for key, want in ref["grads"].items():
            assert grads[key].shape == want.shape, (name, key)
            assert _rel(grads[key], want) < RTOL, (name, key, _rel(grads[key], want))
