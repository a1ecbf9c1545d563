"""Sharding plan: slices per kind, expert selection, shard→gather identity; rank layout."""

from __future__ import annotations

import pytest
import torch

from megalora.config import ConfigError
from megalora.parallel.groups import layout
from megalora.parallel.sharding import gather_state_dicts, gpt_rules, kind_of, shard_state_dict

H, F, V, E, FE = 8, 12, 16, 4, 6  # hidden, ffn, vocab, experts, expert ffn


def full_state_dict(*, grouped: bool = False) -> dict[str, torch.Tensor]:
    """A megatron GPT MoE state dict (megatron's key names), every entry distinct."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    sd = {
        "embedding.word_embeddings.weight": t(V, H),
        "decoder.layers.0.input_layernorm.weight": t(H),
        "decoder.layers.0.self_attention.linear_qkv.weight": t(2 * H, H),
        "decoder.layers.0.self_attention.linear_qkv._extra_state": None,
        "decoder.layers.0.self_attention.linear_proj.weight": t(H, H),
        "decoder.layers.0.self_attention.q_layernorm.weight": t(4),
        "decoder.layers.0.pre_mlp_layernorm.weight": t(H),
        "decoder.layers.0.mlp.router.weight": t(E, H),
        "decoder.layers.0.mlp.shared_experts.linear_fc1.weight": t(2 * F, H),
        "decoder.layers.0.mlp.shared_experts.linear_fc2.weight": t(H, F),
        "decoder.layers.0.mlp.shared_experts.gate_weight": t(1, H),
        "decoder.layers.1.mlp.linear_fc1.weight": t(2 * F, H),
        "decoder.layers.1.mlp.linear_fc2.weight": t(H, F),
        "decoder.final_layernorm.weight": t(H),
        "output_layer.weight": t(V, H),
    }
    for e in range(E):
        if grouped:
            sd[f"decoder.layers.0.mlp.experts.linear_fc1.weight{e}"] = t(2 * FE, H)
            sd[f"decoder.layers.0.mlp.experts.linear_fc2.weight{e}"] = t(H, FE)
        else:
            sd[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"] = t(2 * FE, H)
            sd[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight"] = t(H, FE)
    return sd


def _shards(sd: dict, world: int, tp: int, ep: int, etp: int = 1) -> tuple[list, list]:
    rows = layout(world, tp=tp, ep=ep, etp=etp, num_experts=E)
    shards = [
        shard_state_dict(sd, tp_rank=r["tp_rank"], tp_size=tp, ep_rank=r["ep_rank"],
                         ep_size=ep, rules=gpt_rules(), etp_rank=r["etp_rank"], etp_size=etp)
        for r in rows
    ]
    return shards, rows


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if a[key] is None:
            assert b[key] is None, key
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
@pytest.mark.parametrize(
    "world,tp,ep,etp", [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1), (4, 2, 2, 1), (4, 2, 2, 2),
                        (8, 2, 4, 1)]
)
def test_shard_then_gather_is_identity(world: int, tp: int, ep: int, etp: int,
                                       grouped: bool) -> None:
    sd = full_state_dict(grouped=grouped)
    shards, rows = _shards(sd, world, tp, ep, etp)
    _assert_same(gather_state_dicts(shards, ranks=rows, tp_size=tp, ep_size=ep,
                                    rules=gpt_rules(), etp_size=etp), sd)


def test_dense_slices_per_kind() -> None:
    sd = full_state_dict()
    shard = shard_state_dict(sd, tp_rank=1, tp_size=2, ep_rank=0, ep_size=1, rules=gpt_rules())
    p = "decoder.layers.0."
    assert torch.equal(shard["embedding.word_embeddings.weight"],
                       sd["embedding.word_embeddings.weight"][V // 2:])
    assert torch.equal(shard[p + "self_attention.linear_qkv.weight"],
                       sd[p + "self_attention.linear_qkv.weight"][H:])
    assert torch.equal(shard[p + "self_attention.linear_proj.weight"],
                       sd[p + "self_attention.linear_proj.weight"][:, H // 2:])
    fc1 = sd[p + "mlp.shared_experts.linear_fc1.weight"]  # [gate (F rows); up (F rows)]
    half = F // 2
    expected = torch.cat([fc1[half:F], fc1[F + half:]])
    assert torch.equal(shard[p + "mlp.shared_experts.linear_fc1.weight"], expected)
    for key in ("input_layernorm.weight", "mlp.router.weight", "mlp.shared_experts.gate_weight",
                "self_attention.q_layernorm.weight"):
        assert torch.equal(shard[p + key], sd[p + key])
    assert shard[p + "self_attention.linear_qkv._extra_state"] is None


@pytest.mark.parametrize("grouped", [False, True], ids=["sequential", "grouped"])
def test_experts_selected_and_renumbered_by_ep_rank(grouped: bool) -> None:
    sd = full_state_dict(grouped=grouped)
    shard = shard_state_dict(sd, tp_rank=1, tp_size=2, ep_rank=1, ep_size=2, rules=gpt_rules())

    def key(e: int, fc: int) -> str:
        if grouped:
            return f"decoder.layers.0.mlp.experts.linear_fc{fc}.weight{e}"
        return f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc{fc}.weight"

    expert_keys = {k for k in shard if ".experts." in k and "shared" not in k}
    assert expert_keys == {key(e, fc) for e in (0, 1) for fc in (1, 2)}
    for local, global_id in ((0, 2), (1, 3)):
        # expert tensor parallel is 1: whole experts despite tp_size=2
        assert torch.equal(shard[key(local, 1)], sd[key(global_id, 1)])
        assert torch.equal(shard[key(local, 2)], sd[key(global_id, 2)])


def test_dense_gated_fc1_rule_follows_gated_linear_unit() -> None:
    key = "decoder.layers.1.mlp.linear_fc1.weight"
    assert kind_of(key, gpt_rules()) == "glu_column"
    assert kind_of(key, gpt_rules(gated_linear_unit=False)) == "column"


def test_user_mistakes_name_the_key() -> None:
    sd = full_state_dict()
    with pytest.raises(ValueError, match="decoder.layers.0.mystery.weight"):
        shard_state_dict({**sd, "decoder.layers.0.mystery.weight": torch.ones(2)}, tp_rank=0,
                         tp_size=1, ep_rank=0, ep_size=1, rules=gpt_rules())
    split_error = r"embedding.word_embeddings.weight: shape \(16, 8\) cannot be split 3 ways"
    with pytest.raises(ValueError, match=split_error):
        shard_state_dict(sd, tp_rank=0, tp_size=3, ep_rank=0, ep_size=1, rules=gpt_rules())
    with pytest.raises(ValueError, match="not divisible by expert_model_parallel_size=3"):
        shard_state_dict(sd, tp_rank=0, tp_size=1, ep_rank=0, ep_size=3, rules=gpt_rules())
    shards, rows = _shards(sd, 2, 2, 1)
    with pytest.raises(ValueError, match="no shard holds"):
        gather_state_dicts(shards[:1], ranks=rows[:1], tp_size=2, ep_size=1, rules=gpt_rules())


def test_layout_follows_megatron_rank_order() -> None:
    rows = layout(8, tp=2, ep=4, num_experts=8)
    # tp fastest, then dp; the expert grid: ep fastest, then expert-dp
    assert [r["tp_rank"] for r in rows] == [0, 1] * 4
    assert [r["dp_rank"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r["ep_rank"] for r in rows] == [0, 1, 2, 3] * 2
    assert [r["expert_dp_rank"] for r in rows] == [0] * 4 + [1] * 4
    assert rows[5]["experts"] == [2, 3]
    # with expert TP the expert grid is etp fastest, then ep, then expert-dp
    rows = layout(8, tp=2, ep=2, etp=2, num_experts=4)
    assert [r["etp_rank"] for r in rows] == [0, 1] * 4
    assert [r["ep_rank"] for r in rows] == [0, 0, 1, 1] * 2
    assert [r["expert_dp_rank"] for r in rows] == [0] * 4 + [1] * 4
    assert rows[3]["experts"] == [2, 3]


def test_layout_rejects_bad_degrees() -> None:
    with pytest.raises(ConfigError, match="world size 4 is not divisible by `tensor_model_parallel_size`=3"):
        layout(4, tp=3, ep=1, num_experts=4)
    with pytest.raises(ConfigError, match="`expert_model_parallel_size`=4 does not divide the 6 experts"):
        layout(4, tp=1, ep=4, num_experts=6)
    with pytest.raises(ConfigError, match="`expert_model_parallel_size`=2 x `expert_tensor_parallel_size`=4"):
        layout(4, tp=2, ep=2, etp=4, num_experts=4)
    with pytest.raises(ConfigError, match="`expert_model_parallel_size`=2 but the model has no experts"):
        layout(2, tp=1, ep=2, num_experts=0)
