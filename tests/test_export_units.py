"""Export pieces without megatron: size parsing, shard planning and the streaming writer
(read back by safetensors itself), LoRA name resolution, the merge arithmetic against a
plain reference, the command line's errors and exit codes, adapter mode's dispatch, and
an export pushed end to end to the local fake hub (both hubs' real clients)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fake_hub_server import FakeHub  # tests/ is on sys.path (no __init__.py: pytest prepends it)
from megalora.export.cli import cmd_export
from megalora.export.merge import LoraKeys, lora_keys_for, merge_rule, merge_weight
from megalora.export.run import export_checkpoint, plan_units
from megalora.export.writer import INDEX_FILE, ShardWriter, TensorInfo, parse_size, plan_shards, write_index
from megalora.train.model.hf_config import read_hf_config
from megalora.train.model.mapping import rules_for
from megalora.train.model.tiny import make_tiny_checkpoint

TOKEN = "tok-export-7f3e9a"


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size(4096) == 4096 and parse_size("4096") == 4096
    for bad in ("5 parsecs", "", "-1MB", "0"):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def _infos(prefix: str, sizes: list[int]) -> list[TensorInfo]:
    return [TensorInfo(f"{prefix}.{i}", "F32", (n,)) for i, n in enumerate(sizes)]


def test_plan_shards_limits_sizes_and_keeps_units_on_one_rank() -> None:
    units = [_infos("u0", [10, 10]), _infos("u1", [30]), _infos("u2", [5, 5, 5]), _infos("u3", [100, 1])]
    plan = plan_shards(units, max_shard_bytes=100, world_size=2)
    names = [t.name for s in plan.shards for t in s.tensors]
    assert sorted(names) == sorted(t.name for u in units for t in u) and len(names) == len(set(names))
    for shard in plan.shards:
        assert shard.nbytes <= 100 or len(shard.tensors) == 1  # u3.0 (400 bytes) stands alone
    assert plan.unit_ranks == sorted(plan.unit_ranks) and set(plan.unit_ranks) == {0, 1}
    for shard in plan.shards:  # a shard never mixes ranks
        owners = {plan.unit_ranks[int(t.name[1])] for t in shard.tensors}
        assert owners == {shard.rank}
    count = len(plan.shards)
    assert [s.file for s in plan.shards] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    single = plan_shards(units, max_shard_bytes=10**6)
    assert [s.file for s in single.shards] == ["model.safetensors"]


def test_streaming_writer_round_trips_through_safetensors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(33, generator=gen),
        "c.ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "d.half": torch.randn(4, 4, generator=gen).half(),
        "e.empty": torch.zeros(0, 3),
    }
    infos = [TensorInfo(k, {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
                            torch.float16: "F16"}[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    plan = plan_shards([infos[:2], infos[2:]], max_shard_bytes=80, world_size=1)
    with ShardWriter(tmp_path, plan.shards_for(0)) as writer:
        for name, value in tensors.items():
            writer.write(name, value)
    write_index(tmp_path, plan)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    for name, value in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][name]), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            got = handle.get_tensor(name)
        assert got.dtype == value.dtype and torch.equal(got, value)


def test_writer_refuses_out_of_plan_order(tmp_path: Path) -> None:
    plan = plan_shards([_infos("u", [2, 2])], max_shard_bytes=100)
    with pytest.raises(AssertionError, match="plan order wants u.0"):
        with ShardWriter(tmp_path, plan.shards_for(0)) as writer:
            writer.write("u.1", torch.zeros(2))


def test_lora_keys_for_every_adapter_kind() -> None:
    names = {
        "decoder.layers.0.self_attention.linear_qkv.lora_A", "decoder.layers.0.self_attention.linear_qkv.lora_B",
        "decoder.layers.1.mlp.experts.lora_fc1_A", "decoder.layers.1.mlp.experts.lora_fc1_B",
        "decoder.layers.1.mlp.router.lora.lora_A", "decoder.layers.1.mlp.router.lora.lora_B",
        "decoder.layers.1.mlp.shared_experts.gate_lora.lora_A", "decoder.layers.1.mlp.shared_experts.gate_lora.lora_B",
        "output_layer.lora_A", "output_layer.lora_B",
    }
    assert lora_keys_for("decoder.layers.0.self_attention.linear_qkv.weight", names) == LoraKeys(
        "decoder.layers.0.self_attention.linear_qkv.lora_A", "decoder.layers.0.self_attention.linear_qkv.lora_B")
    assert lora_keys_for("decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight", names) == LoraKeys(
        "decoder.layers.1.mlp.experts.lora_fc1_A", "decoder.layers.1.mlp.experts.lora_fc1_B", 5)
    assert lora_keys_for("decoder.layers.1.mlp.experts.local_experts.5.linear_fc2.weight", names) is None
    assert lora_keys_for("decoder.layers.1.mlp.router.weight", names).a == "decoder.layers.1.mlp.router.lora.lora_A"
    assert lora_keys_for("decoder.layers.1.mlp.shared_experts.gate_weight", names).b.endswith("gate_lora.lora_B")
    assert lora_keys_for("output_layer.weight", names).a == "output_layer.lora_A"
    assert lora_keys_for("decoder.layers.0.self_attention.linear_qkv.bias", names) is None
    assert lora_keys_for("decoder.layers.0.self_attention.q_layernorm.weight", names) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_weight_is_fp32_then_cast(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    w, b, a = (torch.randn(s, generator=gen) for s in ((6, 5), (6, 2), (2, 5)))
    w = w.to(dtype)
    merged = merge_weight(w, b.to(dtype), a.to(dtype), scale=3.0)
    expected = (w.double() + 3.0 * b.to(dtype).double() @ a.to(dtype).double()).to(dtype)
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.float(), expected.float(), rtol=1e-6 if dtype == torch.float32 else 2**-8, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        merge_weight(w, b[:, :1], a, scale=1.0)


@pytest.mark.parametrize("model", ["qwen3_next_a", "qwen3_moe"])
def test_merge_rule_puts_each_delta_row_on_its_hf_row(model: str) -> None:
    """Oracle: label every HF row with its (source, row) id, push the labels through
    `to_megatron` to learn which HF row each megatron row is, and add B's rows there."""
    spec = read_hf_config(_FOLDERS[model])
    gen = torch.Generator().manual_seed(2)
    fused_rules = [r for r in rules_for(spec) if len(r.sources) > 1]
    assert {r.megatron.rsplit(".", 2)[-2] for r in fused_rules} >= {"linear_qkv", "linear_fc1"}
    checked = 0
    for rule in fused_rules:
        shapes = [_source_shape(spec, s.name) for s in rule.sources]
        sources = [torch.randn(shape, generator=gen) for shape in shapes]
        labels = [torch.stack([torch.full((shape[0],), float(i)), torch.arange(shape[0], dtype=torch.float32)], 1)
                  for i, shape in enumerate(shapes)]
        order = rule.to_megatron(*labels).long()  # megatron row -> (source, row)
        rows, cols = order.shape[0], shapes[0][1]
        b, a = torch.randn(rows, 3, generator=gen), torch.randn(3, cols, generator=gen)
        merged = merge_rule(rule, sources, (b, a), scale=0.5)
        expected = [s.clone() for s in sources]
        for m_row, (src, row) in enumerate(order.tolist()):
            expected[src][row] += 0.5 * (b[m_row] @ a)
        for got, want in zip(merged, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        checked += 1
    unchanged = merge_rule(rule, sources, None, scale=1.0)
    assert checked and all(u is s for u, s in zip(unchanged, sources))


def _source_shape(spec, name: str) -> tuple[int, ...]:
    return tuple(_SHAPES[spec.model_type][name])


_SHAPES: dict[str, dict[str, list[int]]] = {}
_FOLDERS: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _shapes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Shapes of the tiny checkpoints' tensors, read once from the files transformers wrote."""
    if _SHAPES:
        return
    for model in ("qwen3_next_a", "qwen3_moe", "qwen3"):
        folder = make_tiny_checkpoint(model, tmp_path_factory.mktemp(model), seed=0)
        spec = read_hf_config(folder)
        _FOLDERS[model] = folder
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            _SHAPES[spec.model_type] = {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _dense_checkpoint(root: Path) -> Path:
    """A hand-made checkpoint of the tiny dense Qwen3: LoRA on layer 0's qkv and fc2 only."""
    base = make_tiny_checkpoint("qwen3", root / "base", seed=4)
    shapes = _SHAPES["qwen3"]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (shapes[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    down = shapes["model.layers.0.mlp.down_proj.weight"]
    r = 4
    lora = {
        "decoder.layers.0.self_attention.linear_qkv.lora_A": torch.randn(r, q[1], generator=gen),
        "decoder.layers.0.self_attention.linear_qkv.lora_B": torch.randn(q[0] + k[0] + v[0], r, generator=gen),
        "decoder.layers.0.mlp.linear_fc2.lora_A": torch.randn(r, down[1], generator=gen),
        "decoder.layers.0.mlp.linear_fc2.lora_B": torch.randn(down[0], r, generator=gen),
    }
    ckpt = root / "run" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    save_file(lora, str(ckpt / "adapter_model.safetensors"))
    config = {"lora": {"lora_rank": r, "lora_alpha": 8, "use_rslora": False, "target_modules": ["all-linear"]}}
    (ckpt / "meta.json").write_text(json.dumps({"base_model": str(base), "config": config, "step": 3}))
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (base / "chat_template.jinja").write_text("{{ messages }}")
    return ckpt


def test_export_of_hand_made_checkpoint_merges_exactly_what_it_names(tmp_path: Path) -> None:
    ckpt = _dense_checkpoint(tmp_path)
    assert cmd_export([str(ckpt), "--out", str(tmp_path / "out"), "--verify", "false"]) == 0
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    lora = load_file(str(ckpt / "adapter_model.safetensors"))
    assert set(out) == set(base)
    # Dense Qwen3 (no output gate): linear_qkv rows are, per KV group, [its query heads, k, v].
    expected_down = base["model.layers.0.mlp.down_proj.weight"] + 2.0 * (
        lora["decoder.layers.0.mlp.linear_fc2.lora_B"] @ lora["decoder.layers.0.mlp.linear_fc2.lora_A"])
    torch.testing.assert_close(out["model.layers.0.mlp.down_proj.weight"], expected_down, rtol=1e-6, atol=1e-6)
    changed = sorted(k for k in base if not torch.equal(base[k], out[k]))
    assert changed == sorted(f"model.layers.0.{n}.weight" for n in
                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "base" / name).read_bytes()


def test_cli_errors_name_the_flag_or_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = _dense_checkpoint(tmp_path)
    cases = [
        ([str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "no meta.json"),
        ([str(ckpt), "--out", str(tmp_path / "o2"), "--max_shard_size", "5 parsecs"], "--max_shard_size"),
        ([str(ckpt), "--out", str(tmp_path / "o3"), "--verify", "maybe"], "--verify"),
        ([str(ckpt), "--out", str(tmp_path / "o4"), "--merge", "--adapter"], "--adapter"),
        ([str(ckpt), "--out", str(tmp_path / "o5"), "--hub", "github"], "--hub"),
        ([str(ckpt), "--out", str(tmp_path / "o7"), "--adapter_format", "sglang"], "--adapter_format applies only"),
        ([str(ckpt), "--out", str(tmp_path / "o8"), "--adapter", "--adapter_format", "tgi"], "--adapter_format"),
        ([str(ckpt)], "--out"),
        ([str(ckpt), "--out", str(tmp_path / "base")], "not an empty folder"),
    ]
    for argv, needle in cases:
        assert cmd_export(argv) == 2, argv
        assert needle in capsys.readouterr().err, argv
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "missing")}))
    assert cmd_export([str(ckpt), "--out", str(tmp_path / "o6")]) == 2
    assert "base_model" in capsys.readouterr().err
    assert cmd_export(["--help"]) == 0


def test_lora_of_another_shape_is_named(tmp_path: Path) -> None:
    ckpt = _dense_checkpoint(tmp_path)
    lora = load_file(str(ckpt / "adapter_model.safetensors"))
    key = "decoder.layers.0.mlp.linear_fc2.lora_A"
    lora[key] = lora[key][:, :-1].contiguous()  # trained on a narrower model
    save_file(lora, str(ckpt / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"{key}.*model.layers.0.mlp.down_proj.weight.*does not fit"):
        export_checkpoint(ckpt, tmp_path / "out", verify=False, log=lambda _: None)


def test_unknown_lora_tensor_is_refused() -> None:
    base = _FOLDERS["qwen3"]
    spec = read_hf_config(base)
    catalog = {k: TensorInfo(k, "F32", tuple(v)) for k, v in _SHAPES["qwen3"].items()}
    units = plan_units(rules_for(spec), catalog, set(), base_dir=base)
    assert units[0].name == "other" and [u.name for u in units[1:]] == ["layer 000000", "layer 000001"]
    with pytest.raises(ValueError, match="output_layer.lora_A.*tied embeddings"):
        plan_units(rules_for(spec), catalog, {"output_layer.lora_A", "output_layer.lora_B"}, base_dir=base)


def test_adapter_mode_dispatches_with_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import megalora.export.run as export_run

    ckpt = _dense_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="--adapter_format: expected one of"):
        export_checkpoint(ckpt, tmp_path / "a1", mode="adapter", adapter_format="tgi")
    calls = []
    monkeypatch.setattr(export_run, "write_adapter",
                        lambda c, o, *, adapter_format, log: calls.append((Path(c), Path(o), adapter_format)))
    export_checkpoint(ckpt, tmp_path / "a2", mode="adapter")
    export_checkpoint(ckpt, tmp_path / "a3", mode="adapter", adapter_format="sglang")
    assert calls == [(ckpt, tmp_path / "a2", "vllm"), (ckpt, tmp_path / "a3", "sglang")]


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("hub", ["modelscope", "huggingface"])
def test_export_pushes_the_folder_to_the_hub(hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", _closed_port_url())
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms_home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms_cache"))
    for var in ("HF_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(var, raising=False)
    ckpt = _dense_checkpoint(tmp_path)
    lines: list[str] = []
    with FakeHub() as fake:
        out = export_checkpoint(ckpt, tmp_path / "out", max_shard_size="20KB", verify=False, push_to_hub="alice/tiny",
                                hub=hub, token=TOKEN, private=True, commit_message="export step 3",
                                hub_endpoint=fake.url, log=lines.append)
    repo = fake.repos["alice/tiny"]
    on_disk = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
               if p.is_file() and not p.name.startswith(".")}  # the client's own upload state stays local
    assert repo.files == on_disk and INDEX_FILE in on_disk and len(on_disk) > 5
    assert repo.private is True and repo.commit_messages[0].startswith("export step 3")
    assert all(TOKEN not in line for line in lines)


TORCHRUN_SCRIPT = """
import sys
import torch.distributed as dist
from megalora.export.cli import cmd_export

code = cmd_export(sys.argv[1:])
assert not dist.is_initialized(), "cmd_export must tear down the process group it started"
sys.exit(code)
"""


def test_torchrun_export_splits_layers_over_ranks(tmp_path: Path) -> None:
    """`cmd_export` under torchrun (2 ranks, its own gloo group): each rank writes its own
    shards, and the tensors equal a one-process export of the same checkpoint."""
    import os
    import subprocess
    import sys

    ckpt = _dense_checkpoint(tmp_path)
    script = tmp_path / "run_export.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free rendezvous port itself.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script),
                           str(ckpt), "--out", str(tmp_path / "multi"), "--max_shard_size", "30KB",
                           "--verify", "false"], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cmd_export([str(ckpt), "--out", str(tmp_path / "single"), "--verify", "false"]) == 0
    index = json.loads((tmp_path / "multi" / INDEX_FILE).read_text())
    files = sorted(p.name for p in (tmp_path / "multi").glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files and len(files) >= 2
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    multi = {}
    for file in files:
        part = load_file(str(tmp_path / "multi" / file))
        assert not set(part) & set(multi)
        multi.update(part)
    assert set(multi) == set(single) and all(torch.equal(multi[k], single[k]) for k in single)
    assert "over 2 rank(s)" in done.stdout and done.stdout.count("verify:") == 0
    # The plan both ranks followed gives each rank shards of its own.
    base = tmp_path / "base"
    catalog = {k: TensorInfo(k, "F32", tuple(v)) for k, v in _SHAPES["qwen3"].items()}
    lora_names = set(load_file(str(ckpt / "adapter_model.safetensors")))
    units = plan_units(rules_for(read_hf_config(base)), catalog, lora_names, base_dir=base)
    plan = plan_shards([[catalog[n] for i in u.items for n in i.sources] for u in units],
                       max_shard_bytes=parse_size("30KB"), world_size=2)
    assert plan.shards_for(0) and plan.shards_for(1) and sorted(s.file for s in plan.shards) == files
