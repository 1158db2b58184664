"""Hostile clients against a real gateway, over real sockets: request heads that never end, more connections than
allowed, control characters meant to forge log lines, made-up Host and forwarded headers.

Timeouts are set low (1 s) and waited for with deadlines many times larger, so nothing here depends on how fast the
machine is; where a test must know that a timeout has passed, it waits for another connection to be closed by it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.helpers import Gateway, wait_for

Start = Callable[..., Gateway]
# The Host names these tests send: the gateway answers to them only when told (tests/integration/test_browsers.py).
HOSTS = {"GATEWAY_ALLOWED_HOSTS": "gateway.test,evil.example"}

DEADLINE = 30.0  # seconds to wait for something a 1 s timeout causes: generous for a busy machine
FORGED = "1999-01-01 00:00:00,000 INFO gateway.access: GET /forged"
IMAGE = {"model": "tiny-flux", "prompt": "a cat"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(gw: Gateway) -> socket.socket:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=DEADLINE)


def head(method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP answer with a Content-Length (every answer these tests ask for has one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed before a whole answer: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection was closed in the middle of an answer's body"
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body)


def closed_by_gateway(sock: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the gateway to close the connection; what it sends first is read."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


# ------------------------------------------------------------------------------------------ request heads


def test_a_request_head_that_never_ends_is_cut_off(gateways: Start) -> None:
    gw = gateways(env={**HOSTS, "GATEWAY_HEADER_TIMEOUT": "1"})
    silent = connect(gw)  # connects and sends nothing
    slow = connect(gw)
    slow.sendall(b"GET /healthz HT")  # half a request line, then nothing
    assert closed_by_gateway(slow) and closed_by_gateway(silent)
    assert httpx.get(gw.url + "/healthz").status_code == 200  # an ordinary client is unaffected


def test_head_deadline_spares_idle_keep_alive_connections_and_slow_bodies(gateways: Start) -> None:
    gw = gateways(env={**HOSTS, "GATEWAY_HEADER_TIMEOUT": "1"})
    idle = connect(gw)
    idle.sendall(head("GET", "/healthz"))
    assert read_answer(idle).status == 200  # ... and the connection stays open, idle
    body = json.dumps(CHAT).encode()
    uploading = connect(gw)
    uploading.sendall(head("POST", "/v1/chat/completions", body=body) + body[:5])  # the body, slowly

    # A connection opened after both, sending half a head: once the gateway closes it, more than the head timeout
    # has passed for the two above too.
    clock = connect(gw)
    clock.sendall(b"GET /hea")
    assert closed_by_gateway(clock)

    idle.sendall(head("GET", "/healthz"))  # an idle keep-alive connection is uvicorn's keep-alive timeout's business
    assert read_answer(idle).status == 200
    uploading.sendall(body[5:])  # and a slow body is not a slow head
    assert read_answer(uploading).status == 200

    # The next head on a keep-alive connection has the same deadline, from its first byte.
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: gatew")
    assert closed_by_gateway(idle)


# ------------------------------------------------------------------------------------------ connection cap


def served_connection(gw: Gateway) -> socket.socket | None:
    """A connection the gateway has answered, kept open; None if it was refused (a closed one may still count
    for a moment: the gateway learns of a close when it reads it)."""
    sock = connect(gw)
    sock.sendall(head("GET", "/healthz"))
    if read_answer(sock).status == 200:
        return sock
    sock.close()
    return None


def hold(gw: Gateway) -> socket.socket:
    sock = wait_for(lambda: served_connection(gw), 10, "a connection the gateway serves")
    assert sock is not None
    return sock


def test_connections_beyond_the_cap_get_an_openai_shaped_503(gateways: Start) -> None:
    gw = gateways(env={**HOSTS, "GATEWAY_MAX_CONNECTIONS": "5"})
    held = [hold(gw) for _ in range(5)]

    extra = connect(gw)  # sends nothing: the refusal comes at once
    refused = read_answer(extra)
    assert refused.status == 503
    assert refused.headers["content-type"] == "application/json" and refused.headers["connection"] == "close"
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, "too_many_connections")
    assert "GATEWAY_MAX_CONNECTIONS" in error["message"]
    assert closed_by_gateway(extra)

    eager = connect(gw)  # sends its request first: it reads the same answer, not a reset connection
    eager.sendall(head("POST", "/v1/chat/completions", body=json.dumps(CHAT).encode()))
    assert read_answer(eager).json()["error"]["code"] == "too_many_connections"
    assert closed_by_gateway(eager)

    for sock in (*held[:2], extra, eager):
        sock.close()
    again = hold(gw)  # served once others have closed
    held[2].sendall(head("GET", "/healthz"))
    assert read_answer(held[2]).status == 200  # the connections that were open all along are still served
    for sock in (*held[2:], again):
        sock.close()


# ------------------------------------------------------------------------------------------ the access log


def test_control_characters_cannot_forge_access_log_lines(gateways: Start) -> None:
    gw = gateways(env=HOSTS)  # GATEWAY_LOG_FORMAT=text
    ids = {"path": "forge-path", "model": "forge-model", "error": "forge-501", "sync": "sync-after"}

    sock = connect(gw)
    sock.sendall(head("GET", "/v1/models%0a" + quote(FORGED) + "%0d%0a%1b[2J", headers={"X-Request-ID": ids["path"]}))
    assert read_answer(sock).status == 404
    bad_model = {**CHAT, "model": "tiny-chat\n" + FORGED}
    answer = httpx.post(gw.v1 + "/chat/completions", json=bad_model, headers={"X-Request-ID": ids["model"]})
    assert answer.json()["error"]["code"] == "model_not_found"
    # 5xx answers are also logged as warnings, with the path (a newline would not match the route: an escape does).
    sock.sendall(head("GET", "/v1/files/%1b[2J%0d" + quote(FORGED), headers={"X-Request-ID": ids["error"]}))
    assert read_answer(sock).status == 501

    raw = connect(gw)  # a raw line feed in the request line: uvicorn's parser refuses it before any app sees it
    raw.sendall(b"GET /x\n" + FORGED.encode() + b" HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
    assert raw.recv(65536).startswith(b"HTTP/1.1 400 ")
    # Lines are written in order: once this request's is there, those of the requests above are too.
    assert httpx.get(gw.v1 + "/models", headers={"X-Request-ID": ids["sync"]}).status_code == 200
    wait_for(lambda: f"request_id={ids['sync']}" in gw.log(), 10, "the access log line of the last request")

    lines = gw.log().splitlines()
    for request_id in ids.values():
        assert len([line for line in lines if f"request_id={request_id}" in line]) == 1, request_id
    assert not [line for line in lines if line.startswith(FORGED[:10]) or "GET /forged" in line]
    (path_line,) = [line for line in lines if f"request_id={ids['path']}" in line]
    assert "GET /v1/models%0A1999-01-01%2000:00:00,000%20INFO%20gateway.access:%20GET%20/forged%0D%0A%1B[2J " in (
        path_line
    )
    (model_line,) = [line for line in lines if f"request_id={ids['model']}" in line]
    assert " model=- status=404 " in model_line  # an unknown model name is not logged at all
    (warning,) = [line for line in lines if "-> 501" in line]
    assert "GET /v1/files/%1B[2J" in warning


# ------------------------------------------------------------------------------------------ URLs and hosts


def image_url(gw: Gateway, headers: dict[str, str]) -> str:
    answer = httpx.post(gw.v1 + "/images/generations", json=IMAGE, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    url: str = answer.json()["data"][0]["url"]
    return url


def test_made_up_host_headers_make_no_urls(gateways: Start) -> None:
    gw = gateways(env=HOSTS)
    url = image_url(gw, {"Host": "evil.example"})
    assert url.startswith(gw.url + "/images/image-")  # the address the client connected to
    assert httpx.get(url).status_code == 200

    for path, method in (("/healthz/", "GET"), ("/v1/chat/completions/", "POST"), ("/v1/models/", "GET")):
        answer = httpx.request(method, gw.url + path, headers={"Host": "evil.example"}, json=CHAT)
        assert answer.status_code == 404 and "location" not in answer.headers, path  # no redirect: an API 404
        assert "evil" not in answer.text

    # From a trusted proxy (127.0.0.1 is, by default), the forwarded host and scheme are how clients reach it;
    # a forwarded host that is no host[:port] is ignored.
    forwarded = {"Host": "evil.example", "X-Forwarded-Host": "llm.example.com:8443", "X-Forwarded-Proto": "https"}
    assert image_url(gw, forwarded).startswith("https://llm.example.com:8443/images/image-")
    assert image_url(gw, {"X-Forwarded-Host": "evil.example/phish?x="}).startswith(gw.url + "/images/image-")


def test_forwarded_headers_count_only_from_trusted_proxies(gateways: Start) -> None:
    gw = gateways(env={**HOSTS, "GATEWAY_FORWARDED_ALLOW_IPS": "192.0.2.1"})  # the test's 127.0.0.1 is no trusted proxy
    forwarded = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    assert image_url(gw, forwarded).startswith(gw.url + "/images/image-")


@pytest.mark.parametrize("public_url", ["https://llm.example.com/gateway/", "http://10.1.2.3:9000"])
def test_public_url_is_the_base_of_every_url(gateways: Start, public_url: str) -> None:
    gw = gateways(env={**HOSTS, "GATEWAY_PUBLIC_URL": public_url})
    headers = {"Host": "evil.example", "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    url = image_url(gw, headers)
    assert url.startswith(public_url.rstrip("/") + "/images/image-")
    assert httpx.get(gw.url + "/images/" + url.rsplit("/", 1)[1]).status_code == 200
