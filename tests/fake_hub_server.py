"""A tiny in-memory model hub on 127.0.0.1 that speaks what the hub clients call.

One threaded ``http.server`` answers both clients' endpoints (their paths do not overlap):

Hugging Face hub (huggingface_hub 2.4):
    GET  /api/models/{id}/revision/{rev}           model info (``sha`` = head commit)
    GET  /api/models/{id}/tree/{rev}[/{dir}]       file listing
    HEAD/GET /{id}/resolve/{rev}/{file}            file metadata (ETag, X-Repo-Commit, size) / bytes
    POST /api/repos/create                         create a repository (409 when it exists)
    POST /api/models/{id}/preupload/{rev}          upload mode per file: always "regular" (inline)
    POST /api/models/{id}/commit/{rev}             NDJSON commit: header + base64 files
    POST /api/validate-yaml                        README metadata check (always fine)

ModelScope (modelscope 1.40 / modelscope_hub):
    POST /api/v1/models                            create a repository (409 when it exists)
    GET  /api/v1/models/{id}/repo/files            file listing
    GET  /api/v1/models/{id}/repo?FilePath=...     file bytes
    POST /api/v1/repos/models/{id}/info/lfs/objects/batch   LFS batch: upload URLs for new blobs
    PUT  /lfs-blob/{sha256}                        blob upload target handed out above
    POST /api/v1/repos/models/{id}/commit/{rev}    JSON commit: base64 files and LFS pointers

Every request is recorded (method, path, headers, body). ``fail(method, pattern, status, ...)``
makes the next ``times`` matching requests answer ``status`` (status 0 closes the connection
without answering, like a reset; status -1 accepts and never answers, like a hung server).
Unknown routes answer 404 and are recorded, so a test can see what a client asked for. The server stops itself after ``lifetime_s`` even if a test forgets to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: what the HF hub reports as a file's ``oid``/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    """One repository: its files at the head commit and what was done to it."""

    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commit_messages: list[str] = field(default_factory=list)
    sha: str = "0" * 40

    def commit(self, message: str, files: dict[str, bytes]) -> str:
        self.files.update(files)
        self.commit_messages.append(message)
        digest = hashlib.sha1(repr((len(self.commit_messages), message, sorted(self.files))).encode())
        self.sha = digest.hexdigest()
        return self.sha


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0


class FakeHub:
    """Start with ``with FakeHub() as hub:``; ``hub.url`` is the endpoint to point a client at."""

    def __init__(self, *, lifetime_s: float = 60.0) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.blobs: dict[str, bytes] = {}  # ModelScope LFS blobs by sha256
        self.requests: list[Recorded] = []
        self._failures: list[list[Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._stopped = threading.Event()
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> FakeRepo:
        repo = FakeRepo(private=private)
        repo.commit("initial commit", files)
        self.repos[repo_id] = repo
        return repo

    def fail(self, method: str, pattern: str, status: int, *, times: int = 1, echo_auth: bool = False) -> None:
        """Answer the next ``times`` requests whose path matches ``pattern`` with ``status``.

        ``echo_auth`` puts the request's Authorization header into the error message, as a
        careless server or proxy might, so that a test can check that the token gets redacted.
        """
        self._failures.append([method, re.compile(pattern), status, times, echo_auth])

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        rx = re.compile(pattern)
        return [r for r in self.requests if r.method == method and rx.search(r.path)]

    # -- failure injection ---------------------------------------------------------------
    def _take_failure(self, method: str, path: str) -> tuple[int, bool] | None:
        with self._lock:
            for rule in self._failures:
                if rule[0] == method and rule[1].search(path) and rule[3] > 0:
                    rule[3] -= 1
                    return rule[2], rule[4]
        return None


_ID = r"(?P<id>[^/]+/[^/]+)"


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        # -- plumbing ------------------------------------------------------------------
        def _dispatch(self, method: str) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            rec = Recorded(method, path, parse_qs(split.query), headers, body)
            self._rec = rec
            with hub._lock:
                hub.requests.append(rec)
            failure = hub._take_failure(method, path)
            if failure is not None:
                status, echo = failure
                if status == -1:
                    hub._stopped.wait()
                    self.close_connection = True
                    return
                if status == 0:
                    self.close_connection = True
                    self.connection.close()
                    return
                text = f"injected failure {status}"
                if echo:
                    text += f" (request had authorization: {rec.headers.get('authorization')})"
                self._json(status, {"error": text, "Code": status, "Message": text})
                return
            for route_method, rx, fn in ROUTES:
                m = re.fullmatch(rx, path)
                if route_method == method and m:
                    fn(self, rec, **m.groupdict())
                    return
            self._json(404, {"error": f"no route {method} {path}"})

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self._rec.status = status

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # -- Hugging Face ------------------------------------------------------------------
        def hf_info(self, rec: Recorded, id: str, rev: str) -> None:
            repo = hub.repos.get(id)
            if repo is None:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            self._json(200, {"id": id, "modelId": id, "sha": repo.sha, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

        def hf_tree(self, rec: Recorded, id: str, rev: str, sub: str | None = None) -> None:
            repo = hub.repos.get(id)
            if repo is None:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            prefix = f"{sub}/" if sub else ""
            entries = [{"type": "file", "path": p, "size": len(b), "oid": git_blob_sha1(b)}
                       for p, b in sorted(repo.files.items()) if p.startswith(prefix)]
            self._json(200, entries)

        def hf_resolve(self, rec: Recorded, id: str, rev: str, file: str) -> None:
            repo = hub.repos.get(id)
            if repo is None or file not in repo.files:
                code = "RepoNotFound" if repo is None else "EntryNotFound"
                self._json(404, {"error": "not found"}, {"X-Error-Code": code})
                return
            data = repo.files[file]
            self._send(200, data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": repo.sha,
                                   "Content-Type": "application/octet-stream"})

        def hf_create(self, rec: Recorded) -> None:
            payload = json.loads(rec.body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                return
            private = payload.get("visibility") == "private" or payload.get("private") is True
            hub.repos[repo_id] = FakeRepo(private=private)
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def hf_preupload(self, rec: Recorded, id: str, rev: str) -> None:
            if id not in hub.repos:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            files = json.loads(rec.body)["files"]
            self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})

        def hf_validate_yaml(self, rec: Recorded) -> None:
            self._json(200, {"errors": [], "warnings": []})

        def hf_commit(self, rec: Recorded, id: str, rev: str) -> None:
            repo = hub.repos.get(id)
            if repo is None:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return
            message, files = "", {}
            for line in rec.body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    message = item["value"]["summary"]
                elif item["key"] == "file":
                    assert item["value"]["encoding"] == "base64"
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    self._json(400, {"error": f"fake hub accepts inline files only, got {item['key']}"})
                    return
            sha = repo.commit(message, files)
            self._json(200, {"commitUrl": f"{hub.url}/{id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None})

        # -- ModelScope --------------------------------------------------------------------
        def ms_create(self, rec: Recorded) -> None:
            payload = json.loads(rec.body)
            repo_id = f"{payload['Path']}/{payload['Name']}"
            if repo_id in hub.repos:
                self._json(409, {"Code": 10010205001, "Message": "repo already exists", "Success": False})
                return
            hub.repos[repo_id] = FakeRepo(private=payload.get("Visibility") == 1)
            self._json(200, {"Code": 200, "Success": True, "Data": {"Path": payload["Path"],
                                                                    "Name": payload["Name"]}})

        def ms_files(self, rec: Recorded, id: str) -> None:
            repo = hub.repos.get(id)
            if repo is None:
                self._json(404, {"Code": 10010205001, "Message": "model not found", "Success": False})
                return
            files = [{"Path": p, "Name": p.rsplit("/", 1)[-1], "Type": "blob", "Size": len(b),
                      "Sha256": hashlib.sha256(b).hexdigest(), "Revision": repo.sha}
                     for p, b in sorted(repo.files.items())]
            self._json(200, {"Code": 200, "Success": True, "Data": {"Files": files}})

        def ms_file(self, rec: Recorded, id: str) -> None:
            repo = hub.repos.get(id)
            path = rec.query.get("FilePath", [""])[0]
            if repo is None or path not in repo.files:
                self._json(404, {"Code": 10010205001, "Message": "file not found", "Success": False})
                return
            self._send(200, repo.files[path], {"Content-Type": "application/octet-stream"})

        def ms_lfs_batch(self, rec: Recorded, id: str) -> None:
            objects = json.loads(rec.body)["objects"]
            out = [{"oid": o["oid"], "size": o["size"],
                    "actions": {} if o["oid"] in hub.blobs
                    else {"upload": {"href": f"{hub.url}/lfs-blob/{o['oid']}"}}} for o in objects]
            self._json(200, {"Code": 200, "Success": True, "Data": {"objects": out}})

        def ms_blob(self, rec: Recorded, oid: str) -> None:
            if hashlib.sha256(rec.body).hexdigest() != oid:
                self._json(400, {"Code": 400, "Message": "sha256 mismatch"})
                return
            hub.blobs[oid] = rec.body
            self._json(200, {"Code": 200, "Success": True})

        def ms_commit(self, rec: Recorded, id: str, rev: str) -> None:
            repo = hub.repos.get(id)
            if repo is None:
                self._json(404, {"Code": 10010205001, "Message": "model not found", "Success": False})
                return
            payload = json.loads(rec.body)
            files = {}
            for action in payload["actions"]:
                if action["type"] == "lfs":
                    if action["sha256"] not in hub.blobs:
                        self._json(400, {"Code": 400, "Message": f"missing blob for {action['path']}"})
                        return
                    files[action["path"]] = hub.blobs[action["sha256"]]
                else:
                    files[action["path"]] = base64.b64decode(action["content"])
            sha = repo.commit(payload["commit_message"], files)
            self._json(200, {"Code": 200, "Success": True, "Data": {"CommitId": sha}})

    ROUTES = [
        ("GET", rf"/api/models/{_ID}/revision/(?P<rev>[^/]+)", Handler.hf_info),
        ("GET", rf"/api/models/{_ID}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?", Handler.hf_tree),
        ("HEAD", rf"/{_ID}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", Handler.hf_resolve),
        ("GET", rf"/{_ID}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", Handler.hf_resolve),
        ("POST", r"/api/repos/create", Handler.hf_create),
        ("POST", rf"/api/models/{_ID}/preupload/(?P<rev>[^/]+)", Handler.hf_preupload),
        ("POST", rf"/api/models/{_ID}/commit/(?P<rev>[^/]+)", Handler.hf_commit),
        ("POST", r"/api/validate-yaml", Handler.hf_validate_yaml),
        ("POST", r"/api/v1/models", Handler.ms_create),
        ("GET", rf"/api/v1/models/{_ID}/repo/files", Handler.ms_files),
        ("GET", rf"/api/v1/models/{_ID}/repo", Handler.ms_file),
        ("POST", rf"/api/v1/repos/models/{_ID}/info/lfs/objects/batch", Handler.ms_lfs_batch),
        ("PUT", r"/lfs-blob/(?P<oid>[0-9a-f]{64})", Handler.ms_blob),
        ("POST", rf"/api/v1/repos/models/{_ID}/commit/(?P<rev>[^/]+)", Handler.ms_commit),
    ]
    return Handler
