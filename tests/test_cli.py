"""The command line, run as users run it: subprocesses, torchrun, exit codes and messages."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _run(args, *, env_extra=None, timeout=900, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("NPROC_PER_NODE", "NNODES", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(env_extra or {})
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands_and_config_keys():
    top = _run([sys.executable, "-m", "megalora", "--help"])
    assert top.returncode == 0
    for command in ("sft", "verify", "export"):
        assert f"  {command}" in top.stdout
    sft = _run([sys.executable, "-m", "megalora", "sft", "--help"])
    assert sft.returncode == 0
    for key in ("--lora_rank", "--expert_model_parallel_size", "--sequence_parallel", "--recompute_granularity",
                "--dry-run", "--load_safetensors", "--moe_permute_fusion"):
        assert key in sft.stdout


def test_dry_run_rejects_ep_not_dividing_the_experts(demo_assets):
    r = _run([sys.executable, "-m", "megalora", "sft", "configs/demo.yaml", "--dry-run", "--model",
              str(demo_assets.model_dir), "--expert_model_parallel_size", "3", "--global_batch_size", "12"],
             env_extra={"NPROC_PER_NODE": "3"})
    assert r.returncode != 0
    assert "`expert_model_parallel_size`=3 does not divide the 8 experts" in r.stderr


def test_dry_run_prints_layout_and_data(demo_assets):
    r = _run([sys.executable, "-m", "megalora", "sft", "configs/demo.yaml", "--dry-run", "--model",
              str(demo_assets.model_dir), "--dataset", f"{demo_assets.data_file}#40"],
             env_extra={"NPROC_PER_NODE": "2"})
    assert r.returncode == 0, r.stderr
    assert "rank  tp  ep  dp  expert_dp  experts" in r.stdout
    assert "   0   0   0   0          0  0-3" in r.stdout and "   1   0   1   1          0  4-7" in r.stdout
    assert "data[train]: 40 rows read, 40 kept, 0 skipped" in r.stdout
    assert "[[" in r.stdout and "<|im_end|>]]" in r.stdout  # trained tokens marked
    assert "dry run: ok (nothing was trained)" in r.stdout


def test_eight_gpu_recipe_passes_dry_run_with_local_model_and_data(demo_assets):
    """The well-known 8-GPU command with `megatron sft` replaced by `megalora sft`, `--model` and
    `--dataset` pointed at local files; validated for 8 ranks, nothing launched."""
    data = str(demo_assets.data_file)
    recipe = f"""--model {demo_assets.model_dir} --load_safetensors true --save_safetensors true --merge_lora true
    --dataset {data}#50 {data}#50 {data}#50 --load_from_cache_file true --tuner_type lora --lora_rank 8
    --lora_alpha 32 --target_modules all-linear --expert_model_parallel_size 4 --moe_permute_fusion true
    --moe_grouped_gemm true --moe_shared_expert_overlap true --moe_aux_loss_coeff 1e-3 --micro_batch_size 2
    --global_batch_size 16 --recompute_granularity full --recompute_method uniform --recompute_num_layers 1
    --max_epochs 1 --finetune true --cross_entropy_loss_fusion true --lr 1e-4 --lr_warmup_fraction 0.05
    --min_lr 1e-5 --save megatron_output/Qwen3-Coder-Next --eval_interval 200 --save_interval 200
    --max_length 2048 --num_workers 8 --dataset_num_proc 8 --no_save_optim true --no_save_rng true
    --sequence_parallel true --attention_backend flash --model_author swift --model_name swift-robot""".split()
    r = _run([sys.executable, "-m", "megalora", "sft", *recipe, "--dry-run"], env_extra={"NPROC_PER_NODE": "8"})
    assert r.returncode == 0, r.stderr
    assert "layout: world 8 = TP 1 x DP 8; experts: EP 4 x expert-DP 2" in r.stdout
    assert "`sequence_parallel` has no effect with tensor_model_parallel_size=1" in r.stderr
    assert "--load_safetensors True: not applicable" in r.stdout
    assert "--moe_permute_fusion True: accepted, nothing to apply" in r.stdout
    assert "data[train]: 150 rows read, 150 kept" in r.stdout
    assert not (ROOT / "megatron_output").exists()


def test_verify_one_rank_and_torchrun_tp2_ep2_sp(demo_assets):
    one = _run([sys.executable, "-m", "megalora", "verify", "--model", str(demo_assets.model_dir)])
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip().splitlines()[-1].endswith("status=ok")
    four = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "-m", "megalora", "verify",
                 "--model", str(demo_assets.model_dir), "--tensor_model_parallel_size", "2",
                 "--expert_model_parallel_size", "2", "--sequence_parallel", "true"], timeout=900)
    assert four.returncode == 0, four.stderr[-3000:]
    lines = [l for l in four.stdout.splitlines() if l.startswith("verify: ")]
    assert len(lines) == 1 and lines[0].endswith("status=ok")
    rel = float(lines[0].split("rel_l2=")[1].split()[0])
    assert rel <= 1e-5


def test_demo_main_command_trains_and_halves_the_loss(tmp_path):
    """README's main job: `megalora sft configs/demo.yaml` relaunches itself under torchrun on 2
    CPU ranks with EP=2, makes the tiny model and data, and the loss falls to half or less."""
    run = tmp_path / "demo"
    r = _run([sys.executable, "-m", "megalora", "sft", "configs/demo.yaml", "--save", str(run)],
             env_extra={"NPROC_PER_NODE": "2"}, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "launching" in r.stdout and "--nproc_per_node=2" in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 61))
    assert rows[-1]["loss"] <= rows[0]["loss"] / 2, (rows[0]["loss"], rows[-1]["loss"])
    assert (run / "checkpoint-60" / "adapter_model.safetensors").is_file()
    assert "megalora: loss" in r.stdout


def test_adapter_export_verify_and_continue(train_assets, tmp_path):
    """Train a little, export the PEFT adapter, check it with `verify --adapter` (peft on
    transformers vs our LoRA modules) on 1 rank and on TP=2 x EP=2 + SP, then start a new run
    from it with `--adapters`."""
    run = tmp_path / "run"
    common = ["--model", str(train_assets.model_dir), "--dataset", f"{train_assets.data_file}#8", "--max_length",
              "512", "--micro_batch_size", "2", "--global_batch_size", "2", "--lr", "1e-2", "--lora_rank", "4"]
    r = _run([sys.executable, "-m", "megalora", "sft", *common, "--train_iters", "2", "--save", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    adapter = tmp_path / "adapter"
    r = _run([sys.executable, "-m", "megalora", "export", str(run / "checkpoint-2"), "--out", str(adapter), "--adapter"])
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(train_assets.model_dir)
    one = _run([sys.executable, "-m", "megalora", "verify", "--model", str(train_assets.model_dir), "--adapter",
                str(adapter)])
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.strip().splitlines()[-1].endswith("status=ok")
    four = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "-m", "megalora", "verify",
                 "--model", str(train_assets.model_dir), "--adapter", str(adapter), "--tensor_model_parallel_size",
                 "2", "--expert_model_parallel_size", "2", "--sequence_parallel", "true"])
    assert four.returncode == 0, four.stderr[-3000:]
    assert [l for l in four.stdout.splitlines() if l.startswith("verify: ")][-1].endswith("status=ok")
    cont = tmp_path / "continued"
    r = _run([sys.executable, "-m", "megalora", "sft", *common, "--train_iters", "1", "--lr", "0", "--min_lr", "0",
              "--adapters", str(adapter), "--save", str(cont)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"started from the PEFT adapter {adapter}" in r.stdout
    # Both runs see the same first batch (same data seed). With lr 0 the new run's first loss is
    # that of the loaded adapter, below the base model's loss on that batch (the first run's
    # step 1, where B was still zero).
    first = json.loads((cont / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    base = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first < base - 1e-3, (first, base)


def test_plan_flagship_recipe_on_8_gpus_of_80_and_141_gb():
    r = _run([sys.executable, "-m", "megalora", "plan", "configs/qwen3_coder_next_lora.yaml"],
             env_extra={"HF_HUB_OFFLINE": "1", "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layout: 8 GPUs, TP=1 EP=4 DP=8" in r.stdout
    assert "512 experts top-10" in r.stdout
    lines = {l.split(":")[0]: l for l in r.stdout.splitlines() if l.startswith(("80 GB GPU", "141 GB GPU"))}
    assert set(lines) == {"80 GB GPU", "141 GB GPU"}
    total = float(next(l.split()[-1] for l in r.stdout.splitlines() if l.startswith("total")))
    for gb, line in ((80, lines["80 GB GPU"]), (141, lines["141 GB GPU"])):
        assert ("fits" in line and "does not fit" not in line) == (total <= gb), line
    bad = _run([sys.executable, "-m", "megalora", "plan", "configs/qwen3_coder_next_lora.yaml", "--num_gpus", "6"],
               env_extra={"HF_HUB_OFFLINE": "1", "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"})
    assert bad.returncode == 2 and "expert_model_parallel_size" in bad.stderr


# --- ms-swift scripts, run with nothing but the program name changed ---------------------------
# Written in the style of ms-swift's Megatron examples (ms-swift 4 and ms-swift 3 spellings); the
# hub ids are replaced by local tiny models and data made at test time.

SWIFT4_QWEN3_NEXT = r"""
PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' \
NPROC_PER_NODE=8 \
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
megatron sft \
    --model {model} \
    --load_safetensors true \
    --save_safetensors true \
    --mtp_num_layers 1 \
    --dataset '{data}#800' \
    --load_from_cache_file true \
    --loss_scale ignore_empty_think \
    --split_dataset_ratio 0.01 \
    --tuner_type lora \
    --lora_rank 8 \
    --lora_alpha 32 \
    --target_modules all-linear \
    --expert_model_parallel_size 4 \
    --moe_permute_fusion true \
    --moe_grouped_gemm true \
    --moe_shared_expert_overlap true \
    --moe_aux_loss_coeff 1e-6 \
    --micro_batch_size 1 \
    --global_batch_size 16 \
    --recompute_granularity full \
    --recompute_method uniform \
    --recompute_num_layers 1 \
    --num_train_epochs 1 \
    --finetune true \
    --cross_entropy_loss_fusion true \
    --lr 1e-4 \
    --lr_warmup_fraction 0.05 \
    --min_lr 1e-5 \
    --output_dir {out} \
    --eval_steps 200 \
    --save_steps 200 \
    --logging_steps 5 \
    --max_length 2048 \
    --dataloader_num_workers 8 \
    --dataset_num_proc 8 \
    --no_save_optim true \
    --no_save_rng true \
    --sequence_parallel true \
    --attention_backend flash \
    --padding_free true \
    --masked_softmax_fusion false \
    --model_author swift \
    --model_name swift-robot
