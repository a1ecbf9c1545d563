"""Merged export parity: checkpoints saved on three parallel layouts, exported, loaded by
transformers, compared with the unmerged megatron+LoRA model of each layout.

One 4-rank gloo world (one spawn, to pay the start-up once) does all megatron work: for
each layout (TP=1/EP=1, EP=2, TP=2×EP=2 with sequence parallel) it builds each tiny model,
sets the same seeded full LoRA tensors (A and non-zero B) sharded for that layout, records
the unmerged logits and saves a checkpoint. Then, in the same world, it runs the export
on 4 ranks with verify on (decoder layers split over ranks), a bf16 base, a deliberately
broken merge through the CLI (verify must FAIL, exit 1), and saves the checkpoint that the
memory test exports. The oracles: transformers' logits of the export vs the megatron
logits of every layout (fp32: relative L2 <= 1e-5), byte-equal tensors across layouts,
the base model's own tensor names and files.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from megalora.export.run import export_checkpoint
from megalora.export.writer import INDEX_FILE, parse_size
from megalora.train.model.tiny import make_tiny_checkpoint

from support.models import sample_tokens
from support.multiprocess import spawn

LAYOUTS = [(1, 1, False), (1, 2, False), (2, 2, True)]
MODELS = ["qwen3_next_a", "qwen3_moe"]
TARGETS = ["all-linear", "router", "shared_expert_gate", "output_layer"]
FP32_RTOL = 1e-5
BF16_RTOL = 2e-2  # merged weights rounded to bf16: ~2^-8 relative per weight
SMALL_SHARD = "64KB"
MEMORY_OVERHEAD = 24 * 2**20  # the fixed C of the bound in megalora.export.run


def _tag(layout: tuple[int, int, bool]) -> str:
    tp, ep, sp = layout
    return f"tp{tp}_ep{ep}{'_sp' if sp else ''}"


def _lora_section() -> Any:
    from megalora.config import LoraSection

    return LoraSection(lora_rank=4, lora_alpha=8.0, target_modules=list(TARGETS))


def _full_lora(layout: dict[str, str], params: dict[str, torch.Tensor], *, tp: int, ep: int,
               vocab_size: int) -> dict[str, torch.Tensor]:
    """The same full (unsharded) LoRA tensors on every layout, seeded by name; B non-zero."""
    full = {}
    for name, kind in layout.items():
        shape = list(params[name].shape)
        if kind in ("column", "glu_column") or kind.startswith("segments:"):
            shape[0] *= tp
        elif kind == "row":
            shape[1] *= tp
        elif kind == "expert":
            shape[0] *= ep
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little")
        gen = torch.Generator().manual_seed(seed)
        if name == "output_layer.lora_B":  # rows past the vocab are TP padding: zero on every layout
            real = 0.05 * torch.randn(vocab_size, shape[1], generator=gen)
            full[name] = torch.cat([real, real.new_zeros(shape[0] - vocab_size, shape[1])])
        else:
            full[name] = 0.05 * torch.randn(shape, generator=gen)
    return full


def _lora_model(base: str, *, tp: int, ep: int, sp: bool) -> tuple[Any, Any, dict[str, str]]:
    from megalora.train.lora.apply import apply_lora
    from megalora.train.lora.layout import lora_layout, shard_lora_state
    from megalora.train.model.build import build_model

    model, info = build_model(base)
    apply_lora(model, _lora_section(), seed=0, verbose=False)
    layout = lora_layout(model)
    params = dict(model.named_parameters())
    full = _full_lora(layout, params, tp=tp, ep=ep, vocab_size=info.vocab_size)
    local = shard_lora_state(full, layout, tp_rank=info.dims.tp_rank, tp_size=tp,
                             ep_rank=info.dims.ep_rank, ep_size=ep)
    with torch.no_grad():
        for name, value in local.items():
            params[name].copy_(value)
    return model, info, layout


def _save(model: Any, layout: dict[str, str], base: str, run_dir: Path) -> Path | None:
    from megalora.config import Config
    from megalora.train.checkpoint import save_checkpoint

    cfg = Config()
    cfg.lora = _lora_section()
    return save_checkpoint(run_dir, step=1, model=model, optimizer=None, layout=layout,
                           meta={"base_model": base, "config": cfg.to_dict()}, save_optim=False, save_rng=False)


def world_worker(rank: int, world_size: int, bases: dict[str, str], root: str) -> dict[str, Any]:
    """Spawn target (4 ranks): checkpoints on every layout, then the multi-rank exports."""
    import megalora.export.merge as merge_module
    from megalora.export.cli import cmd_export
    from megalora.parallel import groups
    from megalora.train.model.verify import megatron_logits

    out: dict[str, Any] = {"logits": {}, "lines": {}}
    for tp, ep, sp in LAYOUTS:
        groups.initialize(tp=tp, ep=ep, sequence_parallel=sp)
        names = MODELS + (["qwen3_moe_bf16", "memory"] if (tp, ep) == (1, 1) else [])
        for name in names:
            model, info, layout = _lora_model(bases[name], tp=tp, ep=ep, sp=sp)
            if name in MODELS:
                logits = megatron_logits(model, info, sample_tokens(info.vocab_size))
                out["logits"][(name, _tag((tp, ep, sp)))] = logits if rank == 0 else None
            _save(model, layout, bases[name], Path(root) / name / _tag((tp, ep, sp)))
    ckpt = Path(root) / "{}" / "tp2_ep2_sp" / "checkpoint-1"
    for name in MODELS:
        lines: list[str] = []
        export_checkpoint(str(ckpt).format(name), Path(root) / f"multi_{name}", max_shard_size=SMALL_SHARD,
                          log=lines.append)
        out["lines"][name] = lines
    lines = []
    export_checkpoint(Path(root) / "qwen3_moe_bf16" / "tp1_ep1" / "checkpoint-1", Path(root) / "bf16",
                      log=lines.append)
    out["lines"]["bf16"] = lines
    # A merge that forgets the adapter: verify must catch it, and the CLI must exit 1.
    merge_module.merge_weight = lambda weight, b, a, *, scale: weight.clone()
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(stderr):
        out["broken_rc"] = cmd_export([str(Path(root) / "qwen3_moe" / "tp1_ep1" / "checkpoint-1"),
                                       "--out", str(Path(root) / "broken"), "--push_to_hub", "alice/never"])
    out["broken_out"] = stdout.getvalue() + stderr.getvalue()
    return out


def _bf16_copy(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("export")
    bases = {name: str(make_tiny_checkpoint(name, root / "base" / name, seed=3)) for name in MODELS}
    bases["qwen3_moe_bf16"] = str(_bf16_copy(Path(bases["qwen3_moe"]), root / "base" / "qwen3_moe_bf16"))
    bases["memory"] = str(make_tiny_checkpoint("qwen3_moe", root / "base" / "memory", seed=5, overrides=MEMORY_MODEL))
    results = spawn(world_worker, 4, args=(bases, str(root)), timeout=560)
    return {"root": root, "bases": bases, **results[0]}


# A model of ~83 MiB in fp32 (several layers, each much larger than the shards).
MEMORY_MODEL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 12, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8, "moe_intermediate_size": 256,
                "mlp_only_layers": [], "vocab_size": 1024}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = handle.get_tensor(key)
    return out


def _hf_logits(folder: Path, vocab_size: int) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(sample_tokens(vocab_size)).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def exports(world: dict[str, Any]) -> dict[tuple[str, str], Path]:
    """Single-process exports (verify off) of every model's checkpoint from every layout."""
    root, out = world["root"], {}
    for name in MODELS:
        for layout in LAYOUTS:
            folder = root / f"single_{name}_{_tag(layout)}"
            export_checkpoint(root / name / _tag(layout) / "checkpoint-1", folder, verify=False, log=lambda _: None)
            out[(name, _tag(layout))] = folder
    return out


