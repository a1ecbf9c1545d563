"""`megalora export --adapter --adapter_format vllm|sglang|peft`, single process, fp32, tiny Qwen3-Next and
Qwen3-MoE made by transformers, LoRA on every target kind (gated attention, GDN projections, shared expert,
shared-expert gate, router, routed experts, output layer).

Oracles: the documented layout derived from the base checkpoint's own tensors (every key and shape), our
megatron model's logits before export vs after re-importing each format (<= 1e-5 relative), and vLLM's
LoRA loading rules written here from its public source (key parsing, expected modules of its
Qwen3MoeForCausalLM / Qwen3NextForCausalLM classes, rank limits)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megalora.parallel import groups
from megalora.train.lora.adapter_formats import peft_readable, write_adapter
from megalora.train.lora.layout import lora_layout
from megalora.train.lora.peft_import import load_peft_adapter
from megalora.train.model.tiny import make_tiny_checkpoint
from megalora.train.model.verify import compare_logits, default_tokens, megatron_logits
from test_peft_format import ALPHA, RANK, TOL, build_lora_model, randomize

LORA_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj",
               "up_proj", "down_proj", "gate", "shared_expert_gate", "lm_head"}
# what each format cannot hold, per architecture: (regex on the HF module, the megatron LoRA B to zero)
UNSERVABLE = {
    ("qwen3_next", "vllm"): (r"^lm_head$", r"^output_layer\.lora_B$"),
    ("qwen3_next", "sglang"): (r"\.mlp\.gate$", r"\.mlp\.router\.lora\.lora_B$"),
    ("qwen3_moe", "sglang"): (r"\.mlp\.gate$", r"\.mlp\.router\.lora\.lora_B$"),
}
REFUSAL = {r"^lm_head$": r"LoRA on lm_head is not zero",
           r"\.mlp\.gate$": r"LoRA on model\.layers\.\d+\.mlp\.gate is not zero"}


def base_weights(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every base tensor (headers only)."""
    out = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})
    return out


def documented_layout(hf_dir: Path, fmt: str, *, rank: int, num_experts: int, drop: str | None) -> dict:
    """Key -> shape the format documents: an adapter on every 2D LoRA-able HF weight, A [r, in], B [out, r];
    peft keeps routed experts fused (gate_up_proj nested under down_proj)."""
    out: dict[str, tuple[int, ...]] = {}
    fused: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in base_weights(hf_dir).items():
        module = name.removesuffix(".weight")
        if len(shape) != 2 or module.rpartition(".")[2] not in LORA_LEAVES or (drop and re.search(drop, module)):
            continue
        expert = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)$", module)
        if fmt == "peft" and expert:
            fused.setdefault(expert.group(1), {})[expert.group(3)] = shape
            continue
        out[f"base_model.model.{module}.lora_A.weight"] = (rank, shape[1])
        out[f"base_model.model.{module}.lora_B.weight"] = (shape[0], rank)
    for container, shapes in fused.items():
        (f, h), e_r = shapes["gate_proj"], num_experts * rank
        out[f"base_model.model.{container}.base_layer.lora_A.weight"] = (e_r, h)
        out[f"base_model.model.{container}.base_layer.lora_B.weight"] = (2 * f, e_r)
        out[f"base_model.model.{container}.lora_A.weight"] = (e_r, f)
        out[f"base_model.model.{container}.lora_B.weight"] = (h, e_r)
    return out


