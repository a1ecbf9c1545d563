"""apply_lora on a tiny megatron MoE GPTModel: target selection, merge parity, full recompute."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from megalora.config import LoraSection
from megalora.parallel import groups
from megalora.train.lora.apply import apply_lora
from megalora.train.lora.experts import LoraExperts
from megalora.train.lora.layers import LoraLinear
from megalora.train.model.attention import SDPACoreAttention
from megalora.train.model.hf_config import parse_hf_config
from megalora.train.model.spec import block_spec
from megalora.train.model.tiny import TINY_CONFIGS
from megalora.train.norm import RMSNorm

VOCAB, SEQ, BATCH, EXPERTS = 64, 8, 2, 4


def build_model(*, tp: int = 1, ep: int = 1, sp: bool = False, recompute: bool = False,
                shared_gate: bool = True) -> Any:
    """Tiny MoE GPT: 2 layers, 4 experts top-2, gated shared expert, RMSNorm, rope; fp32. Our
    layer spec (`block_spec`, with megatron's loop experts) on a megatron config made by hand."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    extra = ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
             if recompute else {})
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=64, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        use_cpu_initialization=True, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1, sequence_parallel=sp, num_moe_experts=EXPERTS, moe_router_topk=2,
        moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=shared_gate,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        **extra,
    )
    # Only the layer pattern of the HF spec matters to block_spec: every layer attention + MoE.
    layers = parse_hf_config({**TINY_CONFIGS["qwen3_moe"], "num_hidden_layers": 2, "mlp_only_layers": [],
                              "num_experts": EXPERTS})
    spec = block_spec(layers, norm=RMSNorm, core_attention=SDPACoreAttention, experts="sequential")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type="rope", share_embeddings_and_output_weights=False)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, position_ids, None)


