"""resolve_model: local folders, hub ids through each client's cache, and downloads from a fake hub.

Hub resolution runs in a subprocess because both clients read their environment variables
(HF_HOME, HF_ENDPOINT, MODELSCOPE_CACHE, MODELSCOPE_ENDPOINT) the way a user sets them; the
Hugging Face client reads them once, at import. Downloads go to the fake hub in
tests/fake_hub_server.py, which records every request the real clients make.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub_server import FakeHub, git_blob_sha1  # tests/ is on sys.path (no __init__.py: pytest prepends it)
from megalora.hub import resolve_model

# One process, `world_size` threads as ranks sharing a threading.Barrier, like ranks on one node.
_RUNNER = r"""
import json, sys, threading
from megalora.hub import resolve_model

spec = json.loads(sys.argv[1])

def one(name, rank, world, barrier):
    try:
        path = resolve_model(name, use_hf=spec["use_hf"], rank=rank, world_size=world, barrier=barrier,
                             allow_patterns=spec.get("allow"))
        return {"path": str(path)}
    except ValueError as exc:
        return {"error": str(exc)}

results = []
for name in spec["names"]:
    world = spec.get("world_size", 1)
    barrier = threading.Barrier(world, timeout=60)
    out = [None] * world
    def run(rank):
        out[rank] = one(name, rank, world, barrier.wait if world > 1 else None)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads: t.start()
    for t in threads: t.join()
    results.append(out)
print("RESULT:" + json.dumps(results))
"""

# What a training run needs from a model repository, and what it must not download.
WANTED = {
    "config.json": b'{"model_type": "qwen3_next"}',
    "generation_config.json": b'{"do_sample": true}',
    "model-00001-of-00002.safetensors": os.urandom(70_000),
    "model-00002-of-00002.safetensors": os.urandom(30_000),
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}',
    "vocab.json": b"{}",
    "merges.txt": b"#version: 0.2\n",
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
}
UNWANTED = {
    "pytorch_model.bin": b"torch pickle",
    "original/params.json": b"{}",
    "original/consolidated.00.pth": b"meta checkpoint",
    "model-q4.gguf": b"GGUF",
    "README.md": b"# card",
}


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _env(tmp: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "MODELSCOPE"))}
    env.update(HF_HOME=str(tmp / "hf_home"), HF_ENDPOINT=endpoint, MODELSCOPE_CACHE=str(tmp / "ms_cache"),
               MODELSCOPE_HOME=str(tmp / "ms_home"), MODELSCOPE_ENDPOINT=endpoint, **extra)
    return env


def _resolve(env: dict[str, str], names: list[str], *, use_hf: bool, world_size: int = 1,
             allow: list[str] | None = None) -> list[list[dict]]:
    spec = json.dumps({"names": names, "use_hf": use_hf, "world_size": world_size, "allow": allow})
    proc = subprocess.run([sys.executable, "-c", _RUNNER, spec], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")][-1]
    return json.loads(line[len("RESULT:"):])


def _assert_unknown_id_message(result: dict, model_id: str, *, use_hf: bool) -> None:
    message = result["error"]
    assert f"'{model_id}'" in message
    assert ("huggingface" if use_hf else "modelscope") in message
    assert "local path" in message
    assert ("--use_hf false" if use_hf else "--use_hf true") in message


# -- local folders -----------------------------------------------------------------------------

def test_local_folder_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_local_folder_without_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"'{tmp_path}' has no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ValueError, match="not a folder, and not a hub id"):
        resolve_model(tmp_path / "nested" / "missing" / "model")


# -- cached ids, no reachable hub ----------------------------------------------------------------

def _lay_out_hf_cache(hub_cache: Path, repo_id: str, files: dict[str, bytes], revision: str) -> Path:
    """The Hugging Face cache layout: content-addressed blobs, snapshot symlinks, refs/main."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    for rel, data in files.items():
        blob = repo_dir / "blobs" / git_blob_sha1(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def test_hf_cached_id_resolves_offline(tmp_path: Path) -> None:
    from huggingface_hub import scan_cache_dir

    revision = "3f1c0a5e9b7d2c4a6e8f0b1d3c5a7e9f1b3d5c7a"
    snapshot = _lay_out_hf_cache(tmp_path / "hf_home" / "hub", "Org/Cached", WANTED, revision)
    # The client itself recognises the layout as a cached repository at that revision.
    info = scan_cache_dir(tmp_path / "hf_home" / "hub")
    [repo] = [r for r in info.repos if r.repo_id == "Org/Cached"]
    assert {rev.commit_hash for rev in repo.revisions} == {revision}

    unreachable = _env(tmp_path, _closed_port_url())
    offline_flag = _env(tmp_path, "https://huggingface.co", HF_HUB_OFFLINE="1")
    for env in (unreachable, offline_flag):
        cached, unknown = _resolve(env, ["Org/Cached", "Org/NotCached"], use_hf=True)
        assert Path(cached[0]["path"]) == snapshot
        assert (Path(cached[0]["path"]) / "config.json").read_bytes() == WANTED["config.json"]
        _assert_unknown_id_message(unknown[0], "Org/NotCached", use_hf=True)


def test_modelscope_cached_id_resolves_offline(tmp_path: Path) -> None:
    # modelscope 1.40 (modelscope_hub) cache: {MODELSCOPE_CACHE}/models/{owner}--{name}/snapshots/{revision}/
    snapshot = tmp_path / "ms_cache" / "models" / "Org--Cached" / "snapshots" / "master"
    for rel, data in WANTED.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).write_bytes(data)
    cached, unknown = _resolve(_env(tmp_path, _closed_port_url()), ["Org/Cached", "Org/NotCached"], use_hf=False)
    assert Path(cached[0]["path"]) == snapshot
    _assert_unknown_id_message(unknown[0], "Org/NotCached", use_hf=False)


