"""A real HTTP file server for download tests, in a thread of the test process, with fault switches.

Every switch is an attribute that a test may change at any time; the next request sees it:

- ``ranges``: honour ``Range`` (206) or ignore it (200, the whole file);
- ``cut_after`` / ``cut_times``: close the connection after that many body bytes, for the next
  ``cut_times`` responses (None: every response);
- ``hold_after`` / ``hold_times``: stop after that many body bytes until :meth:`release` (the test decides
  when the download may go on, instead of guessing with sleeps);
- ``chunk_size`` / ``chunk_delay``: a slow server;
- ``status`` / ``status_times``: answer with that status (404, 401, 503...) instead of the file;
- ``corrupt``: send the same number of bytes with one flipped, so a sha256 check must fail.

``requests`` logs every request: its ``Range`` and ``If-Range`` headers, the status and the body bytes
actually sent.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int = 0
    sent: int = 0
    finished: bool = False  # the handler is done with this request (whatever happened)


class FileServer:
    """Serves ``content`` at ``path`` on 127.0.0.1; use as a context manager."""

    def __init__(self, content: bytes, *, path: str = "/model.bin", etag: str | None = '"v1"') -> None:
        self.content = content
        self.path = path
        self.etag = etag
        self.ranges = True
        self.cut_after: int | None = None
        self.cut_times: int | None = 1
        self.hold_after: int | None = None
        self.hold_times: int | None = 1
        self.chunk_size = 64 * 1024
        self.chunk_delay = 0.0
        self.status: int | None = None
        self.status_times: int | None = None
        self.corrupt = False
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fileserver", daemon=True
        )

    # ------------------------------------------------------------------------------------- control

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.path}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def release(self) -> None:
        """Let held responses go on."""
        self._released.set()

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return sum(r.sent for r in self.requests)

    def gets(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET"]

    def wait(self, condition: Callable[[FileServer], Any], timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"file server: timed out after {timeout} s waiting for {what}")
            time.sleep(0.01)

    # --------------------------------------------------------------------------------- internals

    def _take(self, name: str) -> bool:
        """Whether the switch ``name`` applies to this response, counting it down when limited."""
        with self._lock:
            times = getattr(self, f"{name}_times")
            if times is None:
                return True
            if times <= 0:
                return False
            setattr(self, f"{name}_times", times - 1)
            return True

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _body(self) -> bytes:
        if not self.corrupt or not self.content:
            return self.content
        middle = len(self.content) // 2
        return self.content[:middle] + bytes([self.content[middle] ^ 0xFF]) + self.content[middle + 1 :]


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the request log is the record; stderr noise helps nobody

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, *, send_body: bool) -> None:
            request = Request(self.command, self.path, self.headers.get("Range"), self.headers.get("If-Range"))
            server._log(request)
            try:
                self._answer(request, send_body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away; that is its business
            finally:
                request.finished = True

        def _answer(self, request: Request, send_body: bool) -> None:
            if server.status is not None and server._take("status"):
                self._plain(request, server.status, f"status {server.status}\n".encode())
                return
            if self.path.split("?")[0] != server.path:
                self._plain(request, 404, b"not found\n")
                return
            body = server._body()
            start = 0
            wanted = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            use_range = server.ranges and wanted is not None and (if_range is None or if_range == server.etag)
            if use_range:
                assert wanted is not None
                spec = wanted.removeprefix("bytes=").split("-")[0]
                start = int(spec)
                if start >= len(body):
                    request.status = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request.status = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                request.status = 200
                self.send_response(200)
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if server.etag:
                self.send_header("ETag", server.etag)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if send_body:
                self._send_body(request, body[start:])

        def _send_body(self, request: Request, data: bytes) -> None:
            cut = server.cut_after if server.cut_after is not None and server._take("cut") else None
            hold = server.hold_after if server.hold_after is not None and server._take("hold") else None
            offset = 0
            while offset < len(data):
                if server._closing.is_set():
                    break
                if hold is not None and offset >= hold:
                    server._released.wait()
                    hold = None
                limit = len(data)
                for stop in (cut, hold):
                    if stop is not None and stop > offset:
                        limit = min(limit, stop)
                if cut is not None and offset >= cut:
                    # Cut mid-file: no more bytes, then the socket goes away under the client.
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                chunk = data[offset : min(limit, offset + server.chunk_size)]
                self.wfile.write(chunk)
                self.wfile.flush()
                offset += len(chunk)
                request.sent = offset
                if server.chunk_delay:
                    time.sleep(server.chunk_delay)

        def _plain(self, request: Request, status: int, body: bytes) -> None:
            request.status = status
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
