"""`megalora export CHECKPOINT --out DIR`: merged HF safetensors (or a LoRA adapter for vLLM,
SGLang or peft) from a training checkpoint, verified against the unmerged model, optionally
pushed to a hub.

Runs as one process or under `torchrun --nproc_per_node N -m megalora export ...` (the
decoder layers are then split over the ranks). Exit codes: 0 done, 1 verify FAIL (the
folder is kept, nothing is pushed), 2 a user error (the message names the flag or file).
"""
from __future__ import annotations

import argparse
import os
import sys

from megalora.config import bool_flag


def _size(text: str) -> str:
    from megalora.export.writer import parse_size

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def parser() -> argparse.ArgumentParser:
    """The argument parser of `megalora export`."""
    from megalora.export.push import DEFAULT_COMMIT_MESSAGE, HUBS

    p = argparse.ArgumentParser(prog="megalora export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint-<step>/ folder of a training run")
    p.add_argument("--out", required=True, help="output folder (created; must be empty if it exists)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merge", dest="mode", action="store_const", const="merge",
                      help="merge LoRA into the base weights (default)")
    mode.add_argument("--adapter", dest="mode", action="store_const", const="adapter",
                      help="write a LoRA adapter instead (layout: --adapter_format)")
    p.set_defaults(mode="merge")
    p.add_argument("--adapter_format", choices=("vllm", "sglang", "peft"), default=None,
                   help="with --adapter: vllm (default; 2D per-expert keys, one rank, loads in vLLM as is), "
                        "sglang (vllm without the router), peft (transformers 5 + peft's fused expert parameters)")
    p.add_argument("--max_shard_size", type=_size, default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--verify", type=bool_flag, default=True,
                   help="compare the merged model with the unmerged one (default true; holds the model twice in fp32)")
    p.add_argument("--verify_layers", type=int, default=None, help="verify only the first N decoder layers")
    p.add_argument("--push_to_hub", default=None, metavar="ID", help="hub repository 'owner/name' to upload to")
    p.add_argument("--hub", choices=sorted(HUBS), default="modelscope")
    p.add_argument("--private", type=bool_flag, default=True, help="create the hub repository as private (default true)")
    p.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE)
    p.add_argument("--hub_token", default=None,
                   help="hub token; prefer MODELSCOPE_API_TOKEN / HF_TOKEN (the default): a flag is visible to `ps`. "
                        "Never printed or written")
    p.add_argument("--hub_timeout", type=float, default=60.0,
                   help="connect and read timeout (seconds) of each hub request (default 60)")
    p.add_argument("--allow_base_model_change", type=bool_flag, default=False,
                   help="export although the base model's weights differ from the ones the checkpoint was trained on")
    p.add_argument("--hub_endpoint", default=None, help="hub address (default: the hub's own)")
    return p


def cmd_export(argv: list[str]) -> int:
    """Parse `argv`, run the export; returns the exit code (0 ok, 1 verify FAIL, 2 user error)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage and the flag at fault
        return int(exit_.code or 0)
    if args.adapter_format is not None and args.mode != "adapter":
        print("megalora export: error: --adapter_format applies only with --adapter", file=sys.stderr)
        return 2
    if args.verify_layers is not None and args.verify_layers < 1:
        print(f"megalora export: error: --verify_layers must be >= 1, got {args.verify_layers}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from megalora.export.push import PushError
    from megalora.export.run import ExportVerifyError, export_checkpoint

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")  # export only needs barriers and one broadcast
        started = True
    try:
        export_checkpoint(args.checkpoint, args.out, mode=args.mode, max_shard_size=args.max_shard_size,
                          verify=args.verify, verify_num_layers=args.verify_layers, push_to_hub=args.push_to_hub,
                          hub=args.hub, token=args.hub_token, private=args.private,
                          commit_message=args.commit_message, hub_endpoint=args.hub_endpoint,
                          adapter_format=args.adapter_format or "vllm", hub_timeout=args.hub_timeout,
                          allow_base_model_change=args.allow_base_model_change)
    except ExportVerifyError as err:
        print(f"megalora export: {err}", file=sys.stderr)
        return 1
    except (ValueError, PushError) as err:
        print(f"megalora export: error: {err}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist.destroy_process_group()
    return 0
