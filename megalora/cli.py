"""`megalora` command line: thin entry points over the library.

    megalora sft [CONFIG.yaml] [--key value ...] [--dry-run]
    megalora verify --model DIR [--adapter DIR] [--layers N] [--tensor_model_parallel_size N] ...
    megalora export CHECKPOINT --out DIR [--merge | --adapter] [--push_to_hub ID --hub modelscope|huggingface]

Each subcommand also runs as `python -m megalora ...` and `torchrun ... -m megalora ...`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
import warnings

from megalora.config import FIELDS, GPU_FUSIONS, SECTIONS, ConfigError
from megalora.swift_keys import REFUSED, REPORTED, SWIFT3_NAMES, SWIFT4_NAMES

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


def _sft_help() -> str:
    lines = ["usage: megalora sft [CONFIG.yaml] [--key value ...] [--dry-run]", "",
             "Every config key can be given as a flag; YAML sections group them. A YAML `ENV:` block sets",
             "environment variables (NPROC_PER_NODE, ...) before launch; variables already set keep their value."]
    spellings = {key: f" (ms-swift 4: --{alias})" for alias, key in SWIFT4_NAMES.items()}
    spellings.update({key: f" (ms-swift 3: --{alias})" for alias, key in SWIFT3_NAMES.items()})
    for section in SECTIONS:
        lines.append(f"\n{section}:")
        for key, (sec, f) in FIELDS.items():
            if sec != section:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            extra = f" {{{', '.join(str(c) for c in choices if c is not None)}}}" if choices else ""
            also = spellings.get(key, "")
            doc = textwrap.fill(f.metadata["doc"], width=76, initial_indent=" " * 6, subsequent_indent=" " * 6)
            lines.append(f"  --{key}{extra}  (default: {default}){also}\n{doc}")
    lines.append("\nms-swift keys accepted and reported at start (no effect here):")
    lines += [f"  --{k}: {why}" for k, why in REPORTED.items()]
    lines.append("ms-swift keys refused (any value but the one named):")
    for key, (allowed, why) in REFUSED.items():
        ok = f" (accepted: {', '.join(str(a) for a in allowed)})" if allowed else ""
        lines.append(f"  --{key}{ok}: {why}")
    lines.append("Fused-kernel flags accepted and reported at start with what runs instead:")
    lines += [f"  --{k}: {why}" for k, (_, why) in GPU_FUSIONS.items()]
    lines.append("\n  --dry-run  validate config, parallel layout and data; print them; train nothing")
    return "\n".join(lines)


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
    from megalora.train.launch import launch_env

    return launch_env(dict(os.environ)).world_size


def how_to_launch(argv: list[str]):
    """For a layout that needs `n` ranks: the command line that launches them."""
    import shlex

    nnodes = os.environ.get("NNODES", "1")

    def hint(n: int) -> str:
        if nnodes not in ("", "1"):
            return f"NPROC_PER_NODE x NNODES must be a multiple of {n}"
        return f"NPROC_PER_NODE={n} megalora sft {shlex.join(argv)}".rstrip()

    return hint


def _split_config_path(argv: list[str]) -> tuple[str | None, list[str], bool]:
    dry_run = False
    rest = []
    for tok in argv:
        if tok in ("--dry-run", "--dry_run"):
            dry_run = True
        else:
            rest.append(tok)
    config_path = None
    if rest and not rest[0].startswith("--"):
        config_path, rest = rest[0], rest[1:]
    return config_path, rest, dry_run


def cmd_sft(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(_sft_help())
        return 0
    from megalora.config import load_config, split_secret_flags

    # Libraries that record the command line (wandb's run metadata) never see a secret flag.
    sys.argv[1:] = split_secret_flags(sys.argv[1:])[0]
    config_path, flags, dry_run = _split_config_path(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, extras = load_config(config_path, flags)
    for w in caught:
        print(f"megalora: warning: {w.message}", file=sys.stderr)
    for note in apply_env(extras.env):  # said here: after a relaunch the workers see the applied environment
        print(f"megalora: {note}", flush=True)
    from megalora.config import check_layout
    from megalora.dry_run import dry_run as run_dry

    world_size = world_size_from_env()
    # The layout's degrees need no model: a wrong rank count stops here, before any launch.
    check_layout(cfg, world_size=world_size, how_to_launch=how_to_launch(argv))
    if dry_run:
        return run_dry(cfg, extras, world_size=world_size)
    from megalora.train.launch import run_sft

    return run_sft(cfg, extras, config_path=config_path, argv=argv)


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
    except (ConfigError, ValueError) as e:
        # User mistakes are ValueErrors naming the file, line or key: one line, no traceback.
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
    if any(a in ("-h", "--help") for a in argv):
        print("usage: megalora plan [CONFIG.yaml] [--key value ...] [--num_gpus N]\n\n"
              "Predicts per-GPU memory (frozen weights, LoRA, gradients, optimizer, activations under the\n"
              "recompute settings, buffers) and step FLOPs for the config's layout on N GPUs (default: the\n"
              "launch's world size, else 8), and whether it fits on 80 GB and 141 GB GPUs.")
        return 0
    from megalora.config import load_config

    num_gpus = None
    rest = []
    it = iter(argv)
    for tok in it:
        if tok.startswith("--num_gpus"):
            value = tok.split("=", 1)[1] if "=" in tok else next(it, "")
            if not value.isdigit():
                raise ConfigError(f"--num_gpus expects a positive integer, got {value!r}")
            num_gpus = int(value)
        else:
            rest.append(tok)
    config_path, flags, _ = _split_config_path(rest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg, extras = load_config(config_path, flags)
    apply_env(extras.env)  # a YAML `ENV: {NPROC_PER_NODE: ...}` describes the launch being planned
    if num_gpus is None:
        launched = "WORLD_SIZE" in os.environ or "NPROC_PER_NODE" in os.environ
        num_gpus = world_size_from_env() if launched else 8
    from megalora.plan_model import model_config_for_plan
    from megalora.train.plan import plan_main

    print(plan_main(cfg, num_gpus=num_gpus, hf_config=model_config_for_plan(cfg)))
    return 0