@pytest.mark.parametrize("name", MODELS)
def test_exports_are_identical_across_layouts(world: dict[str, Any], exports: dict, name: str) -> None:
    tensors = {tag: _tensors(exports[(name, tag)]) for tag in map(_tag, LAYOUTS)}
    first = tensors[_tag(LAYOUTS[0])]
    base = _tensors(Path(world["bases"][name]))
    assert set(first) == set(base)
    for tag, got in tensors.items():
        assert set(got) == set(first), tag
        for key, value in got.items():
            assert torch.equal(value, first[key]), f"{tag}: {key} differs from the 1-rank export"
    # The 4-rank export (small shards, layers split over ranks) holds the same tensors.
    multi = _tensors(world["root"] / f"multi_{name}")
    assert set(multi) == set(first) and all(torch.equal(multi[k], first[k]) for k in first)
    # Merged: adapted weights moved, the rest is the base byte for byte.
    changed = {k for k in first if not torch.equal(first[k], base[k])}
    assert any(".experts.3.down_proj" in k for k in changed) and "lm_head.weight" in changed
    assert all(torch.equal(first[k], base[k]) for k in first if "norm" in k)


_HF_LOGITS: dict[str, torch.Tensor] = {}


@pytest.mark.parametrize("layout", LAYOUTS, ids=[_tag(layout) for layout in LAYOUTS])
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_unmerged_model_of_each_layout(world: dict[str, Any], exports: dict, name: str,
                                                      layout: tuple[int, int, bool]) -> None:
    """transformers on the export (from this layout's checkpoint) vs the unmerged megatron
    logits computed on this layout."""
    vocab = json.loads((Path(world["bases"][name]) / "config.json").read_text())["vocab_size"]
    if name not in _HF_LOGITS:
        _HF_LOGITS[name] = _hf_logits(Path(world["bases"][name]), vocab)
    merged = _hf_logits(exports[(name, _tag(layout))], vocab)
    assert _rel(_HF_LOGITS[name], merged) > 1e-2, "the adapter barely changes the model: the test would be blind"
    unmerged = world["logits"][(name, _tag(layout))]
    assert _rel(merged, unmerged) <= FP32_RTOL, f"rel L2 {_rel(merged, unmerged):.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_multi_rank_sharded_export_has_valid_index_and_verifies(world: dict[str, Any], name: str) -> None:
    folder = world["root"] / f"multi_{name}"
    index = json.loads((folder / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert sorted(set(weight_map.values())) == files and len(files) > 4
    limit = parse_size(SMALL_SHARD)
    total = 0
    seen: list[str] = []
    for file in files:
        with safe_open(str(folder / file), "pt") as handle:
            keys = list(handle.keys())
            sizes = [handle.get_tensor(k).nbytes for k in keys]
        assert all(weight_map[k] == file for k in keys)
        assert sum(sizes) <= limit or len(keys) == 1, f"{file}: {sum(sizes)} bytes in {len(keys)} tensors"
        total += sum(sizes)
        seen += keys
    assert sorted(seen) == sorted(weight_map) and len(seen) == len(set(seen))
    assert index["metadata"]["total_size"] == total
    base = Path(world["bases"][name])
    assert set(weight_map) == set(_tensors(base))
    assert json.loads((folder / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert (folder / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    verify = [line for line in world["lines"][name] if line.startswith("verify:")]
    assert len(verify) == 1 and verify[0].endswith("status=ok"), world["lines"][name]
    assert float(verify[0].split("rel_l2=")[1].split()[0]) <= FP32_RTOL


def test_bf16_export_stays_bf16_and_verifies(world: dict[str, Any]) -> None:
    folder = world["root"] / "bf16"
    tensors = _tensors(folder)
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    # Oracle: the fp32 export of the same adapter. The bf16 one differs only by rounding the
    # base and the merged weight to bf16 (2^-9 relative each, of the base's magnitude).
    fp32_out = world["root"] / "bf16_oracle_fp32"
    export_checkpoint(world["root"] / "qwen3_moe" / "tp1_ep1" / "checkpoint-1", fp32_out, verify=False,
                      log=lambda _: None)
    fp32 = _tensors(fp32_out)
    assert set(fp32) == set(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(value.float(), fp32[key], rtol=2 ** -7, atol=2e-3)
    verify = [line for line in world["lines"]["bf16"] if line.startswith("verify:")]
    assert len(verify) == 1 and verify[0].endswith("status=ok"), world["lines"]["bf16"]
    rel = float(verify[0].split("rel_l2=")[1].split()[0])
    assert 0 < rel <= BF16_RTOL


def test_broken_merge_fails_verify_exit_1_and_is_not_pushed(world: dict[str, Any]) -> None:
    assert world["broken_rc"] == 1, world["broken_out"]
    assert "status=FAIL" in world["broken_out"] and "export verify failed" in world["broken_out"]
    assert "push:" not in world["broken_out"]
    assert (world["root"] / "broken" / "config.json").is_file()  # left for inspection


MEMORY_SCRIPT = """
import json, resource, sys
import torch
import safetensors
import megalora.train.model.loader
from megalora.export.run import export_checkpoint

torch.set_num_threads(1)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
export_checkpoint(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], verify=False, log=lambda _: None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": baseline, "peak": peak}))
"""


def test_export_peak_memory_is_bounded(world: dict[str, Any]) -> None:
    import subprocess
    import sys

    from megalora.train.model.hf_config import read_hf_config
    from megalora.train.model.mapping import rules_for

    base = Path(world["bases"]["memory"])
    tensors = _tensors(base)
    model_bytes = sum(t.nbytes for t in tensors.values())
    layer_bytes: dict[str, int] = {}
    for key, value in tensors.items():
        if key.startswith("model.layers."):
            layer = key.split(".")[2]
            layer_bytes[layer] = layer_bytes.get(layer, 0) + value.nbytes
    largest_layer = max(layer_bytes.values())
    rules = rules_for(read_hf_config(base))
    largest_rule = max(sum(tensors[s.name].numel() * 4 for s in rule.sources) for rule in rules)
    shard = model_bytes // 8
    out = world["root"] / "memory_out"
    ckpt = world["root"] / "memory" / "tp1_ep1" / "checkpoint-1"
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ckpt), str(out), str(shard)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    grown = rss["peak"] - rss["baseline"]
    # The bound of megalora.export.run: U + 4 F + L + fixed overhead (allocator, headers).
    bound = largest_layer + 4 * largest_rule + MEMORY_OVERHEAD
    assert len(list(out.glob("*.safetensors"))) >= 8
    assert set(_tensors(out)) == set(tensors)
    assert grown <= bound, f"peak grew {grown / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    assert grown <= model_bytes / 2, f"peak grew {grown / 2**20:.1f} MiB for a {model_bytes / 2**20:.1f} MiB model"
