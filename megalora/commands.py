"""Each command's parser and `--help`, generated from the one config tree (`megalora.config`).

A command declares nothing here: the keys it reads are the fields whose section, or whose
`commands` metadata, names it (`command_fields`). So `megalora verify --tensor_model_parallel_size`
and `megalora sft --tensor_model_parallel_size` are one field, with one default, one help text
and one value parser (`true/false`, integers, choices), and a typo'd key gets the same
"did you mean" in every command.

    megalora sft    [CONFIG.yaml] [--key value ...] [--dry-run]
    megalora plan   [CONFIG.yaml] [--key value ...]          (the training keys and num_gpus)
    megalora verify [--key value ...]
    megalora export CHECKPOINT --out DIR [--key value ...]
"""
from __future__ import annotations

import dataclasses
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any

from megalora.config import (ALL_SECTIONS, COMMAND_SECTIONS, GPU_FUSIONS, SECTIONS, Config, ConfigBuilder, Extras,
                             command_fields)
from megalora.swift_keys import REFUSED, REPORTED, SWIFT3_NAMES, SWIFT4_NAMES

USAGE = {
    "sft": ("megalora sft [CONFIG.yaml] [--key value ...] [--dry-run]",
            "Every config key can be given as a flag; YAML sections group them. A YAML `ENV:` block sets\n"
            "environment variables (NPROC_PER_NODE, ...) before launch; variables already set keep their value."),
    "plan": ("megalora plan [CONFIG.yaml] [--key value ...] [--num_gpus N]",
             "Predicts per-GPU memory (frozen weights, LoRA, gradients, optimizer, activations under the\n"
             "recompute settings, buffers) and step FLOPs for the config's layout on num_gpus GPUs, and\n"
             "whether it fits on 80 GB and 141 GB GPUs. It reads every key of `megalora sft`."),
    "verify": ("megalora verify [--model DIR] [--adapter DIR] [--key value ...]",
               "Compares megatron (with the adapter in megalora's LoRA modules) against transformers (with the\n"
               "adapter loaded by peft) on the same tokens, on any layout; run it under torchrun for TP/EP/SP."),
    "export": ("megalora export CHECKPOINT --out DIR [--merge | --adapter] [--key value ...]",
               "Merged HF safetensors (or a LoRA adapter) from a training checkpoint, verified against the\n"
               "unmerged model, optionally pushed to a hub. Exit codes: 0 done, 1 verify FAIL, 2 a user error."),
}


@dataclass
class Parsed:
    """One command line, read through the config tree."""
    config: Config  # the training tree: the keys the command reads set, the others at their defaults
    extras: Extras
    own: Any  # the command's own section (VerifySection, ExportCommandSection, PlanSection) or None
    config_path: str | None = None
    dry_run: bool = False


def parse_command(command: str, argv: list[str]) -> Parsed:
    """Read `argv` as `command` does: positionals first (the CONFIG.yaml of sft and plan, export's
    CHECKPOINT), then `--key value` flags. Raises ConfigError naming the key at fault. Warnings
    raised while validating (a key with no effect) are printed as `megalora: warning: ...`."""
    builder = ConfigBuilder(command)
    dry_run = command == "sft" and any(tok in ("--dry-run", "--dry_run") for tok in argv)
    tokens = [tok for tok in argv if not (command == "sft" and tok in ("--dry-run", "--dry_run"))]
    positionals = []
    while tokens and not tokens[0].startswith("--"):
        positionals.append(tokens.pop(0))
    config_path = positionals.pop(0) if command in Config.COMMANDS and positionals else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if config_path is not None:
            builder.update_yaml(config_path)
        builder.set_positionals(positionals)
        builder.update_flags(tokens)
        config, own = builder.build(), builder.build_own()
    for w in caught:
        print(f"megalora: warning: {w.message}", file=sys.stderr)
    return Parsed(config=config, extras=builder.extras, own=own, config_path=config_path, dry_run=dry_run)


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def key_help(key: str, f: dataclasses.Field) -> list[str]:
    """The `--help` entry of one key: its line (spelling, choices, default) and its doc. The same
    text in every command that reads the key."""
    choices = f.metadata["choices"]
    extra = f" {{{', '.join(str(c) for c in choices if c is not None)}}}" if choices else ""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    name = key.upper() if f.metadata["positional"] else f"--{key}"
    state = "required" if f.metadata["required"] else f"default: {default}"
    doc = textwrap.fill(f.metadata["doc"], width=76, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return [f"  {name}{extra}  ({state})", doc]


def render_help(command: str) -> str:
    """`megalora <command> --help`, generated from the keys the command reads."""
    usage, about = USAGE[command]
    lines = [f"usage: {usage}", "", about]
    swift = command in Config.COMMANDS
    spellings = {}
    if swift:
        spellings = {key: f" (ms-swift 4: --{alias})" for alias, key in SWIFT4_NAMES.items()}
        spellings.update({key: f" (ms-swift 3: --{alias})" for alias, key in SWIFT3_NAMES.items()})
    fields = command_fields(command)
    for section in ALL_SECTIONS:
        keys = [key for key, (s, _) in fields.items() if s == section]
        if not keys:
            continue
        lines.append(f"\n{section}:" if section in SECTIONS else f"\n{command} only:")
        for key in keys:
            f = fields[key][1]
            entry = key_help(key, f)
            entry[0] += spellings.get(key, "")
            lines += entry
            if command in f.metadata["aliases"]:
                lines.append(f"      also spelt --{f.metadata['aliases'][command]}")
            if f.metadata["flags"]:
                lines.append("      short: " + ", ".join(f"--{flag} (--{key} {flag})" for flag in f.metadata["flags"]))
    if swift:
        lines.append("\nms-swift keys accepted and reported at start (no effect here):")
        lines += [f"  --{k}: {why}" for k, why in REPORTED.items()]
        lines.append("ms-swift keys refused (any value but the one named):")
        for key, (allowed, why) in REFUSED.items():
            ok = f" (accepted: {', '.join(str(a) for a in allowed)})" if allowed else ""
            lines.append(f"  --{key}{ok}: {why}")
        lines.append("Fused-kernel flags accepted and reported at start with what runs instead:")
        lines += [f"  --{k}: {why}" for k, (_, why) in GPU_FUSIONS.items()]
    if command == "sft":
        lines.append("\n  --dry-run  validate config, parallel layout and data; print them; train nothing")
    return "\n".join(lines)


assert set(USAGE) == {c for s in COMMAND_SECTIONS.values() for c in s.COMMANDS} | set(Config.COMMANDS)
