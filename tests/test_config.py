"""The config tree: YAML and flags as two spellings, validation naming the key at fault."""
from pathlib import Path

import pytest

from megalora.config import ConfigError, ModelShape, check_layout, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# The well-known 8-GPU recipe's flags, with `megatron sft` replaced by `megalora sft`.
RECIPE = """--model Qwen/Qwen3-Coder-Next --load_safetensors true --save_safetensors true --merge_lora true
--dataset AI-ModelScope/alpaca-gpt4-data-zh#500 AI-ModelScope/alpaca-gpt4-data-en#500 swift/self-cognition#500
--load_from_cache_file true --tuner_type lora --lora_rank 8 --lora_alpha 32 --target_modules all-linear
--expert_model_parallel_size 4 --moe_permute_fusion true --moe_grouped_gemm true --moe_shared_expert_overlap true
--moe_aux_loss_coeff 1e-3 --micro_batch_size 2 --global_batch_size 16 --recompute_granularity full
--recompute_method uniform --recompute_num_layers 1 --max_epochs 1 --finetune true --cross_entropy_loss_fusion true
--lr 1e-4 --lr_warmup_fraction 0.05 --min_lr 1e-5 --save megatron_output/Qwen3-Coder-Next --eval_interval 200
--save_interval 200 --max_length 2048 --num_workers 8 --dataset_num_proc 8 --no_save_optim true --no_save_rng true
--sequence_parallel true --attention_backend flash --model_author swift --model_name swift-robot""".split()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg, _ = load_config(path, [])
    # Each shipped recipe must also fit the world size it is written for.
    world = 2 if path.name == "demo.yaml" else 8
    degrees = check_layout(cfg, world_size=world)
    assert degrees["world_size"] == world
    assert degrees["dp"] * cfg.parallel.tensor_model_parallel_size == world


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "qwen3_coder_next_lora.yaml", "qwen3_30b_a3b_lora.yaml"}


def test_recipe_flags_are_understood_or_reported():
    with pytest.warns(UserWarning, match="sequence_parallel"):
        cfg, extras = load_config(None, RECIPE)
    assert cfg.model.model == "Qwen/Qwen3-Coder-Next"
    assert cfg.data.dataset == ["AI-ModelScope/alpaca-gpt4-data-zh#500", "AI-ModelScope/alpaca-gpt4-data-en#500",
                                "swift/self-cognition#500"]
    assert cfg.lora.lora_rank == 8 and cfg.lora.lora_alpha == 32.0
    assert cfg.parallel.expert_model_parallel_size == 4
    assert cfg.parallel.sequence_parallel is False  # TP=1: turned off with a warning
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.min_lr == pytest.approx(1e-5)
    assert cfg.train.recompute_granularity == "full" and cfg.train.recompute_num_layers == 1
    assert cfg.checkpoint.no_save_optim and cfg.checkpoint.no_save_rng
    assert cfg.data.model_author == ["swift"] and cfg.data.model_name == ["swift-robot"]
    assert extras.not_applicable == {"load_safetensors": True, "save_safetensors": True, "finetune": True}
    assert extras.gpu_fusions == {"moe_permute_fusion": True, "moe_grouped_gemm": True,
                                  "moe_shared_expert_overlap": True, "cross_entropy_loss_fusion": True,
                                  "attention_backend": "flash"}
    assert check_layout(cfg, world_size=8)["grad_accum"] == 1


def test_flags_override_yaml_and_sections_are_optional(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  lora_rank: 4\nlr: 0.5\n")
    cfg, _ = load_config(path, ["--lora_rank", "16", "--target_modules", "linear_qkv", "linear_proj"])
    assert cfg.lora.lora_rank == 16
    assert cfg.train.lr == 0.5
    assert cfg.lora.target_modules == ["linear_qkv", "linear_proj"]


@pytest.mark.parametrize("flags, message", [
    (["--lora_rnak", "8"], "unknown key `lora_rnak` (did you mean lora_rank"),
    (["--lora_rank", "eight"], "`lora_rank` expects an integer, got 'eight'"),
    (["--sequence_parallel", "maybe"], "`sequence_parallel` expects true or false"),
    (["--lr", "fast"], "`lr` expects a number"),
    (["--recompute_granularity", "everything"], "`recompute_granularity` must be one of full, selective"),
    (["--pipeline_model_parallel_size", "2"], "pipeline parallelism is not supported yet"),
    (["--expert_tensor_parallel_size", "2"], "`expert_tensor_parallel_size`=2: only 1 is supported"),
    (["--lora_rank", "0"], "`lora_rank` must be >= 1; got 0"),
    (["--recompute_method", "block"], "needs recompute_granularity=full"),
])
def test_bad_flags_name_the_key(flags, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, flags)
    assert message in str(err.value)


def test_bad_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  micro_batch_size: two\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.micro_batch_size: `micro_batch_size` expects an integer"):
        load_config(path, [])
    path.write_text("lora:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="key `lr` belongs in section `train`, not `lora`"):
        load_config(path, [])
    path.write_text("lora: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path, [])


def test_sequence_parallel_without_tp_warns_and_turns_off():
    with pytest.warns(UserWarning, match="no effect with tensor_model_parallel_size=1"):
        cfg, _ = load_config(None, ["--sequence_parallel", "true"])
    assert cfg.parallel.sequence_parallel is False
    cfg, _ = load_config(None, ["--sequence_parallel", "true", "--tensor_model_parallel_size", "2"])
    assert cfg.parallel.sequence_parallel is True


SHAPE = ModelShape(num_experts=8, num_attention_heads=4, num_query_groups=2, num_linear_key_heads=2,
                   num_linear_value_heads=4, source="tiny")


@pytest.mark.parametrize("flags, world, message", [
    (["--tensor_model_parallel_size", "3"], 4, "world size 4 is not divisible by `tensor_model_parallel_size`=3"),
    (["--expert_model_parallel_size", "3"], 4, "world size 4 is not divisible by `expert_model_parallel_size`=3"),
    (["--expert_model_parallel_size", "3"], 3, "`expert_model_parallel_size`=3 does not divide the 8 experts of tiny"),
    (["--tensor_model_parallel_size", "4", "--global_batch_size", "4"], 4,
     "`tensor_model_parallel_size`=4 does not divide the 2 query groups"),
    (["--global_batch_size", "6", "--micro_batch_size", "4"], 1, "`global_batch_size`=6 is not a multiple"),
])
def test_layout_validation_names_key_and_numbers(flags, world, message):
    cfg, _ = load_config(None, flags)
    with pytest.raises(ConfigError) as err:
        check_layout(cfg, world_size=world, shape=SHAPE)
    assert message in str(err.value)


def test_layout_degrees():
    cfg, _ = load_config(None, ["--tensor_model_parallel_size", "2", "--expert_model_parallel_size", "4",
                                "--micro_batch_size", "2", "--global_batch_size", "16"])
    d = check_layout(cfg, world_size=8, shape=SHAPE)
    assert (d["tp"], d["ep"], d["dp"], d["expert_dp"], d["grad_accum"]) == (2, 4, 4, 2, 2)
