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
    assert extras.gpu_fusions == {"moe_permute_fusion": True, "moe_shared_expert_overlap": True,
                                  "cross_entropy_loss_fusion": True, "attention_backend": "flash"}
    assert cfg.model.moe_grouped_gemm is True  # a real key: grouped experts (false: the loop reference)
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


# --- ms-swift spellings, reported and refused keys, hints, ENV, launch environments ---------------

from megalora.config import FIELDS, suggestions  # noqa: E402
from megalora.swift_keys import ALIASES, REFUSED, REPORTED  # noqa: E402


@pytest.mark.parametrize("alias, value, section, key, expected", [
    ("num_train_epochs", "3", "train", "max_epochs", 3),
    ("output_dir", "out/run", "checkpoint", "save", "out/run"),
    ("save_steps", "50", "checkpoint", "save_interval", 50),
    ("eval_steps", "20", "train", "eval_interval", 20),
    ("logging_steps", "5", "train", "log_interval", 5),
    ("dataloader_num_workers", "2", "data", "num_workers", 2),
    ("train_type", "lora", "lora", "tuner_type", "lora"),
    ("no_save_rng_state", "true", "checkpoint", "no_save_rng", True),
])
def test_each_ms_swift_alias_sets_our_key(alias, value, section, key, expected, tmp_path):
    assert ALIASES[alias] == key
    cfg, _ = load_config(None, [f"--{alias}", value])
    assert getattr(getattr(cfg, section), key) == expected
    path = tmp_path / "c.yaml"
    path.write_text(f"{alias}: {value}\n")
    cfg, _ = load_config(path, [])
    assert getattr(getattr(cfg, section), key) == expected


def test_two_spellings_conflict_in_one_command_line_or_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"`save`='b' conflicts with `output_dir`='a' \(--output_dir\): both spell"):
        load_config(None, ["--output_dir", "a", "--save", "b"])
    path = tmp_path / "c.yaml"
    path.write_text("train_type: lora\nnum_train_epochs: 2\nmax_epochs: 3\n")
    with pytest.raises(ConfigError, match="c.yaml: max_epochs: `max_epochs`=3 conflicts with `num_train_epochs`=2"):
        load_config(path, [])
    # The same value twice is no conflict; a flag overriding the YAML's other spelling is the usual override.
    cfg, _ = load_config(None, ["--num_train_epochs", "2", "--max_epochs", "2"])
    assert cfg.train.max_epochs == 2
    path.write_text("num_train_epochs: 2\n")
    cfg, _ = load_config(path, ["--max_epochs", "5"])
    assert cfg.train.max_epochs == 5


def test_tuner_type_absent_is_said_and_anything_but_lora_refused():
    _, extras = load_config(None, [])
    assert extras.notes[0].startswith("tuner_type not given: LoRA is trained")
    _, extras = load_config(None, ["--tuner_type", "lora"])
    assert not any("tuner_type" in n for n in extras.notes)
    for flag in ("--tuner_type", "--train_type"):
        for value in ("full", "lora_llm", "adalora"):
            with pytest.raises(ConfigError, match=f"`tuner_type`={value} is refused: megalora trains LoRA only"):
                load_config(None, [flag, value])


def test_reported_keys_are_named_with_their_reason():
    from megalora.train.inputs import describe_extras

    flags = [x for key in REPORTED for x in (f"--{key}", "false")]
    _, extras = load_config(None, flags)
    lines = describe_extras(extras)
    for key, reason in REPORTED.items():
        assert f"--{key} False: not applicable ({reason})" in lines


def test_fused_kernel_keys_say_what_runs_instead():
    from megalora.config import GPU_FUSIONS
    from megalora.train.inputs import describe_extras

    _, extras = load_config(None, [x for key in GPU_FUSIONS for x in (f"--{key}", "true")])
    lines = describe_extras(extras)
    for key, (_, what_runs) in GPU_FUSIONS.items():
        assert f"--{key} {'true' if key == 'attention_backend' else True}: accepted, nothing to apply ({what_runs})" in lines


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_refused_keys_stop_with_their_reason(key):
    allowed, reason = REFUSED[key]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"--{key}", "something_else"])
    assert f"`{key}`='something_else' is refused: {reason}" in str(err.value)
    for value in allowed:
        _, extras = load_config(None, [f"--{key}", str(value).lower()] if value != [] else [])
        if value != []:
            assert any(line.startswith(f"--{key} ") and "accepted" in line for line in extras.notes)


def test_pipeline_parallel_script_is_refused_with_its_reason():
    flags = ["--tuner_type", "lora", "--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2",
             "--decoder_first_pipeline_num_layers", "5"]
    with pytest.raises(ConfigError, match="pipeline parallelism is not supported"):
        load_config(None, flags)


@pytest.mark.parametrize("typo, first", [
    ("eval_step", "eval_steps"), ("output_dirr", "output_dir"), ("lora_rnak", "lora_rank"),
    ("save_step", "save_steps"), ("num_train_epoch", "num_train_epochs"), ("model_nam", "model_name"),
    # Other trainers' names: the key that means it, not a look-alike (max_steps is not max_epochs,
    # gradient_accumulation_steps is not gradient_accumulation_fusion).
    ("max_steps", "train_iters"), ("gradient_accumulation_steps", "global_batch_size"), ("learning_rate", "lr"),
])
def test_hints_rank_the_intended_key_first(typo, first):
    from megalora.swift_keys import SEE_ALSO

    assert set(SEE_ALSO.values()) <= set(FIELDS)
    close = suggestions(typo)
    assert close[0] == first, close
    assert len(close) == len(set(close))


