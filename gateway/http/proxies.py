"""Where the URLs the gateway hands out point (image URLs): never at a host a client made up.

Built from the request's Host header (Starlette's ``request.base_url``), they would point wherever a client says.
Instead they start with GATEWAY_PUBLIC_URL when it is set; otherwise with the address the client connected to,
unless a trusted proxy (GATEWAY_FORWARDED_ALLOW_IPS) says with X-Forwarded-Proto and X-Forwarded-Host how clients
reach it. The same list decides whom uvicorn believes about X-Forwarded-For and X-Forwarded-Proto, so one
setting governs every forwarded header: ``TrustedProxies`` runs uvicorn's own middleware for those two and reads
X-Forwarded-Host (which uvicorn ignores) under the same check. uvicorn's built-in copy must then be off
(``proxy_headers=False``): it would rewrite the client address before the check could see the proxy's.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

FORWARDED_HOST = "forwarded_host"  # the key in the request's state (scope["state"])
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$")
_ANY_ADDRESS = ("", "0.0.0.0", "::")


class TrustedProxies:
    """uvicorn's X-Forwarded-For and X-Forwarded-Proto handling, plus X-Forwarded-Host, for trusted peers only."""

    def __init__(self, app: ASGIApp, *, allow_ips: str) -> None:
        self._proxy = ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=allow_ips)
        self._trusted = self._proxy.trusted_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("client")
        if scope["type"] == "http" and peer and peer[0] in self._trusted:
            host = forwarded_host(scope["headers"])
            if host is not None:
                scope.setdefault("state", {})[FORWARDED_HOST] = host
        await self._proxy(cast(Any, scope), cast(Any, receive), cast(Any, send))


def forwarded_host(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The X-Forwarded-Host a proxy set: the last of a list (the nearest proxy's), if it is a host[:port] at all."""
    for name, value in headers:
        if name == b"x-forwarded-host":
            host = value.decode("latin-1").rsplit(",", 1)[-1].strip()
            return host if _HOST.match(host) else None
    return None


class PublicOrigin:
    """The ``scheme://host[:port][/prefix]`` that URLs handed to clients start with."""

    def __init__(self, public_url: str | None, *, host: str, port: int) -> None:
        self._fixed = public_url.rstrip("/") if public_url else None
        # Only when a request carries no local address (some ASGI test transports): what the gateway listens on.
        self._listening = authority("127.0.0.1" if host in _ANY_ADDRESS else host, port)

    def of(self, scope: Scope) -> str:
        if self._fixed is not None:
            return self._fixed
        host = scope.get("state", {}).get(FORWARDED_HOST)
        if host is None:
            server = scope.get("server")
            host = authority(server[0], server[1]) if server and server[1] else self._listening
        return f"{scope['scheme']}://{host}"


def authority(host: str, port: int) -> str:
    """``host:port`` for a URL: IPv6 addresses in brackets, IPv4-mapped ones (a dual-stack socket's) as IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return f"{host}:{port}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return f"[{address}]:{port}"
        address = address.ipv4_mapped
    return f"{address}:{port}"


__all__ = ["FORWARDED_HOST", "PublicOrigin", "TrustedProxies", "authority", "forwarded_host"]