"""

SWIFT3_QWEN3_MOE = r"""
PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' \
NPROC_PER_NODE=2 \
CUDA_VISIBLE_DEVICES=0,1 \
megatron sft \
    --model {model} \
    --model_type qwen3_moe \
    --dataset '{data}#800' \
    --system 'You are a helpful assistant.' \
    --loss_scale ignore_empty_think \
    --train_type lora \
    --lora_rank 8 \
    --lora_alpha 32 \
    --target_modules all-linear \
    --split_dataset_ratio 0.01 \
    --expert_model_parallel_size 2 \
    --moe_permute_fusion true \
    --moe_grouped_gemm true \
    --moe_shared_expert_overlap true \
    --moe_aux_loss_coeff 1e-3 \
    --micro_batch_size 4 \
    --global_batch_size 16 \
    --recompute_granularity full \
    --recompute_method uniform \
    --recompute_num_layers 1 \
    --max_epochs 1 \
    --finetune true \
    --cross_entropy_loss_fusion true \
    --lr 1e-4 \
    --lr_warmup_fraction 0.05 \
    --min_lr 1e-5 \
    --save {out} \
    --eval_interval 200 \
    --save_interval 200 \
    --max_length 2048 \
    --num_workers 8 \
    --dataset_num_proc 8 \
    --no_save_optim true \
    --no_save_rng true \
    --sequence_parallel true \
    --attention_backend flash \
    --model_author swift \
    --model_name swift-robot
