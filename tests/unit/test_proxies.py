"""Where generated URLs point: the public URL, the connection's own address, or what a trusted proxy forwards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.http.proxies import FORWARDED_HOST, PublicOrigin, TrustedProxies, authority, forwarded_host


def http_scope(peer: str, headers: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "client": (peer, 50000),
        "server": ("127.0.0.1", 8080),
        "scheme": "http",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "state": {},
        **extra,
    }


def seen_by_app(allow_ips: str, scope: dict[str, Any]) -> Scope:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    asyncio.run(TrustedProxies(app, allow_ips=allow_ips)(scope, receive, send))
    return seen[0]


FORWARDED = {"X-Forwarded-Host": "llm.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}


def test_a_trusted_proxy_forwards_host_scheme_and_client() -> None:
    scope = seen_by_app("127.0.0.1,::1", http_scope("127.0.0.1", FORWARDED))
    assert scope["state"][FORWARDED_HOST] == "llm.example.com"
    assert scope["scheme"] == "https" and scope["client"][0] == "203.0.113.9"
    assert PublicOrigin(None, host="127.0.0.1", port=8080).of(scope) == "https://llm.example.com"


@pytest.mark.parametrize("allow_ips", ["", "192.0.2.1", "10.0.0.0/8"])
def test_anyone_else_forwards_nothing(allow_ips: str) -> None:
    scope = seen_by_app(allow_ips, http_scope("127.0.0.1", FORWARDED))
    assert FORWARDED_HOST not in scope["state"]
    assert scope["scheme"] == "http" and scope["client"][0] == "127.0.0.1"
    assert PublicOrigin(None, host="0.0.0.0", port=9000).of(scope) == "http://127.0.0.1:8080"


def test_networks_and_star_are_trusted_proxies() -> None:
    assert seen_by_app("10.0.0.0/8", http_scope("10.1.2.3", FORWARDED))["state"][FORWARDED_HOST] == "llm.example.com"
    assert seen_by_app("*", http_scope("198.51.100.7", FORWARDED))["state"][FORWARDED_HOST] == "llm.example.com"


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("llm.example.com", "llm.example.com"),
        ("llm.example.com:8443", "llm.example.com:8443"),
        ("client.example, proxy.example:80", "proxy.example:80"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("10.0.0.5", "10.0.0.5"),
        ("evil.example/phish", None),
        ("a b", None),
        ("", None),
        ("user@evil.example", None),
        ("evil.example:80:80", None),
        ("-evil.example", None),
        ("evil.example\r\nX: y", None),
    ],
)
def test_forwarded_host_is_one_host_and_port(value: str, host: str | None) -> None:
    assert forwarded_host([(b"x-forwarded-host", value.encode())]) == host


def test_public_url_wins_over_everything() -> None:
    origin = PublicOrigin("https://llm.example.com/gateway/", host="127.0.0.1", port=8080)
    scope = http_scope("127.0.0.1", {}, state={FORWARDED_HOST: "evil.example"})
    assert origin.of(scope) == "https://llm.example.com/gateway"


@pytest.mark.parametrize(
    ("server", "origin"),
    [
        (("10.0.0.5", 8080), "http://10.0.0.5:8080"),
        (("::1", 8080), "http://[::1]:8080"),
        (("::ffff:10.0.0.5", 80), "http://10.0.0.5:80"),
        (None, "http://127.0.0.1:9000"),
    ],
)
def test_otherwise_the_address_the_client_connected_to(server: tuple[str, int] | None, origin: str) -> None:
    scope = http_scope("198.51.100.7", {"Host": "evil.example"}, server=server)
    assert PublicOrigin(None, host="::", port=9000).of(scope) == origin


def test_authority_brackets_ipv6_only() -> None:
    assert authority("gateway.internal", 80) == "gateway.internal:80"
    assert authority("fe80::1%eth0", 80) == "[fe80::1]:80"
    assert authority("192.0.2.1", 8080) == "192.0.2.1:8080"
