"""Quantized checkpoints are read exactly or refused.

Block-FP8 checkpoints are made here in the on-disk layout of Qwen's -FP8 releases (fp8
weights, `weight_scale_inv`, `quantization_config`) from tiny transformers checkpoints.
Block sizes of 20x24 make every tensor- and expert-parallel slice cut blocks and leave
partial edge blocks (transformers' own dequantization refuses those, so the reference is
a dequantized copy computed from the raw files, `dequantized_reference`); with the real
128x128 blocks transformers loads the fp8 folder itself and is the oracle.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megalora.train.model.hf_config import read_hf_config
from megalora.train.model.loader import CheckpointReader
from megalora.train.model.quant import dequantize_slice
from megalora.train.model.tiny import make_tiny_checkpoint

from support.models import dequantized_reference, make_fp8_checkpoint, rank_verify_layouts, sample_tokens
from support.multiprocess import spawn

ROOT = Path(__file__).resolve().parents[1]
CUT_BLOCK = (20, 24)
LAYOUTS = [(1, 1, False), (2, 1, True), (1, 2, False)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    src = make_tiny_checkpoint("qwen3_next_a", root / "src", seed=7)
    cut = make_fp8_checkpoint(src, root / "fp8_cut", block=CUT_BLOCK)
    real = make_fp8_checkpoint(src, root / "fp8_128", block=(128, 128))
    return {"root": root, "src": src, "cut": cut, "real": real,
            "cut_ref": dequantized_reference(cut, root / "ref_cut")}


def test_dequantize_slice_matches_element_by_element_definition():
    block = (2, 3)
    values = (torch.arange(35, dtype=torch.float32).reshape(5, 7) % 9 - 4).to(torch.float8_e4m3fn)
    scales = torch.arange(1, 10, dtype=torch.float32).reshape(3, 3) / 16  # [ceil(5/2), ceil(7/3)]
    full = torch.empty(5, 7)
    for i in range(5):
        for j in range(7):
            full[i, j] = values[i, j].float() * scales[i // 2, j // 3]
    assert torch.equal(dequantize_slice(values, scales, block=block), full)
    # Rows 1..4 x columns 4..7 start and end inside blocks: scale rows 0..2, columns 1..2.
    part = dequantize_slice(values[1:4, 4:7], scales[0:2, 1:3], block=block, row0=1, col0=4)
    assert torch.equal(part, full[1:4, 4:7])


def test_reader_dequantizes_every_slice_exactly_and_reads_only_its_scales(models):
    reference = load_file(str(models["cut_ref"] / "model.safetensors"))
    with CheckpointReader(models["cut"]) as reader:
        assert set(reader.names()) == set(reference)  # no *_scale_inv among the model's tensors
        quantized = [n for n in reader.names() if reader.is_quantized(n)]
        assert len(quantized) > 50 and any(".experts.3.down_proj" in n for n in quantized)
        gdn = "model.layers.0.linear_attn."
        assert reader.is_quantized(gdn + "in_proj_qkvz.weight") and reader.is_quantized(gdn + "in_proj_ba.weight")
        assert not reader.is_quantized("model.layers.0.mlp.gate.weight")
        for name in reader.names():
            assert torch.equal(reader.read(name).float(), reference[name]), name
        for name in quantized:
            rows, cols = reader.shape(name)
            for dim, size in ((0, rows), (1, cols)):
                for start, stop in ((0, size // 2), (size // 2, size), (3, size - 5)):
                    before = reader.bytes_read
                    got = reader.read(name, dim=dim, start=start, stop=stop)
                    assert torch.equal(got, reference[name].narrow(dim, start, stop - start)), (name, dim, start)
                    other = cols if dim == 0 else rows
                    first, last = start // CUT_BLOCK[dim], -(-stop // CUT_BLOCK[dim])
                    scale_cells = (last - first) * -(-other // CUT_BLOCK[1 - dim])
                    assert reader.bytes_read - before == (stop - start) * other + 4 * scale_cells


def test_fp8_tensor_without_scales_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    raw = load_file(str(models["cut"] / "model.safetensors"))
    name = "model.layers.0.linear_attn.out_proj.weight"
    del raw[name + "_scale_inv"]
    save_file(raw, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((models["cut"] / "config.json").read_text())
    with CheckpointReader(tmp_path) as reader, pytest.raises(ValueError, match=f"{name}.*has no {name}_scale_inv"):
        reader.read(name)


REFUSED = {
    "modelopt (NVFP4)": {"quant_method": "modelopt", "quant_algo": "NVFP4"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "compressed-tensors (nvfp4-pack-quantized)": {"quant_method": "compressed-tensors",
                                                  "format": "nvfp4-pack-quantized"},
}


def _with_config(models, tmp_path: Path, quantization_config: dict) -> Path:
    config = json.loads((models["src"] / "config.json").read_text())
    config["quantization_config"] = quantization_config
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(models["src"] / "model.safetensors")
    return folder


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_other_quantization_methods_are_refused_naming_the_method(models, tmp_path, method):
    folder = _with_config(models, tmp_path, REFUSED[method])
    with pytest.raises(ValueError, match=re.escape(f"quant_method '{method}' is not supported")) as err:
        read_hf_config(folder)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=re.escape(f"quant_method '{method}'")):
        CheckpointReader(folder)


def test_per_tensor_fp8_and_modelopt_sidecar_are_refused(models, tmp_path):
    folder = _with_config(models, tmp_path, {"quant_method": "fp8", "activation_scheme": "dynamic"})
    with pytest.raises(ValueError, match="per-tensor FP8"):
        read_hf_config(folder)
    sidecar = tmp_path / "sidecar"
    sidecar.mkdir()
    (sidecar / "config.json").write_text((models["src"] / "config.json").read_text())
    (sidecar / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    with pytest.raises(ValueError, match="quant_method 'modelopt', quant_algo 'NVFP4'"):
        read_hf_config(sidecar)


def test_dry_run_refuses_nvfp4_in_one_line(models, tmp_path):
    folder = _with_config(models, tmp_path, REFUSED["modelopt (NVFP4)"])
    r = subprocess.run([sys.executable, "-m", "megalora", "sft", "--model", str(folder), "--dataset", "x.jsonl",
                        "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "quant_method 'modelopt (NVFP4)' is not supported" in lines[0], r.stderr


@pytest.fixture(scope="module")
def layouts(models) -> dict:
    return spawn(rank_verify_layouts, 2, args=(str(models["cut"]), str(models["cut_ref"]), LAYOUTS),
                 timeout=600)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"tp{x[0]}_ep{x[1]}{'_sp' if x[2] else ''}")
def test_verify_passes_on_block_cutting_layouts(layouts, layout):
    """TP=2+SP cuts 20x24 blocks of q|k|v, o_proj, GDN in/out projections and the shared
    expert's gate|up and down; EP=2 reads half the experts (partial edge blocks)."""
    ranks = [r[layout] for r in layouts]
    result = ranks[0]["result"]
    assert result.ok and result.rel_l2 <= 1e-5 and result.argmax_agree == 1.0, result.summary_line()
    assert all(r["num_dequantized"] > 0 for r in ranks)
    whole = layouts[0][(1, 1, False)]["bytes_read"]
    if layout != (1, 1, False):
        assert all(r["bytes_read"] < 0.8 * whole for r in ranks)


