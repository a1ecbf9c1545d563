"""PEFT-format adapters, single process, fp32, tiny Qwen3-Next and Qwen3-MoE made by transformers.

Oracles: peft itself (our export loaded by `PeftModel.from_pretrained` must give our megatron+LoRA
logits; an adapter peft made must give peft's logits once imported) and our own megatron model
(export -> import round trip)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megalora.config import LoraSection
from megalora.parallel import groups
from megalora.train.lora.apply import apply_lora
from megalora.train.lora.layout import lora_layout
from megalora.train.lora.options import LoraOptions
from megalora.train.lora.peft_format import megatron_to_peft, write_peft_adapter
from megalora.train.lora.peft_import import load_peft_adapter
from megalora.train.model.tiny import make_tiny_checkpoint
from megalora.train.model.verify import compare_logits, default_tokens, megatron_logits, transformers_logits

ALL = ["all-linear", "router", "shared_expert_gate", "output_layer"]
RANK, ALPHA = 4, 8.0
TOL = 1e-5


def build_lora_model(hf_dir: Path, *, rank: int = RANK, alpha: float = ALPHA, use_rslora: bool = False,
                     seed: int = 0):
    """Our megatron model with LoRA on every target (router, gates, output layer included), on
    the layout of the last `groups.initialize`."""
    from megalora.train.model.build import build_model

    model, info = build_model(hf_dir)
    section = LoraSection(lora_rank=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=ALL)
    report = apply_lora(model, section, seed=seed, expert_impl="loop", verbose=False)
    return model, info, report


def randomize(named: dict[str, torch.nn.Parameter], *, seed: int, scale: float = 0.15) -> None:
    """Non-zero A and B everywhere (B starts at zero, which would make every check trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(named):
            named[name].copy_(torch.randn(named[name].shape, generator=gen) * scale)


def peft_made_adapter(hf_dir: Path, out: Path, *, kind: str) -> torch.Tensor:
    """An adapter created by peft on the transformers model, random non-zero on every target it
    supports; saved to `out`. Returns peft's logits for `default_tokens`."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if kind == "converted":
        # peft's own names: it moves gate/up/down_proj and gate to the fused expert parameters
        # (gate_up_proj at rank 2r, alpha 2x) and the router; the shared expert gets nothing.
        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_rslora=True, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
            "gate_proj", "up_proj", "down_proj", "gate", "shared_expert_gate", "lm_head"])
    else:
        # every linear as a module or parameter target (peft would rename the MLP projections
        # given as target_modules), uneven ranks and alphas inside the fused q/k/v
        config = peft.LoraConfig(
            r=RANK, lora_alpha=16.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj",
                            "shared_expert_gate", "lm_head"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight",
                               "gate_proj.weight", "up_proj.weight", "down_proj.weight"],
            rank_pattern={"k_proj": 2, "in_proj_ba": 3}, alpha_pattern={"v_proj": 4.0})
    pm = peft.get_peft_model(model, config)
    randomize({n: p for n, p in pm.named_parameters() if "lora_" in n}, seed=7)
    pm.save_pretrained(out)
    pm.eval()
    with torch.no_grad():
        return pm(default_tokens(model.config.vocab_size, num_tokens=16)).logits.float()


def v4_expert_adapter(hf_dir: Path, out: Path) -> torch.Tensor:
    """An adapter in the per-expert form of transformers 4 (`mlp.experts.E.gate_proj.lora_A` ...),
    random on every routed expert; peft converts it to the fused form on load. Returns peft's logits."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = model.config
    sizes = {"gate_proj": (cfg.hidden_size, cfg.moe_intermediate_size),
             "up_proj": (cfg.hidden_size, cfg.moe_intermediate_size),
             "down_proj": (cfg.moe_intermediate_size, cfg.hidden_size)}
    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            for e in range(cfg.num_experts):
                for proj, (fan_in, fan_out) in sizes.items():
                    stem = f"base_model.model.{name}.{e}.{proj}"
                    tensors[f"{stem}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen) * 0.15
                    tensors[f"{stem}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.15
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": ["gate_proj", "up_proj", "down_proj"], "base_model_name_or_path": str(hf_dir)}))
    pm = peft.PeftModel.from_pretrained(model, str(out))
    pm.eval()
    with torch.no_grad():
        return pm(default_tokens(cfg.vocab_size, num_tokens=16)).logits.float()


@pytest.fixture(scope="module", params=["qwen3_next_a", "qwen3_moe", "qwen3"])
def case(request, tmp_path_factory):
    """Checkpoint, our LoRA model's logits, its exported adapter, a peft-made adapter + logits."""
    groups.initialize(tp=1, ep=1)
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_checkpoint(request.param, root / "hf", seed=3)
    model, info, report = build_lora_model(hf_dir, use_rslora=request.param == "qwen3_moe")
    layout = lora_layout(model)
    randomize({n: p for n, p in model.named_parameters() if n in layout}, seed=1)
    tokens = default_tokens(info.vocab_size, num_tokens=16)
    ckpt = root / "checkpoint-1"
    ckpt.mkdir()
    full = {n: p.detach().clone() for n, p in model.named_parameters() if n in layout}
    save_file(full, str(ckpt / "adapter_model.safetensors"))
    lora = {"lora_rank": RANK, "lora_alpha": ALPHA, "use_rslora": request.param == "qwen3_moe", "lora_dropout": 0.0}
    (ckpt / "meta.json").write_text(json.dumps({"base_model": str(hf_dir), "config": {"lora": lora}}))
    exported = write_peft_adapter(ckpt, root / "exported")
    peft_made = {kind: (root / kind, peft_made_adapter(hf_dir, root / kind, kind=kind))
                 for kind in ("converted", "explicit")}
    if request.param != "qwen3":
        peft_made["v4"] = (root / "v4", v4_expert_adapter(hf_dir, root / "v4"))
    yield {"hf_dir": hf_dir, "model": model, "info": info, "report": report, "full": full, "tokens": tokens,
           "logits": megatron_logits(model, info, tokens), "exported": exported, "lora": lora,
           "peft_made": peft_made, "checkpoint": ckpt}
    groups.destroy()


def test_export_loads_in_peft_with_our_logits(case) -> None:
    reference = transformers_logits(case["hf_dir"], case["tokens"], adapter=case["exported"])
    result = compare_logits(case["logits"], reference, tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()
    # the adapter really changes the model (a no-op adapter would pass the check above trivially)
    base = transformers_logits(case["hf_dir"], case["tokens"])
    assert compare_logits(base, reference, tolerance=TOL).rel_l2 > 1e-2
    config = json.loads((case["exported"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["base_model_name_or_path"] == str(case["hf_dir"])


def test_export_covers_every_peft_target_and_counts(case) -> None:
    """peft loads every exported tensor (none missing, none left initialised), and the trainable
    count peft reports equals ours plus what the per-projection form duplicates."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(case["hf_dir"], dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, str(case["exported"]), is_trainable=True)
    exported = load_file(str(case["exported"] / "adapter_model.safetensors"))
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(trainable) == len(exported)
    peft_count = sum(p.numel() for p in trainable.values())
    assert peft_count == sum(t.numel() for t in exported.values())
    # ours: one A per fused module (k HF projections share it) and B over the padded vocab
    model_params = dict(case["model"].named_parameters())
    spec, info = case["info"].spec, case["info"]
    duplicated = 0
    for name, p in model_params.items():
        if name.endswith(".linear_qkv.lora_A"):
            duplicated += 2 * p.numel()
        elif name.endswith((".in_proj.lora_A", ".linear_fc1.lora_A")):
            duplicated += p.numel()
    padding = (info.padded_vocab_size - spec.vocab_size) * RANK
    assert case["report"].total_trainable + duplicated - padding == peft_count
    from megalora.train.lora.peft_format import peft_equivalent_count

    assert peft_equivalent_count(case["model"], rank=RANK, vocab_size=spec.vocab_size,
                                 padded_vocab_size=info.padded_vocab_size) == peft_count


@pytest.mark.parametrize("kind", ["converted", "explicit", "v4"])
def test_peft_made_adapter_imports_with_peft_logits(case, kind, tmp_path) -> None:
    from megalora.train.model.hf_config import read_hf_config

    if kind not in case["peft_made"]:
        assert kind == "v4" and case["info"].spec.num_experts is None  # dense: no experts to adapt
        return
    peft_dir, peft_logits = case["peft_made"][kind]
    # a different megatron scale than peft's (alpha 2 vs 8 or 16): B absorbs the difference
    model, info, _ = build_lora_model(case["hf_dir"], alpha=2.0, seed=9)
    ranks = load_peft_adapter(model, peft_dir, hf_spec=read_hf_config(case["hf_dir"]))
    result = compare_logits(megatron_logits(model, info, case["tokens"]), peft_logits, tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()
    if kind == "v4":  # gate and up fused per expert: rank 2r
        assert {r for n, r in ranks.items() if n.endswith("lora_fc1_A")} == {2 * RANK}
    else:
        qkv = next(n for n in ranks if n.endswith("linear_qkv.lora_A"))
        assert ranks[qkv] == (3 * RANK if kind == "converted" else RANK + 2 + RANK)
    # peft's own rename leaves the shared expert without adapter: our B there is zeroed
    params = dict(model.named_parameters())
    shared_b = [n for n in params if ".shared_experts.linear_fc1.lora_B" in n]
    assert all((params[n].abs().sum() == 0) == (kind != "explicit") for n in shared_b)
    # a fresh rank-4 model takes the imported (wider) adapters as they are, as a resume would
    from megalora.train.lora.peft_import import load_megatron_lora

    fresh, _, _ = build_lora_model(case["hf_dir"], alpha=2.0, seed=4)
    layout = lora_layout(model)
    loaded = load_megatron_lora(fresh, {n: p.detach() for n, p in params.items() if n in layout})
    assert ranks.items() <= loaded.items()
    result = compare_logits(megatron_logits(fresh, info, case["tokens"]), peft_logits, tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()
    # and back: the imported (wider, rescaled) adapters export to what peft loads with its logits
    tensors, config = megatron_to_peft({n: p.detach() for n, p in params.items() if n in layout},
                                       hf_spec=info.spec, lora_options=LoraOptions(rank=RANK, alpha=2.0))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    again = transformers_logits(case["hf_dir"], case["tokens"], adapter=tmp_path)
    result = compare_logits(again, peft_logits, tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()


def test_export_import_round_trip(case) -> None:
    from megalora.train.model.hf_config import read_hf_config

    model, info, _ = build_lora_model(case["hf_dir"], alpha=ALPHA, use_rslora=case["lora"]["use_rslora"], seed=5)
    load_peft_adapter(model, case["exported"], hf_spec=read_hf_config(case["hf_dir"]))
    result = compare_logits(megatron_logits(model, info, case["tokens"]), case["logits"], tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()


def test_megatron_to_peft_rank_pattern_for_wider_modules(case, tmp_path) -> None:
    """A checkpoint whose fused module has a larger rank (as after an import) exports with
    rank/alpha patterns that keep peft's scale equal to ours; peft loads it with our logits."""
    spec, opts = case["info"].spec, LoraOptions(rank=RANK, alpha=ALPHA, use_rslora=case["lora"]["use_rslora"])
    full = dict(case["full"])
    name = next(n for n in full if n.endswith("linear_qkv.lora_A"))
    b_name = name[: -1] + "B"
    full[name] = torch.cat([full[name], full[name]])
    full[b_name] = torch.cat([full[b_name], full[b_name]], dim=1) / 2  # same delta at twice the rank
    tensors, config = megatron_to_peft(full, hf_spec=spec, lora_options=opts, base_model_name_or_path="x")
    assert sorted(config["rank_pattern"].values()) == [2 * RANK] * 3
    ref, _ = megatron_to_peft(case["full"], hf_spec=spec, lora_options=opts)
    checked = 0
    for pattern, alpha in config["alpha_pattern"].items():
        stem = "base_model.model." + pattern.replace("\\", "")
        wide_scale = alpha / ((2 * RANK) ** 0.5 if opts.use_rslora else 2 * RANK)
        a, b = f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"
        assert tensors[a].shape[0] == 2 * RANK
        torch.testing.assert_close(tensors[b] @ tensors[a] * wide_scale, ref[b] @ ref[a] * opts.scaling)
        checked += 1
    assert checked == 3
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    reference = transformers_logits(case["hf_dir"], case["tokens"], adapter=tmp_path)
    result = compare_logits(case["logits"], reference, tolerance=TOL)
    assert result.rel_l2 <= TOL and result.argmax_agree == 1.0, result.summary_line()


def test_export_command_adapter_mode_writes_this_adapter(case, tmp_path) -> None:
    """`megalora export --adapter` (export_checkpoint mode="adapter") writes exactly our files."""
    from megalora.export.run import export_checkpoint

    out = export_checkpoint(case["checkpoint"], tmp_path / "out", mode="adapter", adapter_format="peft",
                            log=lambda *_: None)
    ours, theirs = load_file(str(case["exported"] / "adapter_model.safetensors")), \
        load_file(str(out / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((out / "adapter_config.json").read_text()) == \
        json.loads((case["exported"] / "adapter_config.json").read_text())


def with_adapter(adapter: Path):
    """The megatron side of `megalora verify --adapter`: the one builder, with the adapter's own
    targets, rank, alpha and weights."""
    from megalora.train.lora.build import build_lora_model as build

    return functools.partial(build, adapter=adapter, expert_impl="loop")


def _lora_only(model_dir: Path, **kw):
    """LoRA on the same targets, without the adapter's weights (B = 0)."""
    from megalora.train.lora.build import build_lora_model as build
    from megalora.train.lora.spec import LoraSpec

    return build(model_dir, lora=LoraSpec(target_modules=tuple(ALL)), expert_impl="loop", **kw)


def test_verify_with_adapter(case) -> None:
    """`megalora verify --adapter` wiring: the one builder inside run_verify, all layers and the
    first two (adapters on dropped layers are left out on both sides); a model without the
    adapter's weights fails the same check."""
    from megalora.train.model.verify import run_verify

    peft_dir, _ = case["peft_made"]["explicit"]
    for num_layers in (None, 2):
        result = run_verify(case["hf_dir"], adapter=peft_dir, num_layers=num_layers, seq_length=16, tolerance=TOL,
                            build=with_adapter(peft_dir))
        assert result.ok, result.summary_line()
    blind = run_verify(case["hf_dir"], adapter=peft_dir, seq_length=16, tolerance=TOL, build=_lora_only)
    assert not blind.ok and blind.rel_l2 > 1e-3
