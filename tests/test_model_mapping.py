"""Pure mapping and config tests: fused layouts against slow per-head references, HF <->
megatron round trips on real tiny checkpoints, and config.json errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megalora.config import ConfigError
from megalora.train.model import layouts
from megalora.train.model.hf_config import padded_vocab_size, parse_hf_config, read_hf_config, to_transformer_config
from megalora.train.model.mapping import hf_to_megatron, megatron_to_hf, vocab_rows
from megalora.train.model.tiny import TINY_CONFIGS, make_tiny_checkpoint


def _loop_qkv(q, k, v, *, head_dim, heads_per_group, gated):
    """Slow reference: walk groups and heads and collect rows in megatron's order."""
    rows = []
    groups = k.shape[0] // head_dim
    width = 2 * head_dim if gated else head_dim
    for g in range(groups):
        heads = range(g * heads_per_group, (g + 1) * heads_per_group)
        for h in heads:
            rows.append(q[h * width : h * width + head_dim])
        if gated:
            for h in heads:
                rows.append(q[h * width + head_dim : (h + 1) * width])
        rows.append(k[g * head_dim : (g + 1) * head_dim])
        rows.append(v[g * head_dim : (g + 1) * head_dim])
    return torch.cat(rows)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("groups,heads_per_group,trailing", [(2, 3, (5,)), (1, 4, ()), (4, 1, (7,))])
def test_qkv_layout_matches_reference_and_inverts(gated, groups, heads_per_group, trailing):
    head_dim = 4
    heads = groups * heads_per_group
    q = torch.randn(heads * head_dim * (2 if gated else 1), *trailing)
    k = torch.randn(groups * head_dim, *trailing)
    v = torch.randn(groups * head_dim, *trailing)
    fused = layouts.qkv_to_megatron(q, k, v, head_dim=head_dim, gated=gated)
    expected = _loop_qkv(q, k, v, head_dim=head_dim, heads_per_group=heads_per_group, gated=gated)
    assert torch.equal(fused, expected)
    back = layouts.qkv_to_hf(fused, head_dim=head_dim, heads_per_group=heads_per_group, gated=gated)
    for got, want in zip(back, (q, k, v)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("num_key_heads,value_per_key", [(2, 2), (3, 1), (1, 4)])
def test_gdn_in_proj_layout_matches_reference_and_inverts(num_key_heads, value_per_key):
    kd, vd, hidden = 3, 2, 5
    per_key = 2 * kd + 2 * value_per_key * vd
    qkvz = torch.randn(num_key_heads * per_key, hidden)
    ba = torch.randn(num_key_heads * 2 * value_per_key, hidden)
    fused = layouts.gdn_in_proj_to_megatron(qkvz, ba, key_head_dim=kd, value_head_dim=vd, value_per_key=value_per_key)
    # Slow reference: per part, per key head, pick that head's rows out of its group.
    offsets = {"q": (0, kd), "k": (kd, kd), "v": (2 * kd, value_per_key * vd), "z": (2 * kd + value_per_key * vd, value_per_key * vd)}
    rows = []
    for part in "qkvz":
        start, size = offsets[part]
        for h in range(num_key_heads):
            rows.append(qkvz[h * per_key + start : h * per_key + start + size])
    for part in range(2):
        for h in range(num_key_heads):
            base = h * 2 * value_per_key + part * value_per_key
            rows.append(ba[base : base + value_per_key])
    assert torch.equal(fused, torch.cat(rows))
    back_qkvz, back_ba = layouts.gdn_in_proj_to_hf(fused, key_head_dim=kd, value_head_dim=vd, value_per_key=value_per_key)
    assert torch.equal(back_qkvz, qkvz) and torch.equal(back_ba, ba)


def test_gate_up_layout():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = layouts.gate_up_to_megatron(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    back = layouts.gate_up_to_hf(fc1)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


@pytest.mark.parametrize("name", ["qwen3_next_a", "qwen3_moe", "qwen3"])
def test_state_dict_round_trip(tmp_path, name):
    model_dir = make_tiny_checkpoint(name, tmp_path / name)
    spec = read_hf_config(model_dir)
    hf = {}
    for path in model_dir.glob("*.safetensors"):
        hf.update(load_file(path))
    padded = padded_vocab_size(spec.vocab_size, tp=4)
    megatron = hf_to_megatron(hf, spec, padded_vocab_size=padded)
    assert megatron["embedding.word_embeddings.weight"].shape[0] == padded
    assert torch.count_nonzero(megatron["embedding.word_embeddings.weight"][spec.vocab_size :]) == 0
    back = megatron_to_hf(megatron, spec)
    assert set(back) == set(hf)
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key


def test_vocab_rows_cover_the_vocab_once():
    vocab, tp = 251, 4
    padded = padded_vocab_size(vocab, tp=tp)
    assert padded % tp == 0 and 0 <= padded - vocab < tp
    covered = []
    for rank in range(tp):
        start, stop, pad = vocab_rows(vocab_size=vocab, padded_vocab_size=padded, rank=rank, world=tp)
        assert stop - start + pad == padded // tp
        covered += list(range(start, stop))
    assert covered == list(range(vocab))


def _raw(name):
    cfg = dict(TINY_CONFIGS[name])
    return cfg


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="model_type 'llama' is not supported.*qwen3_next"):
        parse_hf_config({"model_type": "llama"})


def test_rope_scaling_is_refused():
    cfg = _raw("qwen3")
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        parse_hf_config(cfg)


def test_invalid_json_names_file_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n "model_type": "qwen3",\n oops\n}')
    with pytest.raises(ValueError, match=r"config.json: line 3"):
        read_hf_config(tmp_path)


