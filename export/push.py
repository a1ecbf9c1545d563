"""Push an exported folder to ModelScope or the Hugging Face hub.

The repository is created first (private by default; the clients' upload helpers would otherwise
create a missing repository as public), then the folder is uploaded in one call of the hub's
own client, which handles large files (LFS / Xet) and resumes interrupted uploads. Transient
failures (HTTP 5xx/429, connection resets, timeouts) are retried with exponential backoff; a 4xx
answer (bad token, no permission) is not. Every request has a connect and read timeout
(``timeout_s``), so a hub that accepts and never answers fails the push in bounded time. The
token never appears in what this module logs or raises: every message passes through :func:`redact`, and client exceptions are not chained.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from megalora.config import ConfigError
from megalora.errors import UserError
# The hub clients (huggingface_hub, modelscope and their HTTP stacks) are imported where used: they
# are slow to import, only a push needs them, and the Hugging Face client reads its environment
# when first imported.

HUBS: dict[str, str] = {"modelscope": "MODELSCOPE_API_TOKEN", "huggingface": "HF_TOKEN"}
DEFAULT_COMMIT_MESSAGE = "Upload model exported by megalora"
# Upload-resume bookkeeping the ModelScope client writes into the folder; never part of a model.
_CLIENT_STATE_FILES = [".ms_upload_cache"]

T = TypeVar("T")


class PushError(UserError, RuntimeError):
    """A push that failed; the message names the hub, endpoint and step, never the token."""


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced by ``***``."""
    return text.replace(token, "***") if token else text


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    hub: str = "modelscope",
    token: str | None = None,
    private: bool = True,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
    max_retries: int = 3,
    retry_wait_s: float = 2.0,
    timeout_s: float = 60.0,
    log: Callable[[str], None] = print,
) -> str:
    """Create ``repo_id`` on ``hub`` if missing and upload every file of ``folder``; return the repo URL.

    The token comes from ``token`` or the environment (``MODELSCOPE_API_TOKEN`` for ModelScope,
    ``HF_TOKEN`` for Hugging Face); without either the client's saved login is used. ``endpoint``
    overrides the client's default. Each step is retried up to ``max_retries`` times on transient
    errors, waiting ``retry_wait_s`` doubled each time; each request waits at most ``timeout_s``
    to connect and between bytes of the answer. An existing repository keeps its
    visibility. Raises ``ValueError`` for bad arguments and :class:`PushError` when the hub
    cannot be reached or refuses.
    """
    if hub not in HUBS:
        raise ValueError(f"hub: unknown hub {hub!r}; choose one of {sorted(HUBS)}")
    source = Path(folder)
    if not source.is_dir():
        raise ValueError(f"push: folder '{source}' does not exist or is not a folder")
    files = [p for p in sorted(source.rglob("*")) if p.is_file() and p.name not in _CLIENT_STATE_FILES]
    if not files:
        raise ValueError(f"push: folder '{source}' holds no files to upload")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"push_to_hub: repository id {repo_id!r} must look like 'owner/name'")
    if max_retries < 0:
        raise ValueError(f"max_retries: must be >= 0, got {max_retries}")
    if not timeout_s > 0:
        raise ConfigError(f"hub_timeout: must be > 0 seconds, got {timeout_s}")
    token = token or os.environ.get(HUBS[hub]) or None
    if hub == "huggingface":
        client: _HfClient | _MsClient = _HfClient(endpoint, token, timeout_s=timeout_s)
    else:
        client = _MsClient(endpoint, token, max_retries=max_retries, timeout_s=timeout_s)
    try:
        return _push(client, source, files, repo_id, hub=hub, token=token, private=private,
                     commit_message=commit_message, max_retries=max_retries, retry_wait_s=retry_wait_s, log=log)
    finally:
        client.close()


def _push(client: "_HfClient | _MsClient", source: Path, files: list[Path], repo_id: str, *, hub: str,
          token: str | None, private: bool, commit_message: str, max_retries: int, retry_wait_s: float,
          log: Callable[[str], None]) -> str:
    total = sum(p.stat().st_size for p in files)
    visibility = "private" if private else "public"
    log(f"push: {len(files)} files ({total / 2**20:.1f} MiB) from {source} to {hub} repo {repo_id} "
        f"at {client.endpoint} ({visibility} if created"
        f"{'' if token else f'; no token given, {HUBS[hub]} unset: using the client login'})")
    with _redacting_logs(token):
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("create repository", lambda: client.create_repo(repo_id, private=private)),
            ("upload folder", lambda: client.upload(repo_id, source, commit_message)),
        ]
        for step, call in steps:
            _retrying(call, step=step, hub=hub, endpoint=client.endpoint, repo_id=repo_id, token=token,
                      max_retries=max_retries, retry_wait_s=retry_wait_s, log=log)
    url = client.repo_url(repo_id)
    log(f"push: done, {url}")
    return url


