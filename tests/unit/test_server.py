"""The HTTP server's refusal of connections beyond GATEWAY_MAX_CONNECTIONS: a whole, valid HTTP answer."""

from __future__ import annotations

import json

from gateway.http.server import http_protocol, refusal


def test_refusal_is_an_openai_shaped_503_that_closes_the_connection() -> None:
    head, _, body = refusal(5).partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert headers == {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "retry-after": "1",
        "connection": "close",
    }
    error = json.loads(body)["error"]
    assert (error["type"], error["param"], error["code"]) == ("server_error", None, "too_many_connections")
    assert "5 open connections" in error["message"] and "GATEWAY_MAX_CONNECTIONS" in error["message"]


def test_refusal_names_the_node_when_it_has_a_name() -> None:
    head = refusal(5, "gw-2").partition(b"\r\n\r\n")[0].decode()
    assert "\r\nx-gateway-node: gw-2\r\n" in head and head.endswith("connection: close")
    assert http_protocol(header_timeout=1, max_connections=5, node="gw-2").limits.refusal == refusal(5, "gw-2")


def test_each_server_gets_its_own_limits() -> None:
    one, two = http_protocol(header_timeout=1, max_connections=5), http_protocol(header_timeout=2, max_connections=0)
    assert (one.limits.header_timeout, one.limits.max_connections) == (1, 5)
    assert (two.limits.header_timeout, two.limits.max_connections) == (2, 0)
