"""`megalora export CHECKPOINT --out DIR`: merged HF safetensors (or a LoRA adapter for vLLM,
SGLang or peft) from a training checkpoint, verified against the unmerged model, optionally
pushed to a hub.

Runs as one process or under `torchrun --nproc_per_node N -m megalora export ...` (the
decoder layers are then split over the ranks). Exit codes: 0 done, 1 verify FAIL (the
folder is kept, nothing is pushed), 2 a user error (the message names the flag or file).
Its keys are declared in the config tree (`megalora.config`, the `export` section and
`ExportCommandSection`), as for every command.
"""
from __future__ import annotations

import os
import sys

import torch.distributed as dist

from megalora.commands import parse_command, render_help, wants_help
from megalora.config import ConfigError
from megalora.errors import UserError
from megalora.export.run import ExportVerifyError, export_checkpoint
from megalora.export.writer import parse_size


def cmd_export(argv: list[str]) -> int:
    """Parse `argv`, run the export; returns the exit code (0 ok, 1 verify FAIL, 2 user error)."""
    if wants_help(argv):
        print(render_help("export"))
        return 0
    try:
        parsed = parse_command("export", argv)
        _check(parsed)
    except UserError as err:
        print(f"megalora export: error: {err}", file=sys.stderr)
        return 2
    cfg, own = parsed.config, parsed.own
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")  # export only needs barriers and one broadcast
        started = True
    e = cfg.export
    try:
        export_checkpoint(own.checkpoint, own.out, mode=own.mode, max_shard_size=e.max_shard_size,
                          verify=own.verify, verify_num_layers=own.verify_layers, push_to_hub=e.push_to_hub,
                          hub=e.hub, token=e.hub_token, private=e.hub_private,
                          commit_message=e.commit_message, hub_endpoint=own.hub_endpoint,
                          adapter_format=own.adapter_format or "vllm", hub_timeout=e.hub_timeout,
                          allow_base_model_change=cfg.checkpoint.allow_base_model_change)
    except ExportVerifyError as err:
        print(f"megalora export: {err}", file=sys.stderr)
        return 1
    except UserError as err:
        print(f"megalora export: error: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _check(parsed) -> None:
    """What the tree's types cannot say: flag combinations and the shard size's syntax."""
    own = parsed.own
    if own.adapter_format is not None and own.mode != "adapter":
        raise ConfigError("--adapter_format applies only with --adapter")
    if own.verify_layers is not None and own.verify_layers < 1:
        raise ConfigError(f"--verify_layers must be >= 1, got {own.verify_layers}")
    try:
        parse_size(parsed.config.export.max_shard_size)
    except ConfigError as err:
        raise ConfigError(f"--max_shard_size: {err}") from None