def randomize_lora_b(model: torch.nn.Module, *, seed: int = 3) -> None:
    """Non-zero B everywhere (B starts at zero, which would make every check trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture(autouse=True, scope="module")
def _one_process_groups():
    groups.initialize(tp=1, seed=5)
    yield
    groups.destroy()


def test_all_linear_targets_and_report() -> None:
    torch.manual_seed(0)
    model = build_model()
    report = apply_lora(model, LoraSection(lora_rank=4), verbose=False)
    kinds = {}
    for name, kind in report.wrapped.items():
        kinds.setdefault(kind, []).append(name)
    assert sorted(kinds) == ["linear_proj", "linear_qkv", "routed_experts", "shared_expert.linear_fc1",
                             "shared_expert.linear_fc2"]
    assert all(len(v) == 2 for v in kinds.values())  # one per layer
    assert isinstance(model.decoder.layers[0].mlp.experts, LoraExperts)
    assert isinstance(model.decoder.layers[1].self_attention.linear_qkv, LoraLinear)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or "lora_fc" in n for n in trainable)
    assert sum(trainable.values()) == report.total_trainable == sum(report.trainable.values())
    # per layer, rank 4: qkv 4*32 + 64*4 (q 32 + k,v 2*2*8); proj 4*32 + 32*4; experts 4x(fc1 + fc2)
    per_layer = (4 * 32 + 64 * 4) + (4 * 32 + 32 * 4) + 4 * ((4 * 32 + 32 * 4) + (4 * 16 + 32 * 4)) \
        + (4 * 32 + 32 * 4) + (4 * 16 + 32 * 4)
    assert report.total_trainable == 2 * per_layer
    # frozen base per kind: qkv [64, 32]; experts fc1 [2*16, 32] + fc2 [32, 16], 4 per layer
    assert report.frozen["linear_qkv"] == 2 * 64 * 32
    assert report.frozen["routed_experts"] == 2 * EXPERTS * (32 * 32 + 32 * 16)
    frozen_total = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sum(report.frozen.values()) < frozen_total == report.total_params - report.total_trainable
    assert "routed_experts" in report.format()


def test_on_request_targets_regex_and_exclude() -> None:
    torch.manual_seed(0)
    model = build_model()
    cfg = LoraSection(target_modules=["router", "shared_expert_gate", "output_layer"],
                      target_regex=r"layers\.1\.self_attention\.linear_proj$", exclude_modules=["layers.0.mlp.router"])
    report = apply_lora(model, cfg, verbose=False)
    assert report.wrapped == {"decoder.layers.1.self_attention.linear_proj": "linear_proj",
                              "decoder.layers.0.mlp.shared_experts.gate_lora": "shared_expert_gate",
                              "decoder.layers.1.mlp.router.lora": "router",
                              "decoder.layers.1.mlp.shared_experts.gate_lora": "shared_expert_gate",
                              "output_layer": "output_layer"}
    only_fc2 = build_model()
    report = apply_lora(only_fc2, LoraSection(target_modules=["linear_fc2"]), verbose=False)
    experts = only_fc2.decoder.layers[0].mlp.experts
    assert experts.lora_fc1_A is None and experts.lora_fc2_A.shape == (EXPERTS, 8, 16)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(only_fc2, LoraSection(), verbose=False)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(build_model(), LoraSection(target_modules=["q_proj"]), verbose=False)
    with pytest.raises(ValueError, match="matched no module"):
        apply_lora(build_model(), LoraSection(target_modules=["in_proj"]), verbose=False)
    with pytest.raises(ValueError, match="target_regex"):
        apply_lora(build_model(), LoraSection(target_regex="("), verbose=False)


def _merge_into(base: torch.nn.Module, lora_model: torch.nn.Module) -> None:
    """Independent oracle: fold scale*B@A of every adapter into a copy of the base weights."""
    params = dict(lora_model.named_parameters())
    with torch.no_grad():
        for name, module in lora_model.named_modules():
            if isinstance(module, LoraLinear):
                target = base.get_submodule(name).weight
                target += module.scaling * module.lora_B @ module.lora_A
            elif isinstance(module, LoraExperts):
                for e, expert in enumerate(base.get_submodule(name).local_experts):
                    if module.lora_fc1_A is not None:
                        expert.linear_fc1.weight += module.scaling * module.lora_fc1_B[e] @ module.lora_fc1_A[e]
                    if module.lora_fc2_A is not None:
                        expert.linear_fc2.weight += module.scaling * module.lora_fc2_B[e] @ module.lora_fc2_A[e]
        for name, module in base.named_modules():
            for adapter, weight in ((f"{name}.lora", "weight"), (f"{name}.gate_lora", "gate_weight")):
                if f"{adapter}.lora_B" in params:
                    delta = params[f"{adapter}.lora_B"] @ params[f"{adapter}.lora_A"]
                    getattr(module, weight).add_(delta * lora_model.get_submodule(adapter).scaling)


@pytest.mark.parametrize("expert_impl", ["grouped", "loop"])
def test_lora_model_equals_merged_base(expert_impl: str) -> None:
    torch.manual_seed(0)
    model = build_model()
    base = build_model()
    base.load_state_dict(model.state_dict())
    tokens, _ = make_batch()
    with torch.no_grad():
        before = logits(model, tokens)
    cfg = LoraSection(lora_rank=4, lora_alpha=8.0,
                      target_modules=["all-linear", "router", "shared_expert_gate", "output_layer"])
    apply_lora(model, cfg, expert_impl=expert_impl, verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, tokens), before)  # B = 0: unchanged
    randomize_lora_b(model)
    _merge_into(base, model)
    with torch.no_grad():
        got, want = logits(model, tokens), logits(base, tokens)
    assert (got - before).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _lora_grads(model: torch.nn.Module, *, recompute: bool) -> dict[str, torch.Tensor]:
    model.config.recompute_granularity = "full" if recompute else None
    model.zero_grad(set_to_none=True)
    tokens, labels = make_batch()
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    model(tokens, position_ids, None, labels=labels).mean().backward()
    return {n: p.grad.clone() if p.grad is not None else None
            for n, p in model.named_parameters() if p.requires_grad}


def test_full_recompute_gives_the_same_nonzero_lora_grads() -> None:
    torch.manual_seed(0)
    model = build_model(recompute=True)
    # no output-layer adapter: the loss reaches the blocks' LoRA only through recomputation
    apply_lora(model, LoraSection(lora_rank=4), verbose=False)
    randomize_lora_b(model)
    plain = _lora_grads(model, recompute=False)
    recomputed = _lora_grads(model, recompute=True)
    assert plain.keys() == recomputed.keys() and len(plain) == 24
    for name, grad in plain.items():
        assert recomputed[name] is not None, name
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7)


def test_without_the_input_grad_hook_recompute_loses_lora_grads() -> None:
    """The trap is real: remove our block-input hook and the recomputed blocks get no grads."""
    torch.manual_seed(0)
    model = build_model(recompute=True)
    apply_lora(model, LoraSection(lora_rank=4, target_modules=["all-linear", "output_layer"]), verbose=False)
    randomize_lora_b(model)
    model.decoder._forward_pre_hooks.clear()
    grads = _lora_grads(model, recompute=True)
    assert grads["output_layer.lora_B"] is not None
    assert grads["decoder.layers.0.self_attention.linear_qkv.lora_A"] is None