def save_checkpoint(folder: Path, full: dict[str, torch.Tensor], hf_dir: Path, lora: dict) -> Path:
    folder.mkdir()
    save_file(full, str(folder / "adapter_model.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"base_model": str(hf_dir), "config": {"lora": lora}}))
    return folder


def model_logits(hf_dir: Path, full: dict[str, torch.Tensor], *, rslora: bool) -> torch.Tensor:
    model, info, _ = build_lora_model(hf_dir, use_rslora=rslora, seed=2)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in full.items():
            params[name].copy_(value)
    return megatron_logits(model, info, default_tokens(info.vocab_size, num_tokens=16))


def reimported_logits(hf_dir: Path, adapter: Path) -> torch.Tensor:
    """A fresh model at another scale (alpha 2) with the written adapter imported."""
    from megalora.train.model.hf_config import read_hf_config

    model, info, _ = build_lora_model(hf_dir, alpha=2.0, seed=9)
    load_peft_adapter(model, adapter, hf_spec=read_hf_config(hf_dir))
    return megatron_logits(model, info, default_tokens(info.vocab_size, num_tokens=16))


@pytest.fixture(scope="module", params=["qwen3_next_a", "qwen3_moe"])
def case(request, tmp_path_factory):
    groups.initialize(tp=1, ep=1)
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_checkpoint(request.param, root / "hf", seed=3)
    rslora = request.param == "qwen3_moe"  # folded into alpha by vllm / sglang
    model, info, _ = build_lora_model(hf_dir, use_rslora=rslora)
    layout = lora_layout(model)
    randomize({n: p for n, p in model.named_parameters() if n in layout}, seed=1)
    full = {n: p.detach().clone() for n, p in model.named_parameters() if n in layout}
    lora = {"lora_rank": RANK, "lora_alpha": ALPHA, "use_rslora": rslora, "lora_dropout": 0.0}
    yield {"root": root, "hf_dir": hf_dir, "spec": info.spec, "full": full, "lora": lora, "rslora": rslora,
           "checkpoint": save_checkpoint(root / "checkpoint-1", full, hf_dir, lora),
           "logits": megatron_logits(model, info, default_tokens(info.vocab_size, num_tokens=16))}
    groups.destroy()


@pytest.mark.parametrize("fmt", ["vllm", "sglang", "peft"])
def test_format_keys_shapes_and_round_trip(case, fmt, tmp_path) -> None:
    spec, lines = case["spec"], []
    ckpt, logits = case["checkpoint"], case["logits"]
    drop = UNSERVABLE.get((spec.model_type, fmt))
    if drop:
        # a non-zero adapter the format cannot hold is refused, naming it
        with pytest.raises(ValueError, match=REFUSAL[drop[0]]):
            write_adapter(ckpt, tmp_path / "refused", adapter_format=fmt, log=lines.append)
        # the same run with that adapter untrained (B = 0) is written without it, with one line
        full = {n: torch.zeros_like(v) if re.search(drop[1], n) else v for n, v in case["full"].items()}
        assert sum(not torch.equal(full[n], case["full"][n]) for n in full) >= 1
        ckpt = save_checkpoint(tmp_path / "checkpoint-zero", full, case["hf_dir"], case["lora"])
        logits = model_logits(case["hf_dir"], full, rslora=case["rslora"])
    out = write_adapter(ckpt, tmp_path / fmt, adapter_format=fmt, log=lines.append)
    assert any(f"wrote a {fmt}-format adapter" in line for line in lines)
    if drop:
        assert sum("drops the (all-zero) LoRA" in line for line in lines) >= 1
    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    expected = documented_layout(case["hf_dir"], fmt, rank=RANK, num_experts=spec.num_experts,
                                 drop=drop[0] if drop else None)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    if fmt == "peft":
        assert config["target_parameters"] and config["use_rslora"] == case["rslora"]
    else:
        assert config["target_parameters"] is None and not config["rank_pattern"] and not config["alpha_pattern"]
        assert config["r"] == RANK and not config["use_rslora"]
        scale = ALPHA / (RANK ** 0.5 if case["rslora"] else RANK)
        assert config["lora_alpha"] / config["r"] == pytest.approx(scale)
        leaves = {k[len("base_model.model."):].rsplit(".", 2)[0].rpartition(".")[2] for k in tensors}
        assert sorted(config["target_modules"]) == sorted(leaves)
    result = compare_logits(reimported_logits(case["hf_dir"], out), logits, tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()
    # `megalora verify --adapter`: megatron with the import vs peft on transformers
    from test_peft_format import with_adapter

    from megalora.train.model.verify import run_verify

    verified = run_verify(case["hf_dir"], adapter=out, seq_length=16, tolerance=TOL, build=with_adapter(out),
                          prepare_adapter=peft_readable)
    assert verified.ok, verified.summary_line()
    checks = {line.split(":")[1].strip(): line for line in lines if re.match(r"export: (vllm|sglang):", line)}
    if fmt == "vllm":
        assert checks["vllm"].endswith("ok, serve with --enable-lora --max-lora-rank 8")
    if fmt == "peft":
        assert "fused 3D parameters" in checks["vllm"]
    if spec.model_type == "qwen3_next":
        assert "SGLang serves no Qwen3-Next adapter" in checks["sglang"]
    elif fmt == "sglang":
        assert checks["sglang"].startswith("export: sglang: ok")
    else:
        assert "no router LoRA" in checks["sglang"]


def test_per_projection_adapters_export_at_rank_r(case, tmp_path) -> None:
    """An adapter per HF projection inside the fused layers (rank k*r, block-diagonal B) is written at
    rank r per projection in every format, exactly."""
    from megalora.train.lora.options import LoraOptions
    from megalora.train.lora.per_projection import split_fused_adapters

    hf_dir = case["hf_dir"]
    model, info, _ = build_lora_model(hf_dir)
    assert split_fused_adapters(model, hf_spec=info.spec, lora_options=LoraOptions(rank=RANK, alpha=ALPHA), seed=5)
    layout = lora_layout(model)
    params = {n: p for n, p in model.named_parameters() if n in layout}
    randomize(params, seed=3)
    with torch.no_grad():
        for p in params.values():
            if hasattr(p, "lora_block_mask"):
                p.mul_(p.lora_block_mask)
        if info.spec.model_type == "qwen3_next":
            params["output_layer.lora_B"].zero_()  # vLLM takes no lm_head LoRA there
    full = {n: p.detach().clone() for n, p in params.items()}
    qkv = next(n for n in full if n.endswith("linear_qkv.lora_A"))
    assert full[qkv].shape[0] == 3 * RANK
    logits = megatron_logits(model, info, default_tokens(info.vocab_size, num_tokens=16))
    lora = {"lora_rank": RANK, "lora_alpha": ALPHA, "use_rslora": False, "lora_dropout": 0.0}
    ckpt = save_checkpoint(tmp_path / "checkpoint-pp", full, hf_dir, lora)
    for fmt in ("vllm", "peft"):
        out = write_adapter(ckpt, tmp_path / fmt, adapter_format=fmt, log=lambda *_: None)
        tensors = load_file(str(out / "adapter_model.safetensors"))
        config = json.loads((out / "adapter_config.json").read_text())
        fused_experts = re.compile(r"\.experts(\.base_layer)?\.lora_A\.weight$")
        ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight") and not fused_experts.search(k)}
        assert ranks == {RANK}
        assert config["r"] == RANK and not config["rank_pattern"]
        result = compare_logits(reimported_logits(hf_dir, out), logits, tolerance=TOL)
        assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, (fmt, result.summary_line())


def test_wider_module_pads_every_module_to_one_rank(case, tmp_path) -> None:
    """A fused module of larger rank (as after importing an adapter of uneven ranks) makes the serving
    formats write every module at that rank (zero-padded, no patterns), with the same logits."""
    full = dict(case["full"])
    name = next(n for n in full if n.endswith("linear_qkv.lora_A"))
    full[name] = torch.cat([full[name], full[name]])
    full[name[:-1] + "B"] = torch.cat([full[name[:-1] + "B"]] * 2, dim=1) / 2  # same delta at twice the rank
    full["output_layer.lora_B"] = torch.zeros_like(full["output_layer.lora_B"])
    ckpt = save_checkpoint(tmp_path / "checkpoint", full, case["hf_dir"], case["lora"])
    out = write_adapter(ckpt, tmp_path / "vllm", adapter_format="vllm", log=lambda *_: None)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK and not config["rank_pattern"]
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")} == {2 * RANK}
    result = compare_logits(reimported_logits(case["hf_dir"], out),
                            model_logits(case["hf_dir"], {**full, name: case["full"][name],
                                                          name[:-1] + "B": case["full"][name[:-1] + "B"]},
                                         rslora=case["rslora"]), tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()


# ---------------------------------------------------------------------------------------------
# vLLM's LoRA loading rules (vllm/lora/utils.py, lora_model.py, worker_manager.py, config/lora.py and
# the Qwen3MoeForCausalLM / Qwen3NextForCausalLM classes), restated here, not imported.
# ---------------------------------------------------------------------------------------------

VLLM_MAX_LORA_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}
# per vLLM model class: leaf names of its linear layers and FusedMoE ("experts"), its
# packed_modules_mapping and its embedding_modules
VLLM_MODELS = {
    "qwen3_next": {
        "leaves": {"qkv_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate", "shared_expert_gate",
                   "gate_up_proj", "down_proj", "experts"},
        "packed": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
                   "in_proj_qkvz": ["in_proj_qkvz"], "in_proj_ba": ["in_proj_ba"]},
        "embedding": set(),
    },
    "qwen3_moe": {
        "leaves": {"qkv_proj", "o_proj", "gate", "gate_up_proj", "down_proj", "experts"},
        "packed": {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]},
        "embedding": {"embed_tokens", "lm_head"},
    },
}


def vllm_parse_name(name: str) -> tuple[str, bool]:
    """(module name, is lora_A) as vLLM's parse_fine_tuned_lora_name gives them; ValueError otherwise."""
    start = 2 if name.startswith("base_model.model.") else 0
    parts = name.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2] == "lora_A"
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[start:-1]), parts[-1] == "lora_embedding_A"
    raise ValueError(f"{name} is unsupported LoRA weight")


