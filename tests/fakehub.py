"""A stand-in for the Hugging Face hub: just enough of its API for huggingface_hub's ``model_info`` and
``snapshot_download``, in a thread of the test process, with fault switches and a request log.

Point huggingface_hub at it with ``endpoint=hub.url`` or ``HF_ENDPOINT=<hub.url>``. It serves the repos it is
given (repo id -> {file path: bytes}), each at one commit:

- ``GET /api/models/{repo}[/revision/{rev}]``: ``id``, ``sha`` and ``siblings`` (with ``size`` and ``blobId``
  when ``blobs`` is asked for), as ``HfApi.model_info`` reads them;
- ``GET /api/models/{repo}/tree/{rev}``: every file and folder, as ``HfApi.list_repo_tree(recursive=True)`` reads
  them (one page);
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the file, with the headers huggingface_hub checks before it
  downloads (``X-Repo-Commit``, ``ETag``, ``Content-Length``); ``Range`` is honoured.

A revision is ``main``, the commit itself, or a name in ``revisions``; another one is 404 ``RevisionNotFound``.
Errors carry ``X-Error-Code`` like the hub's, which is how huggingface_hub tells them apart.

Switches (attributes; the next request sees a change):

- ``missing``: repo ids answered as the hub answers a repo that does not exist or is private: 401 without a
  token, 404 with one, ``RepoNotFound``;
- ``gated``: repo ids whose files need ``Authorization: Bearer <token>`` with ``token``: 401 ``GatedRepo`` without
  one, 403 with another one. Their listing stays readable, as on the hub;
- ``status`` / ``status_times``: answer that status (503...) instead, for that many requests (None: all);
- ``chunk_delay``: seconds between 64 KiB chunks of a file (a slow link).

``requests`` logs every request: method, path, query and the ``Authorization`` header it carried.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    status: int = 0


class FakeHub:
    """Serves ``repos`` (repo id -> {path: content}) on 127.0.0.1; use as a context manager."""

    def __init__(self, repos: Mapping[str, Mapping[str, bytes]]) -> None:
        self.repos = {repo: dict(files) for repo, files in repos.items()}
        self.revisions: dict[str, dict[str, str]] = {}  # repo -> {tag or branch: commit}, besides main
        self.missing: set[str] = set()
        self.gated: set[str] = set()
        self.token: str | None = None
        self.status: int | None = None
        self.status_times: int | None = None
        self.chunk_delay = 0.0
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fakehub", daemon=True
        )

    # ------------------------------------------------------------------------------------- control

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def commit(self, repo: str) -> str:
        """The repo's one commit: a hash of its files, 40 hex digits like a git commit."""
        digest = hashlib.sha1(repo.encode())
        for path, content in sorted(self.repos[repo].items()):
            digest.update(path.encode() + b"\0" + hashlib.sha1(content).digest())
        return digest.hexdigest()

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def file_gets(self, repo: str | None = None) -> list[str]:
        """The files fetched with GET (their paths in the repo), in order."""
        found = []
        for request in self.log():
            if request.method == "GET" and "/resolve/" in request.path:
                name, _, rest = request.path.lstrip("/").partition("/resolve/")
                if repo is None or name == repo:
                    found.append(rest.split("/", 1)[1])
        return found

    def wait(self, condition: Callable[[FakeHub], Any], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"fake hub: timed out after {timeout} s waiting for {what}")
            time.sleep(0.01)

    # --------------------------------------------------------------------------------- internals

    def _take_status(self) -> int | None:
        with self._lock:
            if self.status is None:
                return None
            if self.status_times is not None:
                if self.status_times <= 0:
                    return None
                self.status_times -= 1
            return self.status

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _resolve(self, repo: str, revision: str) -> str | None:
        commit = self.commit(repo)
        if revision in ("main", commit):
            return commit
        return self.revisions.get(repo, {}).get(revision)


def _blob_id(content: bytes) -> str:
    # git's blob id: what the hub sends as a regular file's ETag.
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _api_path(rest: str) -> tuple[str, str, str]:
    """``{repo}[/revision/{rev}]`` or ``{repo}/tree/{rev}[/{path}]``: the repo, the revision and info or tree."""
    if "/tree/" in rest:
        repo, _, revision = rest.partition("/tree/")
        return repo, revision, "tree"
    repo, _, revision = rest.partition("/revision/")
    return repo, revision or "main", "info"


