"""Datasets by hub id, through the ModelScope client (default) or the Hugging Face `datasets` client.

The hub is probed first with a short timeout, so an offline machine gets at once an error
naming the id that could not be fetched (and that a local path works), not a long hang.
"""
from __future__ import annotations

import os

from megalora.errors import UserError
# `datasets`, modelscope and requests are imported where used: they are slow to import and only
# hub datasets need them.

DEFAULT_TIMEOUT_S = 10.0


class HubDatasetError(UserError, ValueError):
    """A hub dataset could not be fetched; the message names the id and the local-path alternative."""


def hub_endpoint(*, use_hf: bool) -> str:
    """The hub base URL the client will talk to (honours HF_ENDPOINT / MODELSCOPE_DOMAIN)."""
    if use_hf:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    domain = os.environ.get("MODELSCOPE_DOMAIN") or "www.modelscope.cn"
    return domain.rstrip("/") if domain.startswith(("http://", "https://")) else f"https://{domain.rstrip('/')}"


def _offline_mode(use_hf: bool) -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if use_hf else ("MODELSCOPE_OFFLINE",)
    return any(os.environ.get(n, "").lower() in ("1", "true", "yes") for n in names)


def _fail(dataset_id: str, hub: str, endpoint: str, reason: str) -> HubDatasetError:
    return HubDatasetError(
        f"could not fetch dataset `{dataset_id}` from {hub} ({endpoint}): {reason}. "
        "A local path works instead: download the data and pass a messages JSONL file, a folder of JSONL "
        "files, or a `datasets` folder written by save_to_disk.")


def _probe(endpoint: str, timeout: float) -> None:
    import requests

    # Any HTTP answer means the hub is reachable; only a connection failure is an error here.
    requests.head(endpoint, timeout=timeout, allow_redirects=False)


def load_hub_dataset(dataset_id: str, *, use_hf: bool = False, split: str = "train", subset: str | None = None,
                     timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """Rows of `split` (of `subset`, when given) of a hub dataset as dicts; raises HubDatasetError when it
    cannot be fetched."""
    hub = "Hugging Face" if use_hf else "ModelScope"
    named = f"{dataset_id}:{subset}" if subset else dataset_id
    endpoint = hub_endpoint(use_hf=use_hf)
    if not _offline_mode(use_hf):
        try:
            _probe(endpoint, timeout)
        except Exception as e:  # noqa: BLE001 - any network failure means the same to the user
            raise _fail(named, hub, endpoint, f"hub unreachable within {timeout:g}s ({type(e).__name__})") from None
    try:
        if use_hf:
            import datasets

            ds = datasets.load_dataset(dataset_id, name=subset, split=split)
        else:
            from modelscope.msdatasets import MsDataset

            ds = MsDataset.load(dataset_id, subset_name=subset, split=split)
            ds = ds.to_hf_dataset() if hasattr(ds, "to_hf_dataset") else ds
    except Exception as e:  # noqa: BLE001 - the clients raise many types; the user needs one message
        raise _fail(named, hub, endpoint, f"{type(e).__name__}: {e}") from None
    return [dict(row) for row in ds]