# -- downloads from a local hub, then offline from what the client cached -------------------------

@pytest.mark.parametrize("use_hf", [True, False], ids=["huggingface", "modelscope"])
def test_download_by_rank0_then_offline(use_hf: bool, tmp_path: Path) -> None:
    with FakeHub() as fake:
        fake.add_repo("Org/Tiny", {**WANTED, **UNWANTED})
        env = _env(tmp_path, fake.url)
        tiny, missing = _resolve(env, ["Org/Tiny", "Org/Missing"], use_hf=use_hf, world_size=2)
    # Both ranks get the same snapshot; the unknown id fails on every rank instead of hanging one.
    assert tiny[0] == tiny[1] and "path" in tiny[0]
    for rank_result in missing:
        _assert_unknown_id_message(rank_result, "Org/Missing", use_hf=use_hf)

    folder = Path(tiny[0]["path"])
    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert got == WANTED
    if use_hf:
        assert folder.parent.parent == tmp_path / "hf_home" / "hub" / "models--Org--Tiny"
        fetched = [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in fake.calls("GET", "/resolve/")]
    else:
        assert folder == tmp_path / "ms_cache" / "models" / "Org--Tiny" / "snapshots" / "master"
        fetched = [r.query["FilePath"][0] for r in fake.calls("GET", r"^/api/v1/models/Org/Tiny/repo$")]
    # Only rank 0 downloaded, each wanted file once, nothing else.
    assert sorted(fetched) == sorted(WANTED)

    # The hub is gone now: the same id resolves from what the client cached.
    [[again]] = _resolve(env, ["Org/Tiny"], use_hf=use_hf)
    assert again == tiny[0]


def test_allow_patterns_narrow_the_download(tmp_path: Path) -> None:
    with FakeHub() as fake:
        fake.add_repo("Org/Tiny", {**WANTED, **UNWANTED})
        [[result]] = _resolve(_env(tmp_path, fake.url), ["Org/Tiny"], use_hf=True, allow=["*.json"])
    folder = Path(result["path"])
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == sorted(name for name in WANTED if name.endswith(".json"))
    assert not fake.calls("GET", r"\.safetensors$")