def vllm_expected_modules(model_type: str, num_experts: int) -> set[str]:
    """Supported modules with packed ones replaced by their parts; 2D MoE LoRA unpacks `experts` into
    `experts.{e}.{gate,up,down}_proj` for every expert."""
    model = VLLM_MODELS[model_type]
    packed = dict(model["packed"])
    packed["experts"] = [f"experts.{e}.{p}" for e in range(num_experts) for p in ("gate_proj", "up_proj", "down_proj")]
    out: set[str] = set()
    for leaf in model["leaves"] | model["embedding"]:
        out.update(packed.get(leaf, [leaf]))
    return out


def vllm_load_errors(tensors: dict[str, torch.Tensor], config: dict, base: dict[str, tuple[int, ...]], *,
                     model_type: str, num_experts: int) -> list[str]:
    """What vLLM's loader rejects in an adapter (empty when it loads without extra switches)."""
    errors = []
    expected = vllm_expected_modules(model_type, num_experts)
    modules: dict[str, dict[bool, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, is_a = vllm_parse_name(key)
        if module.endswith(".experts") or ".experts.base_layer" in module:
            errors.append(f"{module}: fused 3D MoE weights need enable_mixed_moe_lora_format")
            continue
        if ".experts" in module:
            suffix = module[module.find(".experts") + 1:]
            if suffix not in expected:
                errors.append(f"unexpected {module}")
        elif module.rpartition(".")[2] not in expected:
            errors.append(f"unexpected {module}")
        modules.setdefault(module, {})[is_a] = value
    rank = int(config["r"])
    if rank > max(VLLM_MAX_LORA_RANKS):
        errors.append(f"rank {rank} above every max_lora_rank")
    for module, halves in modules.items():
        a, b = halves.get(True), halves.get(False)
        if a is None or b is None:
            errors.append(f"{module}: lacks lora_A or lora_B")
            continue
        out_dim, in_dim = base[f"{module}.weight"]
        if a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
            errors.append(f"{module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit rank {rank} on "
                          f"[{out_dim}, {in_dim}]")
    # 2D MoE LoRA stacks every expert's three projections per layer
    for layer in {m.split(".mlp.experts.")[0] for m in modules if ".mlp.experts." in m}:
        missing = [f"{e}.{p}" for e in range(num_experts) for p in ("gate_proj", "up_proj", "down_proj")
                   if f"{layer}.mlp.experts.{e}.{p}" not in modules]
        if missing:
            errors.append(f"{layer}: experts {missing[:3]} missing")
    for key in config.get("rank_pattern") or {}:
        if key.endswith(".weight"):
            errors.append(f"rank_pattern key {key} matches no module")
    return errors


def test_vllm_format_meets_vllm_loader_rules(case, tmp_path) -> None:
    spec = case["spec"]
    base = base_weights(case["hf_dir"])
    full = dict(case["full"])
    if spec.model_type == "qwen3_next":
        full["output_layer.lora_B"] = torch.zeros_like(full["output_layer.lora_B"])
    ckpt = save_checkpoint(tmp_path / "checkpoint", full, case["hf_dir"], case["lora"])

    def written(fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
        out = write_adapter(ckpt, tmp_path / fmt, adapter_format=fmt, log=lambda *_: None)
        return load_file(str(out / "adapter_model.safetensors")), json.loads((out / "adapter_config.json").read_text())

    tensors, config = written("vllm")
    assert vllm_load_errors(tensors, config, base, model_type=spec.model_type, num_experts=spec.num_experts) == []
    # the rules catch what vLLM rejects: peft's fused experts, and an lm_head adapter on Qwen3-Next
    peft_tensors, peft_config = written("peft")
    errors = vllm_load_errors(peft_tensors, peft_config, base, model_type=spec.model_type,
                              num_experts=spec.num_experts)
    assert any("fused 3D MoE weights" in e for e in errors)
    with_head = dict(tensors)
    with_head["base_model.model.lm_head.lora_A.weight"] = torch.zeros(RANK, spec.hidden_size)
    with_head["base_model.model.lm_head.lora_B.weight"] = torch.zeros(spec.vocab_size, RANK)
    errors = vllm_load_errors(with_head, config, base, model_type=spec.model_type, num_experts=spec.num_experts)
    # one entry per tensor, as vLLM lists them (`received ['lm_head', 'lm_head']`)
    assert errors == (["unexpected lm_head"] * 2 if spec.model_type == "qwen3_next" else [])
    key = next(k for k in tensors if ".experts.3.up_proj.lora_A" in k)
    missing = {k: v for k, v in tensors.items() if k != key}
    errors = vllm_load_errors(missing, config, base, model_type=spec.model_type, num_experts=spec.num_experts)
    assert any("lacks lora_A" in e for e in errors)