class _HfClient:
    def __init__(self, endpoint: str | None, token: str | None, *, timeout_s: float) -> None:
        import httpx2
        from huggingface_hub import HfApi
        from huggingface_hub.utils import _http

        # The client's shared HTTP session has no timeout by default: one with ours is installed
        # for this push and the default put back afterwards.
        self._previous_factory = _http._GLOBAL_CLIENT_FACTORY

        def factory() -> httpx2.Client:
            client = self._previous_factory()
            client.timeout = httpx2.Timeout(timeout_s)
            return client

        _http.set_client_factory(factory)
        self.api = HfApi(endpoint=endpoint, token=token)
        self.endpoint = self.api.endpoint

    def close(self) -> None:
        from huggingface_hub.utils import _http

        _http.set_client_factory(self._previous_factory)

    def create_repo(self, repo_id: str, *, private: bool) -> None:
        self.api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)

    def upload(self, repo_id: str, folder: Path, message: str) -> None:
        self.api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                               commit_message=message, ignore_patterns=list(_CLIENT_STATE_FILES))

    def repo_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"


class _MsClient:
    def __init__(self, endpoint: str | None, token: str | None, *, max_retries: int, timeout_s: float) -> None:
        from modelscope.hub.api import HubApi

        # The client's own transport retries (connects, idempotent requests) get the same budget as
        # ours; its default (5, backoff to 8 s) alone takes ~15 s to give up on a closed port.
        self.api = HubApi(endpoint=endpoint, token=token, max_retries=max_retries, timeout=timeout_s)
        self.endpoint = self.api.endpoint

    def close(self) -> None:
        pass

    def create_repo(self, repo_id: str, *, private: bool) -> None:
        # No token/endpoint arguments here: with them the client builds a fresh API object that
        # would drop the retry budget set above.
        self.api.create_repo(repo_id, repo_type="model", visibility="private" if private else "public",
                             exist_ok=True)

    def upload(self, repo_id: str, folder: Path, message: str) -> None:
        self.api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               commit_message=message)

    def repo_url(self, repo_id: str) -> str:
        return f"{self.endpoint}/models/{repo_id}"


def _retrying(call: Callable[[], T], *, step: str, hub: str, endpoint: str, repo_id: str, token: str | None,
              max_retries: int, retry_wait_s: float, log: Callable[[str], None]) -> T:
    for attempt in range(max_retries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised without the token
            status = http_status(exc)
            what = redact(f"{type(exc).__name__}: {exc}", token)
            transient = is_transient(exc)
            if transient and attempt < max_retries:
                wait = retry_wait_s * 2**attempt
                log(f"push: {step} on {hub} failed ({what}); retry {attempt + 1}/{max_retries} in {wait:g}s")
                time.sleep(wait)
                continue
            if status is None and transient:
                raise PushError(
                    f"push: cannot reach the {hub} hub at {endpoint} to {step} for {repo_id} "
                    f"after {attempt + 1} attempt(s): {what}"
                ) from None
            if status is None:
                raise PushError(f"push: {step} for {repo_id} on the {hub} hub at {endpoint} failed: {what}") from None
            hint = ""
            if status in (401, 403):
                hint = f"; check the token (argument or {HUBS[hub]}) and its write access to {repo_id}"
            raise PushError(
                f"push: the {hub} hub at {endpoint} answered HTTP {status} to {step} for {repo_id} "
                f"after {attempt + 1} attempt(s): {what}{hint}"
            ) from None
    raise AssertionError("unreachable: the loop returns or raises")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a client exception (either client's style), following its causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = getattr(current, "status_code", None)
        if status is None:
            status = getattr(getattr(current, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        current = current.__cause__ or current.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx, 429, and transport failures without an HTTP answer."""
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status == 429
    transport: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        transport += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    try:
        import httpx2  # the Hugging Face client's HTTP stack

        transport.append(httpx2.TransportError)
    except ImportError:
        pass
    try:
        from modelscope_hub.errors import NetworkError, RequestTimeoutError

        transport += [NetworkError, RequestTimeoutError]
    except ImportError:
        pass
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, tuple(transport)):
            return True
        current = current.__cause__ or current.__context__
    return False


class _RedactFilter(logging.Filter):
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = redact(message, self.token), None
        return True


class _redacting_logs:
    """Scrub the token from every log record that reaches a handler while pushing (clients' too)."""

    def __init__(self, token: str | None) -> None:
        self.filter = _RedactFilter(token) if token else None
        self.handlers: list[logging.Handler] = []

    def __enter__(self) -> None:
        if self.filter is None:
            return
        loggers = [logging.getLogger()] + [
            lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
        ]
        self.handlers = list({id(h): h for lg in loggers for h in lg.handlers}.values())
        for handler in self.handlers:
            handler.addFilter(self.filter)

    def __exit__(self, *exc: object) -> None:
        for handler in self.handlers:
            handler.removeFilter(self.filter)
