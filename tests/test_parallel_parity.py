"""Layout parity: megatron-core GPTModel with MoE under TP/SP/EP == one process.

One seeded full state dict is built by a single-process run (spawned with world size 1,
the oracle); each layout loads its ranks' slices (``shard_state_dict``), runs one
forward/backward on the same batch split over DP, reduces gradients the way megatron's
DDP and ``finalize_model_grads`` do (``megalora.parallel.grads``), and gathers them back
to full shape (``gather_state_dicts``). Loss and every gradient must match the oracle
to 1e-5 relative, with and without full recomputation, for the alltoall and allgather
token dispatchers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from megalora.parallel.multiprocess import spawn

VOCAB, SEQ, BATCH = 128, 16, 2
RTOL = 1e-5

# (name, world size, tp, ep, expert tp, sequence parallel, token dispatcher)
LAYOUTS = [
    ("tp2_ep2_sp_alltoall", 4, 2, 2, 1, True, "alltoall"),
    ("tp2_ep2_sp_allgather", 4, 2, 2, 1, True, "allgather"),
    # expert TP = TP: the alltoall dispatcher gathers uneven token chunks over expert TP
    ("tp2_ep2_etp2_sp_alltoall", 4, 2, 2, 2, True, "alltoall"),
    ("tp2_sp", 2, 2, 1, 1, True, "alltoall"),
    ("ep2_alltoall", 2, 1, 2, 1, False, "alltoall"),
    ("ep2_allgather", 2, 1, 2, 1, False, "allgather"),
]
RECOMPUTE = [False, True]


def build_model(
    *, tp: int, ep: int, etp: int = 1, sp: bool, dispatcher: str, recompute: bool
) -> Any:
    """The tiny MoE GPT (4 experts, top-2, shared expert, RMSNorm, q/k norm, rotary), fp32,
    no dropout."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from megalora.train.layer_specs import local_gpt_spec

    recompute_kwargs = (
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
        if recompute
        else {}
    )
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=sp,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_token_dispatcher_type=dispatcher,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        **recompute_kwargs,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=local_gpt_spec(config, num_experts=4, qk_layernorm=True),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token labels, [BATCH, SEQ] each."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def step(model: Any, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward + backward of the mean token loss; returns the local loss."""
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, position_ids, None, labels=labels).mean()
    loss.backward()
    return loss.detach()


def reference_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Single process: seed, build, return the full state dict, loss and gradients."""
    from megalora.parallel import groups

    groups.initialize(seed=11)
    torch.manual_seed(11)
    model = build_model(tp=1, ep=1, sp=False, dispatcher="alltoall", recompute=False)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    tokens, labels = make_batch()
    loss = step(model, tokens, labels)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"state": state, "loss": loss.item(), "grads": grads}


def _megatron_placement(model: Any) -> dict[str, Any]:
    """Where megatron itself put this rank: its ranks, group members and experts."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def members(group: Any) -> list[int]:
        return dist.get_process_group_ranks(group)

    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "etp_rank": ps.get_expert_tensor_parallel_rank(),
        "expert_dp_rank": ps.get_expert_data_parallel_rank(),
        "experts": list(model.decoder.layers[0].mlp.local_expert_indices),
        "tp_group": members(ps.get_tensor_model_parallel_group()),
        "dp_group": members(ps.get_data_parallel_group()),
        "ep_group": members(ps.get_expert_model_parallel_group()),
        "etp_group": members(ps.get_expert_tensor_parallel_group()),
        "expert_dp_group": members(ps.get_expert_data_parallel_group()),
    }


