"""push_folder against a local fake hub that speaks each real client's endpoints.

The real clients (huggingface_hub's HfApi, modelscope's HubApi) do the HTTP; the fake hub in
tests/fake_hub_server.py records what arrives, so the oracle is the bytes, commit message and
visibility the hub received, compared with the folder on disk.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from pathlib import Path

import pytest

from megalora.export.push import PushError, push_folder
from fake_hub_server import FakeHub  # tests/ is on sys.path (no __init__.py: pytest prepends it)

TOKEN = "tok-s3cret-4b1d6e0c9f"
HUBS = ["huggingface", "modelscope"]
# The path each hub's create call and commit call take on the fake hub.
CREATE = {"huggingface": r"^/api/repos/create$", "modelscope": r"^/api/v1/models$"}
COMMIT = {"huggingface": r"/commit/", "modelscope": r"/commit/"}


@pytest.fixture(autouse=True)
def _isolated_client_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the clients' config, saved logins and caches away from the user's home, and their
    side requests (the Hugging Face client's best-effort registry fetch from its default
    endpoint) on this machine."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", _closed_port_url())
    home = tmp_path_factory.mktemp("client_home")
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / "ms_home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "ms_cache"))
    for var in ("HF_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(var, raising=False)


def _model_folder(root: Path) -> dict[str, bytes]:
    """A small export folder: JSON configs inline, a binary safetensors blob (LFS on ModelScope)."""
    files = {
        "config.json": b'{"model_type": "qwen3", "hidden_size": 8}\n',
        "model.safetensors": os.urandom(200_000),
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "README.md": "# tiny\nfine-tuned ✓\n".encode(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _assert_token_absent(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("hub", HUBS)
def test_push_uploads_folder_intact(hub: str, private: bool, tmp_path: Path, capfd: pytest.CaptureFixture,
                                    caplog: pytest.LogCaptureFixture) -> None:
    files = _model_folder(tmp_path / "export")
    # Upload-resume state of an earlier ModelScope push must not travel to any hub.
    (tmp_path / "export" / ".ms_upload_cache").write_text('{"version": 3}')
    lines: list[str] = []
    caplog.set_level(logging.DEBUG)
    with FakeHub() as fake:
        url = push_folder(tmp_path / "export", "alice/tiny-lora", hub=hub, token=TOKEN, private=private,
                          commit_message="sft step 40", endpoint=fake.url, log=lines.append)
    repo = fake.repos["alice/tiny-lora"]
    assert repo.files == files
    assert repo.private is private
    assert len(repo.commit_messages) == 1
    if hub == "huggingface":
        assert repo.commit_messages[0] == "sft step 40"
    else:  # the ModelScope client commits in batches and tags the message with the batch number
        assert repo.commit_messages[0].startswith("sft step 40")
    assert url.startswith(fake.url) and url.endswith("alice/tiny-lora")
    # The token went to the hub, and nowhere else.
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in fake.calls("POST", CREATE[hub]))
    out, err = capfd.readouterr()
    _assert_token_absent(out, err, caplog.text, "\n".join(lines))
    assert any("alice/tiny-lora" in line and fake.url in line for line in lines)


@pytest.mark.parametrize("hub", HUBS)
def test_token_from_environment(hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model_folder(tmp_path)
    monkeypatch.setenv({"huggingface": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}[hub], TOKEN)
    with FakeHub() as fake:
        push_folder(tmp_path, "alice/env", hub=hub, endpoint=fake.url, log=lambda _: None)
    creates = fake.calls("POST", CREATE[hub])  # ModelScope's upload helper also asks to create (exist_ok)
    assert creates and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in creates)


@pytest.mark.parametrize(
    ("hub", "pattern", "status"),
    [
        # Creating the repository is retried by push_folder itself (neither client retries a POST).
        ("huggingface", CREATE["huggingface"], 500),
        ("huggingface", CREATE["huggingface"], 0),  # connection dropped without an answer
        ("modelscope", CREATE["modelscope"], 503),
        ("modelscope", CREATE["modelscope"], 0),
        # A failed commit is retried inside both clients' upload helpers; the push still succeeds.
        ("huggingface", COMMIT["huggingface"], 0),
        ("modelscope", COMMIT["modelscope"], 502),
    ],
)
def test_transient_failure_is_retried(hub: str, pattern: str, status: int, tmp_path: Path) -> None:
    files = _model_folder(tmp_path)
    lines: list[str] = []
    with FakeHub() as fake:
        fake.fail("POST", pattern, status, times=1)
        push_folder(tmp_path, "alice/flaky", hub=hub, token=TOKEN, endpoint=fake.url,
                    retry_wait_s=0.01, log=lines.append)
    attempts = fake.calls("POST", pattern)
    assert attempts[0].status == status and any(r.status == 200 for r in attempts[1:])
    assert fake.repos["alice/flaky"].files == files
    ours = [line for line in lines if "retry 1/3" in line]
    assert len(ours) == (1 if pattern == CREATE[hub] else 0)
    _assert_token_absent("\n".join(lines))


@pytest.mark.parametrize("hub", HUBS)
def test_auth_error_is_not_retried_and_token_is_redacted(hub: str, tmp_path: Path,
                                                         capfd: pytest.CaptureFixture,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    _model_folder(tmp_path)
    lines: list[str] = []
    caplog.set_level(logging.DEBUG)
    with FakeHub() as fake:
        # A careless server repeats the Authorization header in its error message.
        fake.fail("POST", CREATE[hub], 401, times=5, echo_auth=True)
        with pytest.raises(PushError) as info:
            push_folder(tmp_path, "alice/denied", hub=hub, token=TOKEN, endpoint=fake.url,
                        retry_wait_s=0.01, log=lines.append)
    assert len(fake.calls("POST", CREATE[hub])) == 1
    message = str(info.value)
    assert "401" in message and hub in message and fake.url in message
    assert "Bearer ***" in message  # the echoed header arrived, minus the token
    assert "alice/denied" not in fake.repos
    rendered = "".join(traceback.format_exception(info.value))
    out, err = capfd.readouterr()
    _assert_token_absent(message, rendered, out, err, caplog.text, "\n".join(lines))


@pytest.mark.parametrize("hub", HUBS)
def test_unreachable_hub_names_hub_and_endpoint(hub: str, tmp_path: Path) -> None:
    _model_folder(tmp_path)
    endpoint = _closed_port_url()
    lines: list[str] = []
    with pytest.raises(PushError, match=rf"cannot reach the {hub} hub at {endpoint}") as info:
        push_folder(tmp_path, "alice/nowhere", hub=hub, token=TOKEN, endpoint=endpoint, max_retries=1,
                    retry_wait_s=0.01, log=lines.append)
    assert "after 2 attempt(s)" in str(info.value)
    assert sum("retry 1/1" in line for line in lines) == 1
    _assert_token_absent(str(info.value), "\n".join(lines))


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown hub 'github'"):
        push_folder(tmp_path, "a/b", hub="github")
    with pytest.raises(ValueError, match="does not exist"):
        push_folder(tmp_path / "missing", "a/b")
    with pytest.raises(ValueError, match="holds no files"):
        push_folder(tmp_path, "a/b")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="'owner/name'"):
        push_folder(tmp_path, "just-a-name")


@pytest.mark.parametrize("hub", HUBS)
def test_hub_that_never_answers_fails_with_one_line(hub: str, tmp_path: Path) -> None:
    """A server that accepts and never answers: each request gives up after `timeout_s`, the
    push after its retries, with one message naming hub and endpoint (and never the token)."""
    _model_folder(tmp_path)
    lines: list[str] = []
    with FakeHub(lifetime_s=600) as fake:
        fake.fail("POST", CREATE[hub], -1, times=100)
        with pytest.raises(PushError) as info:
            push_folder(tmp_path, "alice/hung", hub=hub, token=TOKEN, endpoint=fake.url, max_retries=1,
                        retry_wait_s=0.01, timeout_s=1.0, log=lines.append)
    message = str(info.value)
    assert "\n" not in message and hub in message and fake.url in message and "create repository" in message
    assert 2 <= len(fake.calls("POST", CREATE[hub]))
    _assert_token_absent(message, "\n".join(lines))
