"""What a web page in the user's browser may make the gateway do: nothing, unless the operator says so.

A gateway on a desk has no keys, and a browser on the same machine can reach it. Two attacks follow, and both are
refused here, before any route runs:

- **DNS rebinding.** A page on ``evil.example`` has its name re-pointed at 127.0.0.1 and then talks to the gateway
  as its own origin, reading answers too. Its requests carry ``Host: evil.example``. Only the names a local user
  types are accepted by default (``localhost``, ``*.localhost``, the machine's host name, any IP address: a
  rebinding needs a name), plus the host of GATEWAY_PUBLIC_URL and GATEWAY_ALLOWED_HOSTS; anything else is a 403
  that names that setting (Ollama fixed CVE-2024-28224 the same way).
- **Cross-site requests.** A page on another origin cannot read answers without CORS, but it can send: a
  ``<form method=POST>`` to ``/admin/engine/stop``, a ``no-cors`` fetch of a prompt (this gateway reads text/plain
  and form bodies as JSON, as curl sends them). Every request that can change something or reach an engine (any
  method but GET, HEAD and OPTIONS) is refused when it says it comes from a page of another origin (``Origin``
  not the gateway's own, or ``Sec-Fetch-Site: cross-site``), unless that origin is in GATEWAY_CORS_ORIGINS.
  Clients that are not browsers (curl, the SDKs) send neither header and are not affected; the console is on the
  gateway's own origin.

GATEWAY_CORS_ORIGINS lets browser applications on other origins in, with proper preflights (Starlette's
CORSMiddleware does the protocol); ``*`` allows any origin without credentials, never with them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import socket
from collections.abc import Iterable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..dialects.errors import error_bytes
from ..errors import Forbidden

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# What a browser application on an allowed origin may send and read.
ALLOWED_HEADERS = (
    "authorization",
    "content-type",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "x-request-id",
    "x-keep-alive",
    "cache-control",
    "openai-beta",
    "x-stainless-*",
)
EXPOSED_HEADERS = ("x-request-id", "retry-after", "x-cache", "x-should-retry", "x-ignored-options")


def default_hosts(public_url: str | None, listen_host: str) -> list[str]:
    """The names a local user types, and the gateway's configured public name."""
    hosts = ["localhost", "*.localhost"]
    with contextlib.suppress(OSError):
        name = socket.gethostname().lower()
        if name:
            hosts += [name, f"{name}.local"]
    if listen_host and listen_host not in ("0.0.0.0", "::", ""):
        hosts.append(listen_host.lower())
    if public_url:
        host = public_url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        hosts.append(_strip_port(host))
    return hosts


_VERDICTS = 256  # Host headers remembered at most


class BrowserGuard:
    """Pure ASGI middleware: the Host allowlist for every request, the origin check for those that change things."""

    def __init__(
        self, app: ASGIApp, *, hosts: Iterable[str], cors_origins: Iterable[str], public_origin: str | None
    ) -> None:
        patterns = [h.strip().lower() for h in hosts if h.strip()]
        self._any_host = "*" in patterns
        self._hosts = frozenset(p for p in patterns if "*" not in p)
        self._host_patterns = tuple(p for p in patterns if "*" in p and p != "*")
        origins = [o.strip().rstrip("/") for o in cors_origins if o.strip()]
        self._any_origin = "*" in origins
        self._origins = frozenset(o.lower() for o in origins if "*" not in o)
        self._origin_patterns = tuple(o.lower() for o in origins if "*" in o and o != "*")
        self._public_origin = public_origin.rstrip("/").lower() if public_origin else None
        # The Host headers seen, and whether each is allowed: a gateway is reached under a handful of names, and
        # parsing one as an IP address costs more than the rest of this check.
        self._verdicts: dict[str, bool] = {}
        if origins:
            # The CORS protocol itself (preflights, Access-Control-* headers) is Starlette's. Credentials (cookies,
            # HTTP auth) only for origins named one by one: with "*" a browser would refuse them anyway.
            app = CORSMiddleware(
                app,
                allow_origins=["*"] if self._any_origin else sorted(self._origins),
                allow_origin_regex="|".join(_regex(p) for p in self._origin_patterns) or None,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                allow_headers=list(ALLOWED_HEADERS),
                expose_headers=list(EXPOSED_HEADERS),
                allow_credentials=not self._any_origin,
                max_age=600,
            )
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = sec_fetch_site = host = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"sec-fetch-site":
                sec_fetch_site = value.decode("latin-1")
        if not self._host_allowed(host):
            await _refuse(
                send,
                scope["path"],
                Forbidden(
                    f"The Host {host!r} is not one this gateway answers to (a web page may be trying to reach it "
                    "through DNS rebinding). If you reach the gateway under that name, add it to "
                    "GATEWAY_ALLOWED_HOSTS.",
                    code="host_not_allowed",
                ),
            )
            return
        if scope["method"] not in SAFE_METHODS and not self._origin_allowed(scope, host, origin, sec_fetch_site):
            await _refuse(
                send,
                scope["path"],
                Forbidden(
                    f"A web page on another origin ({origin or 'a cross-site page'}) may not send this request. If a "
                    "browser application of yours needs to, add its origin to GATEWAY_CORS_ORIGINS.",
                    code="cross_site_request",
                ),
            )
            return
        await self.app(scope, receive, send)

    def _host_allowed(self, host: str | None) -> bool:
        if self._any_host or host is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        known = self._verdicts.get(host)
        if known is None:
            name = _strip_port(host.strip().lower())
            known = _is_ip(name) or name in self._hosts
            known = known or any(fnmatch.fnmatchcase(name, pattern) for pattern in self._host_patterns)
            if len(self._verdicts) >= _VERDICTS:  # a client sending a new name each time fills it: start over
                self._verdicts.clear()
            self._verdicts[host] = known
        return known

    def _origin_allowed(self, scope: Scope, host: str | None, origin: str | None, site: str | None) -> bool:
        if origin is None:
            # No Origin: curl, the SDKs, or a same-origin navigation. A browser that says the request is cross-site
            # without naming the origin is refused all the same.
            return site not in ("cross-site", "same-site")
        origin = origin.rstrip("/").lower()
        if origin == "null":  # sandboxed frames, file:// pages
            return False
        own = f"{scope.get('scheme', 'http')}://{(host or '').lower()}"
        if origin == own or origin == self._public_origin:
            return True
        if self._any_origin or origin in self._origins:
            return True
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self._origin_patterns)


async def _refuse(send: Send, path: str, error: Forbidden) -> None:
    body = error_bytes(error, path)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.rsplit(":", 1)[0]
    return host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _regex(pattern: str) -> str:
    """An origin pattern such as ``https://*.example.com`` as a regular expression (``*``: one label or more)."""
    import re

    return "^" + re.escape(pattern).replace(r"\*", r"[a-z0-9.-]+") + "$"
