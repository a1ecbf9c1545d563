"""`megalora plan`: parameter, LoRA, memory and FLOP arithmetic against independent counts.

Oracles: transformers' own models (parameter counts, forward/backward GEMM FLOPs counted by
torch's FlopCounterMode), peft applied to them (LoRA counts in peft's per-projection form),
megalora's `apply_lora` on the megatron model (LoRA counts in the fused form), hand-derived
byte counts for Qwen3-Coder-Next, and the peak RSS of a real CPU LoRA training step.

The memory measurement runs transformers + peft, not the megatron trainer (not ready yet): the
same shapes and the same LoRA targets, fp32 on CPU. What is comparable: frozen weights, LoRA
weights, gradients and AdamW states are the same tensors; activations differ in detail (peft's
wrapper for the fused experts, transformers' grouped experts and loss, and for Qwen3-Next the
reference torch gated-delta-rule that transformers runs without the GPU kernel), so the planner is
held to a stated factor per model, both on the total and on the per-token slope (activations alone).
Peak RSS is read as the Linux high-water mark VmHWM, restarted before each step, with glibc's
mmap threshold fixed so freed tensor buffers leave the RSS at once.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megalora.config import LoraSection, load_config
from megalora.train.plan import (GIB, active_gemm_params, lora_adapters, lora_numel, memory_plan, model_spec,
                                 num_params, plan_main, step_flops)

# Qwen3-Coder-Next's config.json (the fields that shape the model), written out here: no downloads.
from megalora.known_models import QWEN3_CODER_NEXT as CODER_NEXT  # noqa: E402  (the published shape)

# Tiny shapes that exercise every branch: gated attention and GDN layers, a dense layer inside a
# MoE model (mlp_only_layers), shared expert, head_dim != hidden/heads, tied embeddings.
TINY_NEXT = dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, full_attention_interval=2, linear_conv_kernel_dim=4,
                 linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                 mlp_only_layers=[1])
TINY_MOE = dict(vocab_size=203, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                mlp_only_layers=[2], norm_topk_prob=True)
TINY_DENSE = dict(vocab_size=199, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
PEFT_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


_CLASSES = {"qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", TINY_NEXT),
            "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", TINY_MOE),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", TINY_DENSE)}


def hf_config_of(kind: str, **overrides):
    """transformers' config object for a tiny model of `kind` (its `to_dict()` is the config.json)."""
    import transformers

    config_cls, _, shape = _CLASSES[kind]
    return getattr(transformers, config_cls)(**{**shape, **overrides})


def hf_model(kind: str, **overrides):
    """A tiny transformers model of `kind` and its config.json dict."""
    import transformers

    config = hf_config_of(kind, **overrides)
    torch.manual_seed(0)
    return getattr(transformers, _CLASSES[kind][1])(config), config.to_dict()


def cfg_from(flags: str):
    cfg, _ = load_config(argv=flags.split())
    return cfg


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_moe", "qwen3"])
def test_total_parameters_equal_transformers(kind: str) -> None:
    model, hf_config = hf_model(kind)
    assert num_params(model_spec(hf_config)) == sum(p.numel() for p in model.parameters())


