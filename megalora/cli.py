"""`megalora` command line: thin entry points over the library.

    megalora sft [CONFIG.yaml] [--key value ...] [--dry-run]
    megalora plan [CONFIG.yaml] [--key value ...] [--num_gpus N]
    megalora verify [--model DIR] [--adapter DIR] [--key value ...]
    megalora export CHECKPOINT --out DIR [--merge | --adapter] [--key value ...]

Every command reads the one config tree (`megalora.config`); `megalora.commands` makes each
command's parser and --help from it. Errors of the user's input (`UserError`) print one line
and exit 2; any other exception keeps its traceback.

Each subcommand also runs as `python -m megalora ...` and `torchrun ... -m megalora ...`.
"""
from __future__ import annotations

import os
import shlex
import sys
import warnings

from megalora.commands import parse_command, render_help, wants_help
from megalora.config import check_layout, split_secret_flags
from megalora.errors import UserError
from megalora.train.launch import launch_env, run_sft

# The modules that do a command's work (the dry run, verify, export, plan) are imported when that
# command runs, on purpose: they pull in megatron-core, transformers and peft (2-10 s), which the
# launcher process (`megalora sft` only starts torchrun) and `--help` must not pay for.

USAGE = """\
usage: megalora <command> [args]

commands:
  sft      LoRA fine-tuning from a YAML config and --key value overrides
           (`megalora sft CONFIG --dry-run` validates config, layout and data and trains nothing)
  verify   compare megatron against transformers logits on a checkpoint
  export   merge a checkpoint's LoRA into HF safetensors (or write a PEFT adapter), verify, push
  plan     predict per-GPU memory and step FLOPs of a config's layout; does it fit on 80 / 141 GB GPUs

`megalora <command> --help` lists each command's options.
"""


def apply_env(env: dict) -> list[str]:
    """Set a YAML `ENV:` block's variables; one already set in the environment keeps its value (said)."""
    notes = []
    for name, value in env.items():
        if name in os.environ and os.environ[name] != value:
            notes.append(f"ENV.{name}={value} from the YAML not applied: the environment already sets "
                         f"{name}={os.environ[name]}")
        else:
            os.environ[name] = value
    return notes


def world_size_from_env() -> int:
    """The world size a launch would have (see `megalora.train.launch.launch_env`)."""
    return launch_env(dict(os.environ)).world_size


def how_to_launch(argv: list[str]):
    """For a layout that needs `n` ranks: the command line that launches them."""
    nnodes = os.environ.get("NNODES", "1")

    def hint(n: int) -> str:
        if nnodes not in ("", "1"):
            return f"NPROC_PER_NODE x NNODES must be a multiple of {n}"
        return f"NPROC_PER_NODE={n} megalora sft {shlex.join(argv)}".rstrip()

    return hint


def cmd_sft(argv: list[str]) -> int:
    if wants_help(argv):
        print(render_help("sft"))
        return 0
    # Libraries that record the command line (wandb's run metadata) never see a secret flag.
    sys.argv[1:] = split_secret_flags(sys.argv[1:])[0]
    parsed = parse_command("sft", argv)
    cfg, extras = parsed.config, parsed.extras
    for note in apply_env(extras.env):  # said here: after a relaunch the workers see the applied environment
        print(f"megalora: {note}", flush=True)
    from megalora.dry_run import dry_run as run_dry  # heavy: see the note at the top

    world_size = world_size_from_env()
    # The layout's degrees need no model: a wrong rank count stops here, before any launch.
    check_layout(cfg, world_size=world_size, how_to_launch=how_to_launch(argv))
    if parsed.dry_run:
        return run_dry(cfg, extras, world_size=world_size)
    return run_sft(cfg, extras, config_path=parsed.config_path, argv=argv)


# Messages from dependencies that say nothing to a megalora user (optional GPU libraries
# absent on CPU, deprecations inside megatron-core); real warnings still show.
QUIET_WARNINGS = (
    r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*",
    r".*all_gather_into_tensor` is deprecated.*",
    r".*reduce_scatter_tensor` is deprecated.*",
    r"full scope is deprecated.*",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"sft": cmd_sft, "verify": _cmd_verify, "export": _cmd_export, "plan": cmd_plan}
    if command not in commands:
        print(f"megalora: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[command](rest)
    except UserError as e:
        # User mistakes name the key, file or row: one line, no traceback. Anything else is a
        # bug and keeps its traceback (exit 1).
        print(f"megalora {command}: error: {e}", file=sys.stderr)
        return 2


def _cmd_verify(argv: list[str]) -> int:
    from megalora.train.verify_cli import cmd_verify

    return cmd_verify(argv)


def _cmd_export(argv: list[str]) -> int:
    from megalora.export.cli import cmd_export

    return cmd_export(argv)


def cmd_plan(argv: list[str]) -> int:
    """`megalora plan [CONFIG] [--key value ...] [--num_gpus N]`."""
    if wants_help(argv):
        print(render_help("plan"))
        return 0
    parsed = parse_command("plan", argv)
    cfg, num_gpus = parsed.config, parsed.own.num_gpus
    apply_env(parsed.extras.env)  # a YAML `ENV: {NPROC_PER_NODE: ...}` describes the launch being planned
    if num_gpus is None:
        launched = "WORLD_SIZE" in os.environ or "NPROC_PER_NODE" in os.environ
        num_gpus = world_size_from_env() if launched else 8
    from megalora.plan_model import model_config_for_plan
    from megalora.train.plan import plan_main

    print(plan_main(cfg, num_gpus=num_gpus, hf_config=model_config_for_plan(cfg)))
    return 0