def test_verify_tolerance_sees_the_quantization_error(models):
    """The fp8 model differs from its unquantized source by far more than verify's bound,
    so a loader that dropped or misplaced scales could not pass the tests above."""
    import transformers

    tokens = sample_tokens(251)
    logits = {}
    for key in ("src", "cut_ref"):
        model = transformers.AutoModelForCausalLM.from_pretrained(models[key], dtype=torch.float32).eval()
        with torch.no_grad():
            logits[key] = model(tokens).logits.double()
    rel = ((logits["src"] - logits["cut_ref"]).norm() / logits["src"].norm()).item()
    assert rel > 1e-3


def test_cli_verify_with_real_128_blocks_against_transformers_own_dequantization(models):
    r = subprocess.run([sys.executable, "-m", "megalora", "verify", "--model", str(models["real"])], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "block-FP8 (float8_e4m3fn, 128x128 blocks)" in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("verify: ") and last.endswith("status=ok")
    assert float(last.split("rel_l2=")[1].split()[0]) <= 1e-5


def export_worker(rank: int, world_size: int, base: str, root: str) -> list[str]:
    """Spawn target (1 rank): a LoRA checkpoint (seeded non-zero A and B on every linear
    layer) on the block-FP8 base, then its merged export (verify on) and PEFT adapter."""
    from megalora.config import Config, LoraSection
    from megalora.export.run import export_checkpoint
    from megalora.parallel import groups
    from megalora.train.checkpoint import save_checkpoint
    from megalora.train.lora.apply import apply_lora
    from megalora.train.lora.layout import lora_layout
    from megalora.train.model.build import build_model

    groups.initialize(tp=1, ep=1)
    model, _ = build_model(base)
    cfg = Config()
    cfg.lora = LoraSection(lora_rank=4, lora_alpha=8.0, target_modules=["all-linear"])
    apply_lora(model, cfg.lora, seed=0, verbose=False)
    layout = lora_layout(model)
    generator = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in layout:
            params[name].copy_(0.05 * torch.randn(params[name].shape, generator=generator))
    ckpt = save_checkpoint(Path(root) / "run", step=1, model=model, optimizer=None, layout=layout,
                           meta={"base_model": base, "config": cfg.to_dict()}, save_optim=False, save_rng=False)
    assert ckpt is not None
    lines: list[str] = []
    export_checkpoint(ckpt, Path(root) / "merged", log=lines.append)
    export_checkpoint(ckpt, Path(root) / "adapter", mode="adapter", adapter_format="peft", log=lines.append)
    return lines


def test_merged_export_of_fp8_base_is_bf16_and_matches_peft_on_the_dequantized_base(models):
    """The export rounds merged weights to bf16; with top-k routing one token whose expert
    choice sits near a tie flips and alone moves rel_l2 past the bf16 bound, so this base
    routes every token to all 8 experts (no choice to flip)."""
    import peft
    import transformers

    root = models["root"] / "export"
    src = make_tiny_checkpoint("qwen3_next_a", root / "src", seed=7, overrides={"num_experts_per_tok": 8})
    base = make_fp8_checkpoint(src, root / "fp8", block=CUT_BLOCK)
    reference = dequantized_reference(base, root / "ref")
    lines = spawn(export_worker, 1, args=(str(base), str(root)), timeout=600)[0]
    said = [line for line in lines if "dequantized and merged" in line]
    assert said == ["export: the base holds block-FP8 (float8_e4m3fn, 20x24 blocks) weights: written dequantized "
                    "and merged in bfloat16, config.json without quantization_config"]
    assert any(line.startswith("verify: ") and line.endswith("status=ok") for line in lines), lines
    merged = root / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    names = set()
    for path in merged.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                names.add(key)
                assert handle.get_slice(key).get_dtype() == "BF16", key
    assert names == set(load_file(str(reference / "model.safetensors")))
    ours = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert getattr(ours.config, "quantization_config", None) is None
    plain = transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    oracle = peft.PeftModel.from_pretrained(plain, str(root / "adapter")).eval()
    tokens = sample_tokens(251)
    with torch.no_grad():
        got, want = ours(tokens).logits.double(), oracle(tokens).logits.double()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 2e-2 and (got.argmax(-1) == want.argmax(-1)).double().mean() >= 0.9, rel
    with torch.no_grad(), oracle.disable_adapter():
        unadapted = oracle(tokens).logits.double()
    assert ((unadapted - want).norm() / want.norm()).item() > 10 * rel  # the adapter is really merged


@pytest.mark.parametrize("which", ["cut", "real"])
def test_planner_counts_dequantized_weights_and_reports_fp8_disk_size(models, which):
    from megalora.config import load_config
    from megalora.train.plan import GIB, fp8_checkpoint_bytes, memory_plan, plan_main

    fp8_config = json.loads((models[which] / "config.json").read_text())
    plain_config = json.loads((models["src"] / "config.json").read_text())
    cfg, _ = load_config(argv=["--torch_dtype", "bfloat16"])
    fp8 = memory_plan(cfg, hf_config=fp8_config, num_gpus=1)
    plain = memory_plan(cfg, hf_config=plain_config, num_gpus=1)
    frozen = {k: v for k, v in fp8["components"].items() if k.startswith("frozen ")}
    assert frozen == {k: v for k, v in plain["components"].items() if k.startswith("frozen ")}
    assert plain["fp8_disk_bytes"] is None
    # The tensor bytes of the file made here: its size less the 8-byte length and the JSON header.
    path = models[which] / "model.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    on_disk = path.stat().st_size - 8 - header
    assert fp8["fp8_disk_bytes"] == fp8_checkpoint_bytes(read_hf_config(models[which])) == on_disk
    text = plan_main(cfg, num_gpus=1, hf_config=fp8_config)
    assert f"{on_disk / GIB:.2f} GiB on disk; dequantized at load, the frozen rows below count 2 bytes" in text