def peft_lora_count(model: torch.nn.Module, *, rank: int) -> int:
    """LoRA elements peft puts on all linear layers and every routed expert of a tiny model.

    peft 0.21 reads `gate_proj`/`up_proj`/`down_proj` on this model family as the v4 names of the
    fused experts (it retargets them to `mlp.experts.*` and doubles r on `gate_up_proj`), so the
    dense and shared-expert MLPs are adapted by peft on their own, outside the transformers model."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    attention = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=attention, target_parameters=PEFT_EXPERTS))
    mlps = [m for name, m in peft_model.named_modules() if name.endswith((".mlp", ".shared_expert"))]
    for mlp in mlps:
        if hasattr(mlp, "gate_proj"):  # a dense SwiGLU MLP, not the MoE block
            holder = torch.nn.ModuleDict({"mlp": mlp})  # no `config`: peft applies the names as written
            inject_adapter_in_model(LoraConfig(r=rank, target_modules=["gate_proj", "up_proj", "down_proj"]), holder)
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("kind", ["qwen3_next", "qwen3_moe"])
def test_lora_parameters_equal_peft(kind: str) -> None:
    """Per-projection LoRA (peft's form) on all linear layers and every routed expert."""
    model, hf_config = hf_model(kind)
    expected = peft_lora_count(model, rank=4)
    lora = LoraSection(lora_rank=4)
    adapters = lora_adapters(model_spec(hf_config), lora=lora, padded_vocab=hf_config["vocab_size"],
                             per_projection=True)
    assert lora_numel(adapters, rank=4) == expected


def test_on_request_and_excluded_targets_equal_peft() -> None:
    """Router, shared-expert gate and LM head on request; attention of layer 1 excluded by name."""
    from peft import LoraConfig, get_peft_model

    model, hf_config = hf_model("qwen3_next")
    peft_model = get_peft_model(model, LoraConfig(
        r=2, target_modules=["gate", "shared_expert_gate", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj"],
        exclude_modules=r".*\.layers\.1\..*"))
    expected = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    lora = LoraSection(lora_rank=2, exclude_modules=["layers.1."],
                       target_modules=["router", "shared_expert_gate", "output_layer", "linear_qkv", "linear_proj"])
    adapters = lora_adapters(model_spec(hf_config), lora=lora, padded_vocab=hf_config["vocab_size"],
                             per_projection=True)
    assert lora_numel(adapters, rank=2) == expected


def test_fused_lora_parameters_equal_megalora_apply(tmp_path) -> None:
    """The fused form (one adapter on q|k|v, gate|up, GDN qkvz|ba) against megalora's own apply_lora."""
    from megalora.train.lora.apply import apply_lora
    from megalora.train.model.build import build_model

    from megatron.core import parallel_state

    from megalora.parallel import groups

    hf_config = hf_config_of("qwen3_next").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    owns_state = not parallel_state.model_parallel_is_initialized()
    try:
        model, info = build_model(tmp_path, load_weights=False)
        lora = LoraSection(lora_rank=4)
        report = apply_lora(model, lora, verbose=False)
    finally:
        if owns_state:
            groups.destroy()
    adapters = lora_adapters(model_spec(hf_config), lora=lora, padded_vocab=info.padded_vocab_size)
    assert lora_numel(adapters, rank=4) == report.total_trainable
    assert num_params(model_spec(hf_config)) == report.total_params - report.total_trainable


def test_coder_next_on_8_gpus_with_ep4() -> None:
    """The shipped 8-GPU recipe: per-GPU frozen bytes and LoRA elements derived by hand."""
    cfg, _ = load_config(Path(__file__).resolve().parents[1] / "configs" / "qwen3_coder_next_lora.yaml")
    memory = memory_plan(cfg, hf_config=CODER_NEXT, num_gpus=8)
    parts = memory["components"]
    layers, experts, hidden, width, vocab, r = 48, 512, 2048, 512, 151936, cfg.lora.lora_rank
    assert parts["frozen routed_experts"] == layers * (experts // 4) * 3 * hidden * width * 2
    assert parts["frozen embedding"] == parts["frozen output_layer"] == vocab * hidden * 2
    # 12 full-attention layers: q|gate (16 x 256 x 2), k, v (2 x 256 each), o (16 x 256 -> 2048)
    assert parts["frozen attention"] == 12 * hidden * (16 * 256 * 2 + 2 * 2 * 256 + 16 * 256) * 2
    # expert adapters: fc1 A [r, 2048], B [1024, r]; fc2 A [r, 512], B [2048, r]; 128 experts here
    expert_lora = layers * (experts // 4) * r * ((hidden + 2 * width) + (width + hidden))
    gdn = 36 * r * ((hidden + 2 * 16 * 128 + 2 * 32 * 128 + 2 * 32) + (32 * 128 + hidden))
    attn = 12 * r * ((hidden + 16 * 256 * 2 + 2 * 2 * 256) + (16 * 256 + hidden))
    shared = layers * r * ((hidden + 2 * width) + (width + hidden))
    assert memory["lora_params_per_gpu"] == expert_lora + gdn + attn + shared
    assert parts["LoRA weights"] == memory["lora_params_per_gpu"] * 4  # lora_dtype float32
    assert parts["AdamW states"] == memory["lora_params_per_gpu"] * 8
    # full recompute, one layer per chunk: 48 chunk inputs + the final norm's input [4096 tokens, 2048]
    # in bf16, plus one layer re-created during its backward (the working-set row)
    tokens = cfg.train.micro_batch_size * cfg.data.max_length
    assert parts["activations"] == (layers + 1) * tokens * hidden * 2 + parts["backward working set"]
    # no recompute: every layer kept, each at most the largest one (the working-set row)
    none = memory_plan(cfg_from("--expert_model_parallel_size 4 --max_length 2048 --micro_batch_size 2 "
                                "--global_batch_size 16"), hf_config=CODER_NEXT, num_gpus=8)["components"]
    final, largest = tokens * hidden * 2, none["backward working set"]
    assert largest == parts["backward working set"]
    assert 2 * largest + final <= none["activations"] <= layers * largest + final
    text = plan_main(cfg, num_gpus=8, hf_config=CODER_NEXT)
    total = memory["total"] / GIB
    for gb in (80, 141):
        verdict = "fits" if total <= gb else "does not fit"
        assert re.search(rf"^{gb} GB GPU: {verdict}\b", text, re.M), text


def test_one_gpu_does_not_fit_and_tp_splits() -> None:
    """On one GPU the routed experts alone (144 GiB bf16) exceed 141 GB; TP=2 halves attention."""
    cfg = cfg_from("--max_length 2048 --global_batch_size 8")
    assert 48 * 512 * 3 * 2048 * 512 * 2 > 141 * GIB
    text = plan_main(cfg, num_gpus=1, hf_config=CODER_NEXT)
    assert re.search(r"^80 GB GPU: does not fit", text, re.M) and re.search(r"^141 GB GPU: does not fit", text, re.M)
    one = memory_plan(cfg, hf_config=CODER_NEXT, num_gpus=2)["components"]
    two = memory_plan(cfg_from("--max_length 2048 --global_batch_size 8 --tensor_model_parallel_size 2"),
                      hf_config=CODER_NEXT, num_gpus=2)["components"]
    assert two["frozen attention"] * 2 == one["frozen attention"]
    assert two["frozen routed_experts"] == one["frozen routed_experts"]  # EP=1: every expert on each GPU


def test_layout_errors_name_the_key() -> None:
    cfg = cfg_from("--expert_model_parallel_size 3")
    with pytest.raises(ValueError, match="expert_model_parallel_size"):
        memory_plan(cfg, hf_config=CODER_NEXT, num_gpus=3)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3"])
def test_frozen_gemm_flops_equal_counted(kind: str) -> None:
    """Forward GEMMs = 2 x P_active per token; with frozen weights backward adds the input grads only
    (2 x P_active), counted by torch on the transformers model (matmul ops; attention is sdpa, and the
    experts run as transformers' per-expert loop, whose matmuls the counter sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, hf_config = hf_model(kind, attn_implementation="sdpa", experts_implementation="eager")
    model.requires_grad_(False)
    tokens = torch.randint(0, hf_config["vocab_size"], (2, 16))
    embeds = model.get_input_embeddings()(tokens).requires_grad_(True)  # every layer needs its input grad
    matmuls = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(inputs_embeds=embeds).logits
    forward = sum(v for op, v in counter.get_flop_counts()["Global"].items() if op in matmuls)
    with counter:  # entering again restarts the count: backward alone
        logits.float().square().mean().backward()
    backward = sum(v for op, v in counter.get_flop_counts()["Global"].items() if op in matmuls)
    p_active = active_gemm_params(model_spec(hf_config), vocab=hf_config["vocab_size"])
    assert forward == 2 * p_active * tokens.numel()
    assert backward == 2 * p_active * tokens.numel()


def test_lora_step_flops_equal_counted() -> None:
    """Frozen GEMMs (4 x P_active) plus LoRA (6 r (in + out)) per token, against torch's count of a
    forward + backward of dense Qwen3 with peft LoRA on every linear layer (per-projection form)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    model, hf_config = hf_model("qwen3", attn_implementation="sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    batch, seq = 2, 16
    tokens = torch.randint(0, hf_config["vocab_size"], (batch, seq))
    embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    counter = FlopCounterMode(display=False)
    with counter:
        model(inputs_embeds=embeds).logits.float().square().mean().backward()
    matmuls = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm}
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if op in matmuls)
    cfg = cfg_from(f"--lora_rank 4 --max_length {seq} --micro_batch_size {batch} --global_batch_size {batch}")
    spec = model_spec(hf_config)
    adapters = lora_adapters(spec, lora=cfg.lora, padded_vocab=hf_config["vocab_size"], per_projection=True)
    flops = step_flops(spec, adapters=adapters, cfg=cfg, num_gpus=1, padded_vocab=hf_config["vocab_size"])
    per_token = flops["per_token"]
    assert flops["tokens_per_step"] == batch * seq
    assert counted == (per_token["frozen GEMMs (fwd + input grad)"] + per_token["LoRA (fwd + bwd)"]) * batch * seq


_MEASURE = textwrap.dedent('''
    import gc, json, sys
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    def status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    def reset_peak():  # Linux: restart the high-water mark VmHWM at the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def build(shape):
        config = getattr(transformers, args["config_class"])(**shape)
        model = get_peft_model(getattr(transformers, args["model_class"])(config), LoraConfig(
            r=args["rank"], target_modules=args["targets"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        model.train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(model, opt, vocab, batch, seq):
        ids = torch.randint(0, vocab, (batch, seq))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    # One step on a throwaway model first, so lazily loaded kernels and libraries are not measured.
    warm = dict(args["hf"], hidden_size=32, intermediate_size=32, moe_intermediate_size=16)
    m, o = build(warm)
    step(m, o, warm["vocab_size"], 1, 16)
    del m, o
    gc.collect()
    base = status_kib("VmRSS")
    model, opt = build(args["hf"])
    step(model, opt, args["hf"]["vocab_size"], 1, 16)  # creates the AdamW states, as in any later step
    peaks = []
    for seq in args["seqs"]:
        reset_peak()
        step(model, opt, args["hf"]["vocab_size"], args["batch"], seq)
        peaks.append((status_kib("VmHWM") - base) * 1024)
    print(json.dumps(peaks))
''')



def _measure_env() -> dict[str, str]:
    """glibc malloc with a fixed mmap threshold: every tensor buffer over 64 KiB is mapped on
    allocation and unmapped on free, so the RSS high-water mark follows peak live tensor bytes
    rather than heap arenas that grow with thread timing (without it, runs differed by ~20 MiB)."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}


# (shape, peft target modules besides the fused experts, planner targets, sequence lengths, stated factor).
# Qwen3-Next gets a wider factor: on CPU transformers runs its reference torch gated-delta-rule,
# which keeps per-chunk intermediates that the GPU kernel the planner models recomputes.
_MEASURED_CASES = {
    "qwen3_moe": (dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=256, norm_topk_prob=True, max_position_embeddings=4096),
                  ["q_proj", "k_proj", "v_proj", "o_proj"], "linear_qkv linear_proj linear_fc1 linear_fc2",
                  [1024, 2048], 1.25),
    "qwen3_next": (dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=256, shared_expert_intermediate_size=0, full_attention_interval=2,
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                        linear_value_head_dim=32, linear_conv_kernel_dim=4, norm_topk_prob=True,
                        max_position_embeddings=4096),
                   ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj"],
                   "linear_qkv linear_proj in_proj out_proj linear_fc1 linear_fc2", [512, 1024], 1.5),
}


@pytest.mark.parametrize("kind", sorted(_MEASURED_CASES))
def test_cpu_memory_prediction_matches_measured_peak(kind: str) -> None:
    """fp32 LoRA step of transformers + peft on CPU: peak RSS growth vs the planner's CPU mode.

    Within the case's factor either way on the total and on the per-token slope (the activation
    part alone). Measured on transformers + peft of the same shape, not the megatron trainer (see
    the module docstring). The shared expert is left out (size 0): peft's conversion for this
    family would not adapt it (see `peft_lora_count`)."""
    shape, peft_targets, plan_targets, seqs, factor = _MEASURED_CASES[kind]
    config_class, model_class, _ = _CLASSES[kind]
    batch, rank = 1, 8
    args = {"hf": shape, "seqs": seqs, "batch": batch, "rank": rank, "config_class": config_class,
            "model_class": model_class, "targets": peft_targets}
    out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(args)],
                         capture_output=True, text=True, timeout=240, env=_measure_env())
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    import transformers

    hf_config = getattr(transformers, config_class)(**shape).to_dict()  # the shape alone, no tiny defaults
    predicted = []
    for seq in seqs:
        cfg = cfg_from(f"--torch_dtype float32 --lora_dtype float32 --lora_rank {rank} "
                       f"--target_modules {plan_targets} --max_length {seq} "
                       f"--micro_batch_size {batch} --global_batch_size {batch}")
        predicted.append(memory_plan(cfg, hf_config=hf_config, num_gpus=1, device="cpu",
                                     per_projection=True)["total"])
    for got, want in zip(measured, predicted):
        assert want / factor <= got <= want * factor, (measured, predicted)
    got_slope = (measured[1] - measured[0]) / (seqs[1] - seqs[0])
    want_slope = (predicted[1] - predicted[0]) / (seqs[1] - seqs[0])
    assert want_slope / factor <= got_slope <= want_slope * factor, (got_slope, want_slope)
