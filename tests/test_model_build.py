"""One way to build the model, one parallel layout object.

- Every path that needs a megatron model with LoRA (training, `megalora verify --adapter`,
  the PEFT import, export's verify) builds it with `build_lora_model`; the builder's
  `info.steps` says what it did.
- `ParallelDims` sizes are checked by the one validator: a bad size is one `ConfigError`
  naming the key, with the same words from the config check, the rank layout, the layout
  object and the HF config conversion.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megalora.config import ConfigError, check_layout, check_parallel_sizes, load_config
from megalora.parallel import groups
from megalora.parallel.dims import ParallelDims
from megalora.train.lora import build
from megalora.train.lora.spec import LoraSpec, read_trained_model

RANK = 4


@pytest.mark.parametrize("sizes, message", [
    (dict(tp=0), "`tensor_model_parallel_size` must be >= 1; got 0"),
    (dict(ep=-1), "`expert_model_parallel_size` must be >= 1; got -1"),
    (dict(etp=0), "`expert_tensor_parallel_size` must be >= 1; got 0"),
    (dict(pp=0), "`pipeline_model_parallel_size` must be >= 1; got 0"),
    (dict(tp=3, world_size=4), "world size 4 is not divisible by `tensor_model_parallel_size`=3"),
    (dict(ep=3, world_size=4), "world size 4 is not divisible by `expert_model_parallel_size`=3"),
    (dict(ep=2, etp=2, world_size=2),
     "world size 2 is not divisible by `expert_model_parallel_size`=2 x `expert_tensor_parallel_size`=2"),
    (dict(sequence_parallel=True, world_size=2), "`sequence_parallel`=true needs `tensor_model_parallel_size` > 1"),
])
def test_bad_sizes_are_one_config_error_naming_the_key(sizes, message):
    with pytest.raises(ConfigError) as err:
        ParallelDims(**sizes)
    assert str(err.value) == message
    with pytest.raises(ConfigError) as again:
        check_parallel_sizes(**sizes)
    assert str(again.value) == message


def test_every_layer_refuses_a_bad_layout_in_the_same_words():
    """The config check, the rank layout and the layout object share the validator."""
    from megalora.train.model.hf_config import parse_hf_config, to_transformer_config
    from megalora.train.model.tiny import TINY_CONFIGS

    cfg, _ = load_config(None, ["--tensor_model_parallel_size", "3"])
    errors = []
    for refuse in (lambda: check_layout(cfg, world_size=4), lambda: groups.layout(4, tp=3, ep=1, num_experts=0),
                   lambda: ParallelDims(tp=3, world_size=4)):
        with pytest.raises(ConfigError) as err:
            refuse()
        errors.append(str(err.value))
    assert errors == ["world size 4 is not divisible by `tensor_model_parallel_size`=3"] * 3
    # The model's sizes: from config.json (the dry run and training) and in the megatron config.
    spec = parse_hf_config(dict(TINY_CONFIGS["qwen3_moe"]))
    cfg, _ = load_config(None, ["--expert_model_parallel_size", "3"])
    with pytest.raises(ConfigError) as from_config:
        check_layout(cfg, world_size=3, shape=spec.shape())
    with pytest.raises(ConfigError) as from_model:
        to_transformer_config(spec, ep=3)
    assert str(from_config.value) == str(from_model.value) == \
        f"`expert_model_parallel_size`=3 does not divide the {spec.num_experts} experts of qwen3_moe (num_experts)"


def test_coordinates_follow_megatron_rank_order():
    rows = [ParallelDims(tp=2, ep=2, etp=2, world_size=8, rank=r) for r in range(8)]
    assert [d.tp_rank for d in rows] == [0, 1] * 4
    assert [d.dp_rank for d in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [d.etp_rank for d in rows] == [0, 1] * 4
    assert [d.ep_rank for d in rows] == [0, 0, 1, 1] * 2
    assert [d.expert_dp_rank for d in rows] == [0] * 4 + [1] * 4
    assert (rows[0].dp, rows[0].expert_dp) == (4, 2)


def test_initialize_makes_the_one_layout_object():
    from megatron.core import parallel_state

    dims = groups.initialize(device="cpu")
    try:
        assert groups.current() is dims
        assert (dims.world_size, dims.tp, dims.dp, dims.device) == (1, 1, 1, torch.device("cpu"))
        assert dims.groups.tp is parallel_state.get_tensor_model_parallel_group()
        assert dims.groups.expert_dp is parallel_state.get_expert_data_parallel_group()
    finally:
        groups.destroy()
    assert groups.current() is not dims  # a fresh one-process world


def test_a_checkpoint_lora_spec_is_read_by_one_function(tmp_path):
    cfg, _ = load_config(None, ["--lora_rank", "4", "--lora_alpha", "8", "--use_rslora", "true",
                                "--target_modules", "linear_qkv", "router", "--lora_per_projection", "true",
                                "--num_layers", "2"])
    trained = read_trained_model({"base_model": "/m", "config": cfg.to_dict()}, where="meta.json")
    assert trained.lora == LoraSpec.from_section(cfg.lora)
    assert trained.lora.per_projection and trained.lora.target_modules == ("linear_qkv", "router")
    assert trained.num_layers == 2 and trained.base_model == Path("/m")
    with pytest.raises(ValueError, match="meta.json: config.lora lacks 'lora_alpha'"):
        read_trained_model({"base_model": "/m", "config": {"lora": {"lora_rank": 4}}}, where="meta.json")


class _Stop(Exception):
    """Ends a caller right after its model is built."""


class _Calls(list):
    stop = False


@pytest.fixture
def builds(monkeypatch):
    """Every call of `build_lora_model` (wherever a module bound the name) with its info; with
    `builds.stop` set, the caller stops right after the build. The callers pass their layout on:
    none falls back on `groups.current()`."""
    real = build.build_lora_model
    calls = _Calls()

    def no_fallback():
        raise AssertionError("a caller did not pass its ParallelDims on")

    monkeypatch.setattr(groups, "current", no_fallback)

    def spy(*args, **kwargs):
        model, info = real(*args, **kwargs)
        calls.append((args, kwargs, info))
        if calls.stop:
            raise _Stop
        return model, info

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("megalora") and getattr(module, "build_lora_model", None) is real:
            monkeypatch.setattr(module, "build_lora_model", spy)
    monkeypatch.setattr(build, "build_lora_model", spy)
    return calls


@pytest.fixture(scope="module")
def per_projection_checkpoint(tmp_path_factory):
    """A checkpoint of a `lora_per_projection` run (fused layers: A [k*r, in], B block-diagonal),
    non-zero everywhere, made with the one builder."""
    from megalora.config import Config
    from megalora.train.checkpoint import save_checkpoint
    from megalora.train.model.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("per-projection")
    hf_dir = make_tiny_checkpoint("qwen3_next_a", root / "hf", seed=3)
    cfg = Config()
    cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_per_projection = RANK, 8.0, True
    dims = groups.initialize(device="cpu")
    try:
        model, info = build.build_lora_model(hf_dir, lora=LoraSpec.from_section(cfg.lora), dims=dims, seed=1)
        assert info.steps == ["build", "apply_lora", "split_fused_adapters"] and info.num_masked > 0
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in info.layout:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen) * getattr(p, "lora_block_mask", 1.0))
        ckpt = save_checkpoint(root / "run", step=1, model=model, optimizer=None, layout=info.layout,
                               meta={"base_model": str(hf_dir), "config": cfg.to_dict()}, save_optim=False,
                               save_rng=False, dims=dims)
    finally:
        groups.destroy()
    return hf_dir, ckpt


def test_export_merge_of_a_per_projection_run_verifies_through_the_builder(per_projection_checkpoint, builds,
                                                                          tmp_path):
    from megalora.export.run import export_checkpoint

    hf_dir, ckpt = per_projection_checkpoint
    lines: list[str] = []
    export_checkpoint(ckpt, tmp_path / "merged", mode="merge", log=lines.append)
    assert lines[-1].startswith("verify: ") and lines[-1].endswith("status=ok"), lines[-1]
    [(args, kwargs, info)] = builds
    assert Path(kwargs["checkpoint"]) == ckpt and "lora" not in kwargs
    assert info.steps == ["build", "apply_lora", "load_checkpoint"]
    assert info.lora.per_projection and info.lora.rank == RANK


def test_verify_with_an_adapter_imports_it_through_the_builder(per_projection_checkpoint, builds, tmp_path, capsys):
    from megalora.train.lora.peft_format import write_peft_adapter
    from megalora.train.verify_cli import cmd_verify

    hf_dir, ckpt = per_projection_checkpoint
    adapter = write_peft_adapter(ckpt, tmp_path / "adapter")
    assert cmd_verify(["--model", str(hf_dir), "--adapter", str(adapter), "--device", "cpu",
                       "--seq_length", "16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("status=ok")
    [(args, kwargs, info)] = builds
    assert Path(kwargs["adapter"]) == adapter and "lora" not in kwargs
    assert info.steps == ["build", "apply_lora", "load_peft_adapter"]
    assert info.lora.rank == RANK  # the adapter's own rank, fused layers widened at load


def test_training_builds_through_the_builder(train_assets, builds, tmp_path):
    from megalora.train.recipe import train

    cfg, extras = load_config(None, [
        "--model", str(train_assets.model_dir), "--dataset", f"{train_assets.data_file}#4", "--max_length", "256",
        "--micro_batch_size", "1", "--global_batch_size", "1", "--train_iters", "1", "--lora_rank", str(RANK),
        "--lora_per_projection", "true", "--save", str(tmp_path / "run")])
    builds.stop = True
    with pytest.raises(_Stop):
        train(cfg, extras)
    [(args, kwargs, info)] = builds
    assert kwargs["lora"] == LoraSpec.from_section(cfg.lora) and kwargs["adapter"] is None
    assert kwargs["dims"] == ParallelDims(world_size=1, device=kwargs["dims"].device)
    assert info.steps == ["build", "apply_lora", "split_fused_adapters"]


def test_a_folder_without_meta_is_a_user_error(tmp_path):
    """A wrong checkpoint folder is the user's mistake: one line (a UserError), not a traceback."""
    from megalora.errors import UserError
    from megalora.train.lora.build import build_lora_model

    with pytest.raises(UserError, match="no meta.json"):
        build_lora_model(tmp_path, checkpoint=tmp_path)