def test_hints_never_offer_a_shape_changing_key_for_another():
    for typo in ("mtp_num_layer", "mtp_layers", "num_mtp_layers", "num_layer_mtp"):
        assert "num_layers" not in suggestions(typo), typo
    assert suggestions("num_layer")[0] == "num_layers"
    # mtp_num_layers itself is known: reported, the model is not truncated.
    cfg, extras = load_config(None, ["--mtp_num_layers", "1"])
    assert cfg.model.num_layers is None and extras.not_applicable == {"mtp_num_layers": 1}


def test_unknown_key_message_lists_each_hint_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--model_nam", "x"])
    hint = str(err.value).split("did you mean ")[1].rstrip("?)").split(", ")
    assert hint[0] == "model_name" and len(hint) == len(set(hint))


def test_yaml_env_block(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ENV:\n  NPROC_PER_NODE: 2\n  CUDA_VISIBLE_DEVICES: 0,1\n  USE_X: true\ntuner_type: lora\n")
    _, extras = load_config(path, [])
    assert extras.env == {"NPROC_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1", "USE_X": "true"}
    path.write_text("ENV: [a]\n")
    with pytest.raises(ConfigError, match="ENV: expected a mapping"):
        load_config(path, [])
    path.write_text("ENV:\n  A: {b: 1}\n")
    with pytest.raises(ConfigError, match="ENV.A: expected a string or number"):
        load_config(path, [])


def test_loss_scale_and_system_keys():
    cfg, _ = load_config(None, ["--loss_scale", "ignore_empty_think", "--system", "You are a helpful assistant."])
    assert cfg.data.loss_scale == "ignore_empty_think" and cfg.data.system == "You are a helpful assistant."
    with pytest.raises(ConfigError, match="`loss_scale` must be one of default, ignore_empty_think; got 'react'"):
        load_config(None, ["--loss_scale", "react"])


@pytest.mark.parametrize("env, world, nnodes, node_rank", [
    ({}, 1, 1, 0),
    ({"NPROC_PER_NODE": "8"}, 8, 1, 0),
    ({"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, 16, 2, 1),
    # Alibaba Cloud DLC: WORLD_SIZE / RANK are node values; scripts pass NNODES=$WORLD_SIZE NODE_RANK=$RANK.
    ({"WORLD_SIZE": "2", "RANK": "1", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8",
      "MASTER_ADDR": "dlc-master"}, 16, 2, 1),
    # SLURM stands in for NNODES / NODE_RANK.
    ({"SLURM_NNODES": "4", "SLURM_NODEID": "3", "NPROC_PER_NODE": "8", "MASTER_ADDR": "n0"}, 32, 4, 3),
    # A torchrun worker: WORLD_SIZE is the rank count.
    ({"WORLD_SIZE": "16", "LOCAL_RANK": "3", "RANK": "11", "TORCHELASTIC_RUN_ID": "x"}, 16, None, None),
])
def test_launch_environments_give_the_world_size(env, world, nnodes, node_rank):
    from megalora.train.launch import launch_env

    launch = launch_env(env)
    assert launch.world_size == world
    if nnodes is not None:
        assert (launch.nnodes, launch.node_rank) == (nnodes, node_rank)


@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "8", "NNODES": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "a"}, "WORLD_SIZE=4 is neither"),
    ({"NPROC_PER_NODE": "8", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but NNODES is not"),
    ({"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"NPROC_PER_NODE": "8", "NNODES": "2"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE='eight' is not an integer"),
    ({"NNODES": "2"}, "NNODES=2 is set but NPROC_PER_NODE is not"),
    ({"NPROC_PER_NODE": "8", "NNODES": "2", "SLURM_NNODES": "3", "MASTER_ADDR": "a"},
     "NNODES=2 disagrees with SLURM's SLURM_NNODES=3"),
])
def test_inconsistent_launch_environment_names_the_variable(env, message):
    from megalora.train.launch import launch_env

    with pytest.raises(ConfigError, match=message):
        launch_env(env)


def test_too_few_ranks_says_how_to_launch():
    cfg, _ = load_config(ROOT / "configs" / "demo.yaml", [])
    with pytest.raises(ConfigError) as err:
        check_layout(cfg, world_size=1, how_to_launch=lambda n: f"NPROC_PER_NODE={n} megalora sft configs/demo.yaml")
    assert str(err.value).endswith("launch 2 ranks: NPROC_PER_NODE=2 megalora sft configs/demo.yaml")


def test_readme_table_names_every_ms_swift_key_we_know():
    from megalora.config import GPU_FUSIONS

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## ms-swift scripts"):]
    table = table[:table.index("\n## ")]
    ours_only = {"num_layers", "strict", "loss_on", "lora_dtype", "exclude_modules", "lora_per_projection", "resume",
                 "wandb_mode", "max_shard_size", "hub", "hub_private", "commit_message", "template_mode",
                 "chat_template_kwargs", "dump_encoded", "allow_base_model_change", "hub_timeout", "stop_grace_period"}
    keys = set(ALIASES) | set(REPORTED) | set(REFUSED) | set(GPU_FUSIONS) | (set(FIELDS) - ours_only)
    missing = sorted(k for k in keys if f"`{k}`" not in table)
    assert not missing, missing


def test_help_documents_each_alias_and_reported_key(capsys):
    from megalora.cli import main

    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    from megalora.swift_keys import SWIFT3_NAMES, SWIFT4_NAMES

    for names, dialect in ((SWIFT4_NAMES, "ms-swift 4"), (SWIFT3_NAMES, "ms-swift 3")):
        for alias, key in names.items():
            line = next(l for l in out.splitlines() if l.startswith(f"  --{key} "))
            assert f"({dialect}: --{alias})" in line
    for key, reason in REPORTED.items():
        assert f"  --{key}: {reason}" in out
    for key, (_, reason) in REFUSED.items():
        assert f"  --{key}" in out and reason in out
