"""Resolve a model name to a local folder: a path as is, a hub id through ModelScope or Hugging Face.

A hub id (``Qwen/Qwen3-Coder-Next``) is downloaded with the hub's own client into that client's
usual cache (``MODELSCOPE_CACHE`` / ``HF_HOME`` / ``HF_HUB_CACHE``), with its progress bars, and only
the files training needs: configs, tokenizer files, chat template, safetensors and their index.
In a multi-process job one rank downloads while the others wait on a barrier and then read the
cache. Without a reachable hub, an id that is already cached resolves from the cache.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from megalora.config import ConfigError

import torch.distributed as dist

# The hub clients (huggingface_hub, modelscope) are imported where used: they are slow to import,
# only hub ids need them, and the Hugging Face client reads its environment (endpoint, offline
# mode) when first imported.

# Everything a model folder needs for training and export; weights only as safetensors.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.json",  # config, generation_config, tokenizer(_config), special tokens, safetensors index
    "*.safetensors",
    "*.model",  # sentencepiece tokenizers
    "*.tiktoken",
    "*.txt",  # merges.txt
    "*.jinja",  # chat_template.jinja
)
# Other weight formats and the original (non-HF) checkpoints some repositories carry beside.
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    "original/*",
    "*.bin",
    "*.pth",
    "*.pt",
    "*.gguf",
    "*.onnx",
    "*.msgpack",
    "*.h5",
)

# An unreachable hub should fail within seconds, not after the clients' long retry budgets.
PROBE_TIMEOUT_S = 5.0

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(
    name_or_path: str | os.PathLike[str],
    *,
    use_hf: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    allow_patterns: list[str] | tuple[str, ...] | None = None,
) -> Path:
    """Return the local folder of a model given as a folder or as a hub id.

    A folder is returned as is and must hold ``config.json``. A hub id goes through ModelScope,
    or the Hugging Face hub when ``use_hf``. Rank 0 downloads (pass the local rank when nodes do
    not share the cache) while the other ranks wait on ``barrier`` (default:
    ``torch.distributed.barrier`` when a process group is up) and then resolve from the cache.
    ``allow_patterns`` replaces :data:`DEFAULT_ALLOW_PATTERNS` (e.g. only tokenizer files).
    Raises ``ValueError`` naming the folder or id when neither works.
    """
    text = os.fspath(name_or_path)
    local = Path(text).expanduser()
    if local.exists() or not _HUB_ID.fullmatch(text):
        return _checked_folder(local, what=f"model folder '{text}'")

    hub = "huggingface" if use_hf else "modelscope"
    allow = list(allow_patterns) if allow_patterns is not None else list(DEFAULT_ALLOW_PATTERNS)
    if world_size > 1 and barrier is None:
        barrier = _default_barrier()

    path: Path | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            path = _download(text, hub=hub, allow=allow)
        except Exception as exc:  # noqa: BLE001 - re-raised after the barrier so no rank hangs
            error = exc
    if world_size > 1:
        assert barrier is not None
        barrier()
    if error is not None:
        raise error
    if path is None:
        path = _from_cache(text, hub=hub, allow=allow, reason="rank 0 was to download it")
    return _checked_folder(path, what=f"snapshot of '{text}' from {hub}")


def _checked_folder(folder: Path, *, what: str) -> Path:
    if not folder.is_dir():
        raise ConfigError(
            f"{what}: '{folder}' is not a folder, and not a hub id of the form 'Org/Name'; "
            "pass a local model folder or a hub id"
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{what}: folder '{folder}' has no config.json; pass a Hugging Face model folder")
    return folder


def _default_barrier() -> Callable[[], None]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("resolve_model: world_size > 1 needs a barrier callable or an initialised process group")
    return dist.barrier


def hub_endpoint(hub: str) -> str:
    """The endpoint the hub's client talks to: its environment variables as the client read them
    (the Hugging Face client at import, the ModelScope client at first use)."""
    if hub == "huggingface":
        from huggingface_hub import constants

        return constants.ENDPOINT
    from modelscope_hub.config import get_default_config

    return get_default_config().endpoint


def _reachable(url: str, *, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the endpoint opens, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _download(model_id: str, *, hub: str, allow: list[str]) -> Path:
    endpoint = hub_endpoint(hub)
    offline = hub == "huggingface" and _hf_offline()
    unreachable = "offline mode (HF_HUB_OFFLINE) is set" if offline else _reachable(endpoint)
    if unreachable is not None:
        return _from_cache(model_id, hub=hub, allow=allow, reason=f"{endpoint} is unreachable ({unreachable})")
    try:
        if hub == "huggingface":
            from huggingface_hub import snapshot_download as hf_snapshot_download

            folder = hf_snapshot_download(
                model_id, allow_patterns=allow, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS)
            )
        else:
            from modelscope import snapshot_download as ms_snapshot_download

            folder = ms_snapshot_download(
                model_id, allow_patterns=allow, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS)
            )
    except Exception as exc:  # noqa: BLE001 - any hub failure falls back to the cache, reported below
        return _from_cache(model_id, hub=hub, allow=allow, reason=f"download failed: {type(exc).__name__}: {exc}")
    return Path(folder)


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _from_cache(model_id: str, *, hub: str, allow: list[str], reason: str) -> Path:
    """The cached snapshot of ``model_id``, through the client's own local-files-only path."""
    try:
        if hub == "huggingface":
            from huggingface_hub import snapshot_download as hf_snapshot_download

            folder = hf_snapshot_download(
                model_id,
                allow_patterns=allow,
                ignore_patterns=list(DEFAULT_IGNORE_PATTERNS),
                local_files_only=True,
            )
        else:
            from modelscope import snapshot_download as ms_snapshot_download

            folder = ms_snapshot_download(
                model_id,
                allow_patterns=allow,
                ignore_patterns=list(DEFAULT_IGNORE_PATTERNS),
                local_files_only=True,
            )
    except Exception as exc:  # noqa: BLE001 - turned into one message naming the id and the fixes
        other = "--use_hf false (ModelScope)" if hub == "huggingface" else "--use_hf true (Hugging Face hub)"
        raise ConfigError(
            f"model '{model_id}' is not a local folder and could not be resolved through {hub} "
            f"({hub_endpoint(hub)}): {reason}; it is not in the {hub} cache either "
            f"({type(exc).__name__}: {exc}). Pass a local path to a folder holding config.json, "
            f"or try {other}."
        ) from None
    return Path(folder)