"""

# Alibaba Cloud DLC: WORLD_SIZE is the node count and RANK the node rank.
MULTI_NODE = r"""
WORLD_SIZE=2 RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
NNODES=$WORLD_SIZE \
NODE_RANK=$RANK \
NPROC_PER_NODE=4 \
megatron sft \
    --model {model} \
    --dataset '{data}#64' \
    --tuner_type lora \
    --tensor_model_parallel_size 2 \
    --sequence_parallel true \
    --expert_model_parallel_size 2 \
    --micro_batch_size 2 \
    --global_batch_size 16 \
    --num_train_epochs 1 \
    --output_dir {out}
"""

PIPELINE = r"""
NPROC_PER_NODE=4 \
megatron sft \
    --model {model} \
    --dataset '{data}#64' \
    --tuner_type lora \
    --tensor_model_parallel_size 2 \
    --pipeline_model_parallel_size 2 \
    --decoder_first_pipeline_num_layers 5 \
    --micro_batch_size 1 \
    --global_batch_size 4 \
    --output_dir {out}
"""


def _run_swift_script(script, monkeypatch, capsys, **paths):
    """Run an ms-swift shell command with `megatron` replaced by `megalora`, in this process."""
    import shlex

    from megalora.cli import main

    tokens = shlex.split(script.format(**paths).replace("\\\n", " "))
    env = {}
    while "=" in tokens[0]:
        name, value = tokens.pop(0).split("=", 1)
        env[name] = env[value[1:]] if value.startswith("$") else value
    assert tokens[:2] == ["megatron", "sft"]
    for key in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["sft", *tokens[2:], "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def qwen3_moe_dir(demo_assets, tmp_path_factory):
    import shutil

    from transformers import AutoTokenizer

    from megalora.train.model.tiny import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("qwen3-moe")
    size = len(AutoTokenizer.from_pretrained(demo_assets.model_dir))
    make_tiny_checkpoint("qwen3_moe", out, overrides={"vocab_size": size + (-size % 8)})
    for f in demo_assets.model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_ms_swift_4_qwen3_next_script_passes_dry_run(demo_assets, tmp_path, monkeypatch, capsys):
    code, out, err = _run_swift_script(SWIFT4_QWEN3_NEXT, monkeypatch, capsys, model=demo_assets.model_dir,
                                       data=demo_assets.data_file, out=tmp_path / "run")
    assert code == 0, err
    assert "layout: world 8 = TP 1 x DP 8; experts: EP 4 x expert-DP 2" in out
    for line in ("--mtp_num_layers 1: not applicable", "--padding_free True: not applicable",
                 "--masked_softmax_fusion False: not applicable", "--finetune True: not applicable",
                 "--save_safetensors True: not applicable", "--moe_permute_fusion True: accepted, nothing to apply"):
        assert line in out
    assert "tuner_type not given" not in out
    assert "data[val]: 8 rows read" in out and "data[val]: 1 micro-batches per rank per epoch" in out
    assert f"save: {tmp_path / 'run'}" in out and "max_epochs: 1" in out and "log_interval: 5" in out
    assert "loss_scale: ignore_empty_think" in out


def test_ms_swift_3_qwen3_moe_script_passes_dry_run(qwen3_moe_dir, demo_assets, tmp_path, monkeypatch, capsys):
    code, out, err = _run_swift_script(SWIFT3_QWEN3_MOE, monkeypatch, capsys, model=qwen3_moe_dir,
                                       data=demo_assets.data_file, out=tmp_path / "run")
    assert code == 0, err
    assert "(qwen3_moe)" not in err
    assert "layout: world 2 = TP 1 x DP 2; experts: EP 2 x expert-DP 1" in out
    assert "--model_type qwen3_moe: not applicable (the architecture is read from the model's config.json)" in out
    assert "system: You are a helpful assistant." in out and "tuner_type: lora" in out
    assert "data[train]: 49 optimizer steps per epoch" in out


def test_multi_node_dlc_environment_passes_dry_run(demo_assets, tmp_path, monkeypatch, capsys):
    code, out, err = _run_swift_script(MULTI_NODE, monkeypatch, capsys, model=demo_assets.model_dir,
                                       data=demo_assets.data_file, out=tmp_path / "run")
    assert code == 0, err
    assert "layout: world 8 = TP 2 x DP 4; experts: EP 2 x expert-DP 4" in out


def test_pipeline_parallel_script_is_refused(demo_assets, tmp_path, monkeypatch, capsys):
    code, out, err = _run_swift_script(PIPELINE, monkeypatch, capsys, model=demo_assets.model_dir,
                                       data=demo_assets.data_file, out=tmp_path / "run")
    assert code == 2
    assert "pipeline parallelism is not supported" in err and len(err.strip().splitlines()) == 1


def test_dry_run_catches_an_eval_split_too_small_for_the_layout(demo_assets, monkeypatch, capsys):
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    from megalora.cli import main

    code = main(["sft", "configs/demo.yaml", "--dry-run", "--model", str(demo_assets.model_dir), "--dataset",
                 f"{demo_assets.data_file}#64", "--split_dataset_ratio", "0.01", "--micro_batch_size", "1",
                 "--global_batch_size", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data[val]: 1 samples cannot fill one micro-batch of 1 on each of 2 data-parallel ranks" in err


def test_dry_run_checks_lora_targets_without_weights(demo_assets, monkeypatch, capsys):
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    from megalora.cli import main

    code = main(["sft", "configs/demo.yaml", "--dry-run", "--model", str(demo_assets.model_dir), "--target_modules",
                 "linear_qkvv"])
    assert code == 2 and "lora.target_modules: unknown ['linear_qkvv']" in capsys.readouterr().err


def test_too_few_ranks_says_how_to_launch(monkeypatch, capsys):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from megalora.cli import main

    assert main(["sft", "configs/demo.yaml"]) == 2
    assert "launch 2 ranks: NPROC_PER_NODE=2 megalora sft configs/demo.yaml" in capsys.readouterr().err


def test_yaml_env_block_sets_the_launch(demo_assets, tmp_path):
    """A YAML in ms-swift's form, `ENV:` block included, run by the real command line."""
    path = tmp_path / "sft.yaml"
    path.write_text(f"""ENV:
  NPROC_PER_NODE: 2
  CUDA_VISIBLE_DEVICES: 0,1
model: {demo_assets.model_dir}
dataset: ['{demo_assets.data_file}#40']
tuner_type: lora
expert_model_parallel_size: 2
micro_batch_size: 2
global_batch_size: 8
num_train_epochs: 1
output_dir: {tmp_path / 'run'}
save_steps: 10
""")
    r = _run([sys.executable, "-m", "megalora", "sft", str(path), "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert "layout: world 2 = TP 1 x DP 2" in r.stdout
    assert "ENV (from the YAML): NPROC_PER_NODE=2 CUDA_VISIBLE_DEVICES=0,1" in r.stdout
    kept = _run([sys.executable, "-m", "megalora", "sft", str(path), "--dry-run"],
                env_extra={"NPROC_PER_NODE": "4", "WORLD_SIZE": ""})
    assert kept.returncode == 0, kept.stderr
    assert "layout: world 4 = TP 1 x DP 4" in kept.stdout
    assert "ENV.NPROC_PER_NODE=2 from the YAML not applied: the environment already sets NPROC_PER_NODE=4" in kept.stdout


def test_plan_reads_the_launch_from_a_yaml_env_block(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("ENV:\n  NPROC_PER_NODE: 4\n" + (ROOT / "configs" / "qwen3_coder_next_lora.yaml").read_text())
    r = _run([sys.executable, "-m", "megalora", "plan", str(path)],
             env_extra={"HF_HUB_OFFLINE": "1", "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layout: 4 GPUs, TP=1 EP=4 DP=4" in r.stdout
