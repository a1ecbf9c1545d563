"""Every command reads the one config tree: a shared key has one spelling, default, help text and
value parser everywhere; user errors are one line naming the key (exit 2), anything else keeps
its traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megalora.cli import main
from megalora.commands import parse_command
from megalora.config import command_fields

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("sft", "plan", "verify", "export")


def _help_entries(command: str, capsys) -> dict[str, list[str]]:
    """`megalora <command> --help` as {key: its entry's lines}: the key line (without the ms-swift
    spellings sft adds) and the doc lines under it."""
    assert main([command, "--help"]) == 0
    entries, key = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --") and "(default: " in line or line.startswith("  ") and "(required)" in line:
            key = line.split()[0].lstrip("-").lower()
            entries[key] = [line.split(" (ms-swift")[0]]
        elif key is not None and line.startswith("      ") and not line.lstrip().startswith(("also spelt", "short:")):
            entries[key].append(line)
        else:
            key = None
    return entries


def test_shared_keys_have_one_help_text_and_default(capsys):
    entries = {command: _help_entries(command, capsys) for command in COMMANDS}
    for command in COMMANDS:
        assert set(entries[command]) == set(command_fields(command)), command
    shared_with_sft = {c: set(entries[c]) & set(entries["sft"]) for c in ("verify", "export", "plan")}
    assert {"tensor_model_parallel_size", "expert_model_parallel_size", "sequence_parallel", "torch_dtype", "model",
            "num_layers", "adapters", "seed"} <= shared_with_sft["verify"]
    assert {"hub", "hub_token", "hub_private", "max_shard_size", "push_to_hub", "allow_base_model_change"} <= \
        shared_with_sft["export"]
    assert shared_with_sft["plan"] == set(entries["sft"])
    for command, keys in shared_with_sft.items():
        for key in keys:
            assert entries[command][key] == entries["sft"][key], (command, key)
    assert "(default: 1)" in entries["verify"]["tensor_model_parallel_size"][0]
    # ... and the parsed defaults are the help's: the same field.
    sft, verify = parse_command("sft", []).config, parse_command("verify", []).config
    assert (verify.parallel, verify.model, verify.train.seed) == (sft.parallel, sft.model, sft.train.seed)


def test_shared_keys_parse_values_alike():
    flags = ["--sequence_parallel", "yes", "--tensor_model_parallel_size", "2", "--torch_dtype", "bfloat16"]
    sft, verify = parse_command("sft", flags).config, parse_command("verify", flags).config
    assert sft.parallel.sequence_parallel is verify.parallel.sequence_parallel is True
    assert sft.model.torch_dtype == verify.model.torch_dtype == "bfloat16"
    # Each command's own spellings keep working.
    assert parse_command("verify", ["--layers", "2", "--adapter", "a"]).config.model.num_layers == 2
    export = parse_command("export", ["ckpt", "--out", "o", "--adapter", "--private", "false"])
    assert (export.own.checkpoint, export.own.mode, export.config.export.hub_private) == ("ckpt", "adapter", False)
    assert parse_command("export", ["ckpt", "--out", "o"]).own.mode == "merge"
    assert parse_command("plan", ["--num_gpus", "16"]).own.num_gpus == 16


@pytest.mark.parametrize("argv, key", [
    (["sft", "--tensor_model_parallel_size", "two"], "tensor_model_parallel_size"),
    (["plan", "--num_gpus", "six"], "num_gpus"),
    (["verify", "--tensor_model_parallel_size", "two"], "tensor_model_parallel_size"),
    (["verify", "--sequence_parallel", "maybe"], "sequence_parallel"),
    (["verify", "--device", "tpu"], "device"),
    (["verify", "--torch_dtype", "float16"], "torch_dtype"),
    (["export", "ckpt", "--out", "o", "--hub_timeout", "soon"], "hub_timeout"),
    (["export", "ckpt", "--out", "o", "--merge", "--adapter"], "--adapter"),
    (["export", "ckpt"], "--out"),
])
def test_a_bad_value_is_one_line_naming_the_key(argv, key, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and err[0].startswith(f"megalora {argv[0]}: error: "), err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_typo_is_refused_with_a_suggestion(command, capsys):
    head = ["ckpt", "--out", "o"] if command == "export" else []
    typo, meant = {"sft": ("lora_rnak", "lora_rank"), "plan": ("num_gpu", "num_gpus"),
                   "verify": ("seq_lenght", "seq_length"), "export": ("verify_layer", "verify_layers")}[command]
    assert main([command, *head, f"--{typo}", "1"]) == 2
    err = capsys.readouterr().err
    assert f"unknown key `{typo}` (did you mean {meant}" in err, err


def test_a_key_of_another_command_is_unknown(capsys):
    assert main(["verify", "--lora_rank", "4"]) == 2
    assert "unknown key `lora_rank`" in capsys.readouterr().err


def _run_with(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`megalora <argv>` in a fresh interpreter after `patch` ran there (with the command's own
    warning filters in place first, as `main` sets them before it imports a command's module)."""
    quiet = "import warnings\nfrom megalora.cli import QUIET_WARNINGS\n" \
            "for p in QUIET_WARNINGS:\n    warnings.filterwarnings('ignore', message=p)\n"
    code = f"import sys\n{quiet}{patch}\nfrom megalora.cli import main\nsys.exit(main({argv!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("NPROC_PER_NODE", "NNODES", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_an_internal_value_error_keeps_its_traceback():
    """A ValueError from deep inside (an internal invariant) is a bug: traceback, exit 1; the same
    place raising a user error gives one line and exit 2."""
    deep = "megalora.train.plan"
    internal = _run_with(f"import {deep} as m\ndef boom(*a, **k):\n    raise ValueError('invariant broken')\n"
                         "m.memory_plan = boom", ["plan", "configs/demo.yaml"])
    assert internal.returncode == 1, internal.stderr[-2000:]
    assert "Traceback" in internal.stderr and "ValueError: invariant broken" in internal.stderr
    user = _run_with(f"import {deep} as m\nfrom megalora.data.errors import DataError\n"
                     "def boom(*a, **k):\n    raise DataError('data.jsonl:3: bad row')\nm.memory_plan = boom",
                     ["plan", "configs/demo.yaml"])
    assert user.returncode == 2 and user.stderr.strip() == "megalora plan: error: data.jsonl:3: bad row", user.stderr


def test_export_keeps_the_traceback_of_an_internal_error(tmp_path, monkeypatch):
    import megalora.export.cli as export_cli
    from megalora.export.cli import cmd_export

    def boom(*args, **kwargs):
        raise ValueError("invariant broken")

    monkeypatch.setattr(export_cli, "export_checkpoint", boom)
    with pytest.raises(ValueError, match="invariant broken"):
        cmd_export([str(tmp_path), "--out", str(tmp_path / "out"), "--verify", "false"])