def layout_worker(
    rank: int, world_size: int, full_sd: dict[str, torch.Tensor], cases: list[tuple]
) -> dict[str, Any]:
    """Run every (layout, recompute) case on this rank; return loss, local grads, row."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megalora.parallel import groups
    from megalora.parallel.grads import (
        allreduce_data_parallel_grads,
        allreduce_sequence_parallel_grads,
    )
    from megalora.parallel.sharding import gpt_rules, shard_state_dict

    out = {}
    for name, tp, ep, etp, sp, dispatcher, recompute in cases:
        dims = groups.initialize(tp=tp, ep=ep, etp=etp, sequence_parallel=sp, seed=11)
        model = build_model(
            tp=tp, ep=ep, etp=etp, sp=sp, dispatcher=dispatcher, recompute=recompute
        )
        shard = shard_state_dict(
            full_sd,
            tp_rank=dims.tp_rank,
            tp_size=tp,
            ep_rank=dims.ep_rank,
            ep_size=ep,
            etp_rank=dims.etp_rank,
            etp_size=etp,
            rules=gpt_rules(),
        )
        model.load_state_dict(shard, strict=True)
        tokens, labels = make_batch()
        dp_rank, dp = dims.dp_rank, dims.dp
        loss = step(model, tokens.chunk(dp)[dp_rank], labels.chunk(dp)[dp_rank])
        allreduce_sequence_parallel_grads(model)
        allreduce_data_parallel_grads(model)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        out[f"{name}_recompute{int(recompute)}"] = {
            "loss": loss.item() / dp,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "row": {k: dims.coordinates()[k] for k in ("tp_rank", "ep_rank", "etp_rank")},
            "megatron": _megatron_placement(model),
        }
    groups.destroy()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_world(world_size: int, full_sd: dict[str, Any]) -> dict[str, Any]:
    """All cases of one world size in one spawn; returns per case (loss, full grads)."""
    from megalora.parallel.sharding import gather_state_dicts, gpt_rules

    cases = [(*layout[:1], *layout[2:], rc) for layout in LAYOUTS if layout[1] == world_size
             for rc in RECOMPUTE]
    per_rank = spawn(layout_worker, world_size, args=(full_sd, cases), timeout=400)
    results = {}
    for name, tp, ep, etp, _, _, recompute in cases:
        key = f"{name}_recompute{int(recompute)}"
        rows = [r[key]["row"] for r in per_rank]
        grads = gather_state_dicts(
            [r[key]["grads"] for r in per_rank], ranks=rows, tp_size=tp, ep_size=ep,
            etp_size=etp, rules=gpt_rules(),
        )
        results[key] = {
            "losses": [r[key]["loss"] for r in per_rank],
            "grads": grads,
            "placement": [r[key]["megatron"] for r in per_rank],
        }
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The single-process oracle (world size 1): full state dict, loss, gradients."""
    return spawn(reference_worker, 1, timeout=300)[0]


@pytest.fixture(scope="module")
def worlds(reference: dict[str, Any]) -> Any:
    """Per world size, the results of all its cases, computed once (one spawn each)."""
    cache: dict[int, dict[str, Any]] = {}

    def get(world_size: int) -> dict[str, Any]:
        if world_size not in cache:
            cache[world_size] = run_world(world_size, reference["state"])
        return cache[world_size]

    return get


@pytest.mark.parametrize("recompute", RECOMPUTE, ids=["plain", "full_recompute"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_loss_and_grads_match_single_process(
    layout: tuple, recompute: bool, reference: dict[str, Any], worlds: Any
) -> None:
    name, world_size = layout[0], layout[1]
    result = worlds(world_size)[f"{name}_recompute{int(recompute)}"]
    for rank, loss in enumerate(result["losses"]):
        assert loss == pytest.approx(reference["loss"], rel=RTOL), f"rank {rank} loss"
    assert set(result["grads"]) == set(reference["grads"])
    for param, expected in reference["grads"].items():
        got = result["grads"][param]
        assert got.shape == expected.shape, param
        assert expected.norm() > 0, f"{param}: the oracle gradient is zero"
        assert _rel(got, expected) < RTOL, f"{param}: rel err {_rel(got, expected):.2e}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_table_matches_megatron_groups(layout: tuple, worlds: Any) -> None:
    from megalora.parallel.groups import layout as layout_table

    name, world_size, tp, ep, etp = layout[:5]
    rows = layout_table(world_size, tp=tp, ep=ep, etp=etp, num_experts=4)
    result = worlds(world_size)[f"{name}_recompute0"]
    for row, placed in zip(rows, result["placement"]):
        for key in ("tp_rank", "dp_rank", "ep_rank", "etp_rank", "expert_dp_rank", "experts"):
            assert row[key] == placed[key], (row["rank"], key)

        def same(*keys: str) -> list[int]:
            return [r["rank"] for r in rows if all(r[k] == row[k] for k in keys)]

        # a group is the set of ranks that agree on every other coordinate of its grid
        assert placed["tp_group"] == same("dp_rank")
        assert placed["dp_group"] == same("tp_rank")
        assert placed["ep_group"] == same("etp_rank", "expert_dp_rank")
        assert placed["etp_group"] == same("ep_rank", "expert_dp_rank")
        assert placed["expert_dp_group"] == same("ep_rank", "etp_rank")