def _folders(paths: list[str]) -> list[str]:
    found = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    return sorted(found)


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the request log is the record

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, *, send_body: bool) -> None:
            parts = urlsplit(self.path)
            request = Request(
                self.command, unquote(parts.path), parse_qs(parts.query), self.headers.get("Authorization")
            )
            hub._record(request)
            try:
                self._route(request, send_body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away

        def _route(self, request: Request, send_body: bool) -> None:
            status = hub._take_status()
            if status is not None:
                self._json(request, status, {"error": f"status {status}"})
                return
            path = request.path
            if path.startswith("/api/models/"):
                repo, revision, kind = _api_path(path.removeprefix("/api/models/"))
                if not self._visible(request, repo):
                    return
                commit = self._commit(request, repo, revision.split("/")[0])
                if commit is None:
                    return
                if kind == "info":
                    self._info(request, repo, commit)
                else:
                    self._tree(request, repo)
                return
            if "/resolve/" in path:
                repo, _, rest = path.lstrip("/").partition("/resolve/")
                revision, _, name = rest.partition("/")
                if not self._visible(request, repo):
                    return
                commit = self._commit(request, repo, revision)
                if commit is None or not self._may_read(request, repo):
                    return
                self._file(request, repo, commit, name, send_body)
                return
            self._json(request, 404, {"error": "not found"})

        # ------------------------------------------------------------------------------ checks

        def _visible(self, request: Request, repo: str) -> bool:
            if repo in hub.repos and repo not in hub.missing:
                return True
            status = 404 if request.authorization else 401
            self._error(request, status, "RepoNotFound", "Repository not found")
            return False

        def _commit(self, request: Request, repo: str, revision: str) -> str | None:
            commit = hub._resolve(repo, unquote(revision))
            if commit is None:
                self._error(request, 404, "RevisionNotFound", "Invalid rev id: " + revision)
            return commit

        def _may_read(self, request: Request, repo: str) -> bool:
            if repo not in hub.gated or (hub.token is not None and request.authorization == f"Bearer {hub.token}"):
                return True
            status = 403 if request.authorization else 401
            message = f"Access to model {repo} is restricted. You must have access to it and be authenticated."
            self._error(request, status, "GatedRepo", message)
            return False

        # ----------------------------------------------------------------------------- answers

        def _info(self, request: Request, repo: str, commit: str) -> None:
            blobs = request.query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for name, content in sorted(hub.repos[repo].items()):
                sibling: dict[str, Any] = {"rfilename": name}
                if blobs:
                    sibling.update(size=len(content), blobId=_blob_id(content))
                siblings.append(sibling)
            body = {
                "_id": commit[:24],
                "id": repo,
                "modelId": repo,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo in hub.gated else False,
                "disabled": False,
                "lastModified": "2025-01-01T00:00:00.000Z",
                "tags": [],
                "siblings": siblings,
            }
            self._json(request, 200, body)

        def _tree(self, request: Request, repo: str) -> None:
            files = hub.repos[repo]
            entries: list[dict[str, Any]] = [
                {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
                for folder in _folders(list(files))
            ]
            entries += [
                {"type": "file", "oid": _blob_id(content), "size": len(content), "path": name}
                for name, content in sorted(files.items())
            ]
            self._json(request, 200, entries)

        def _file(self, request: Request, repo: str, commit: str, name: str, send_body: bool) -> None:
            content = hub.repos[repo].get(name)
            if content is None:
                self._error(request, 404, "EntryNotFound", f"{name} does not exist on commit {commit}", commit=commit)
                return
            start = 0
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                start = min(int(wanted.removeprefix("bytes=").split("-")[0] or 0), len(content))
                request.status = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            else:
                request.status = 200
                self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{_blob_id(content)}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content) - start))
            self.end_headers()
            if not send_body:
                return
            for offset in range(start, len(content), CHUNK):
                self.wfile.write(content[offset : offset + CHUNK])
                self.wfile.flush()
                if hub.chunk_delay:
                    time.sleep(hub.chunk_delay)

        def _error(self, request: Request, status: int, code: str, message: str, *, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            if commit is not None:
                headers["X-Repo-Commit"] = commit
            self._json(request, status, {"error": message}, headers)

        def _json(self, request: Request, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            request.status = status
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler
