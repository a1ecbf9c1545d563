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

from megalora.config import FIELDS, GPU_FUSIONS, NOT_APPLICABLE, SECTIONS, ConfigError

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
             "Every config key can be given as a flag; YAML sections group them:"]
    for section in SECTIONS:
        lines.append(f"\n{section}:")
        for key, (sec, f) in FIELDS.items():
            if sec != section:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            extra = f" {{{', '.join(str(c) for c in choices if c is not None)}}}" if choices else ""
            doc = textwrap.fill(f.metadata["doc"], width=76, initial_indent=" " * 6, subsequent_indent=" " * 6)
            lines.append(f"  --{key}{extra}  (default: {default})\n{doc}")
    lines.append("\naccepted for compatibility and reported at start (no effect here): "
                 + ", ".join(f"--{k}" for k in NOT_APPLICABLE))
    lines.append("GPU fusions, applied when available and reported by name otherwise: "
                 + ", ".join(f"--{k}" for k in GPU_FUSIONS))
    lines.append("\n  --dry-run  validate config, parallel layout and data; print them; train nothing")
    return "\n".join(lines)


def world_size_from_env() -> int:
    """The world size a launch would have: WORLD_SIZE under torchrun, else NPROC_PER_NODE x NNODES."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("NPROC_PER_NODE", "1")) * int(os.environ.get("NNODES", "1"))


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
    from megalora.dry_run import dry_run as run_dry

    if dry_run:
        return run_dry(cfg, extras, world_size=world_size_from_env())
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
        cfg, _ = load_config(config_path, flags)
    if num_gpus is None:
        launched = "WORLD_SIZE" in os.environ or "NPROC_PER_NODE" in os.environ
        num_gpus = world_size_from_env() if launched else 8
    from megalora.plan_model import model_config_for_plan
    from megalora.train.plan import plan_main

    print(plan_main(cfg, num_gpus=num_gpus, hf_config=model_config_for_plan(cfg)))
    return 0