def test_qwen3_next_fields_and_layer_pattern():
    cfg = _raw("qwen3_next_a")
    cfg.pop("rope_parameters")
    # Older hub configs: top-level rope keys, interval instead of layer_types.
    cfg.update(rope_theta=5e6, partial_rotary_factor=0.25, full_attention_interval=4, num_hidden_layers=8)
    spec = parse_hf_config(cfg)
    assert spec.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + ("full_attention",)
    assert spec.rope_theta == 5e6 and spec.rotary_percent == 0.25 and spec.head_dim == 32
    assert spec.zero_centered_norm and spec.attention_output_gate and spec.shared_expert_ffn_hidden_size == 48
    assert spec.truncated(2).layer_types == ("linear_attention", "linear_attention")


def test_moe_fields_accept_transformers_alias_and_dense_layers():
    cfg = _raw("qwen3_moe")
    cfg["num_local_experts"] = cfg.pop("num_experts")
    cfg["decoder_sparse_step"] = 1
    spec = parse_hf_config(cfg)
    assert spec.num_experts == 8 and spec.moe_layers == (True, False, True)
    assert not spec.zero_centered_norm and not spec.attention_output_gate


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_transformer_config_mapping(norm_topk_prob):
    cfg = _raw("qwen3_next_b")
    cfg["norm_topk_prob"] = norm_topk_prob
    spec = parse_hf_config(cfg)
    tc = to_transformer_config(spec, tp=2, ep=2, sequence_parallel=True)
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert tc.moe_router_pre_softmax is (not norm_topk_prob)
    assert tc.kv_channels == 8 and tc.num_query_groups == 2 and tc.layernorm_zero_centered_gamma
    assert tc.moe_layer_freq == [1, 0, 1] and tc.moe_shared_expert_gate
    assert tc.layernorm_epsilon == 1e-5 and tc.sequence_parallel


def test_layout_that_does_not_divide_names_the_key():
    spec = parse_hf_config(_raw("qwen3_next_b"))
    with pytest.raises(ConfigError, match=r"`expert_model_parallel_size`=4 does not divide the 6 experts of "
                                          r"qwen3_next \(num_experts\)"):
        to_transformer_config(spec, ep=4)
    with pytest.raises(ConfigError, match=r"`tensor_model_parallel_size`=4 does not divide the 6 attention heads "
                                          r"of qwen3_next \(num_attention_heads\)"):
        to_transformer_config(spec, tp=4)


def test_saved_config_is_what_we_parse(tmp_path):
    model_dir = make_tiny_checkpoint("qwen3_next_b", tmp_path / "b")
    raw = json.loads((model_dir / "config.json").read_text())
    spec = read_hf_config(model_dir)
    assert spec.moe_layers == (True, False, True)
    assert spec.layer_types == tuple(raw["layer_types"])
    assert spec.tie_word_embeddings


@pytest.mark.parametrize("name,world", [("qwen3_next_a", 2), ("qwen3_next_b", 2), ("qwen3_moe", 2), ("qwen3", 2)])
def test_shards_read_from_disk_reassemble_to_the_checkpoint(tmp_path, name, world):
    """Each rank's shard (as the loader reads it) turned back into HF pieces and joined
    over the ranks gives the checkpoint's tensors: the inverse export relies on."""
    from megalora.train.model.loader import CheckpointReader, read_rule_shard
    from megalora.train.model.mapping import hf_from_shards, rules_for

    model_dir = make_tiny_checkpoint(name, tmp_path / name, max_shard_size="30KB")
    spec = read_hf_config(model_dir)
    hf = {}
    for path in model_dir.glob("*.safetensors"):
        hf.update(load_file(path))
    padded = padded_vocab_size(spec.vocab_size, tp=world)
    seen = set()
    with CheckpointReader(model_dir) as reader:
        for rule in rules_for(spec):
            group_world = world if rule.group == "tp" else 1
            shards = [
                read_rule_shard(reader, rule, rank=r, world=group_world, spec=spec, padded_vocab_size=padded)
                for r in range(group_world)
            ]
            if group_world > 1 and rule.sources[0].dim is not None:
                assert len({tuple(s.shape) for s in shards}) == 1, rule.megatron
            for key, tensor in hf_from_shards(rule, shards, spec).items():
                assert torch.equal(tensor, hf[key]), (rule.megatron, key)
                seen.add(key)
    assert seen == set(hf)


def test_attention_bias_is_refused():
    cfg = _raw("qwen3")
    cfg["attention_bias"] = True
    with pytest.raises(ValueError, match="attention_bias=true is not supported"):
        parse_hf_config(cfg)


def test_aux_loss_coefficient_turns_balancing_on():
    spec = parse_hf_config(_raw("qwen3_moe"))
    assert to_transformer_config(spec).moe_router_load_balancing_type == "none"
    tc = to_transformer_config(spec, moe_aux_loss_coeff=0.01)
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.moe_aux_loss_coeff == 0.01
