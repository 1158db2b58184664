"""API keys: ``/v1/*`` and Ollama's ``/api/*`` need a key when keys are configured; the admin key guards
``/status``, ``/events``, ``/admin/*`` and ``/logs/*`` (with API keys but no admin key, an API key does), and
opens the API routes too. A key is sent as
``Authorization: Bearer <key>`` (OpenAI's SDKs, Ollama's clients with a header) or ``x-api-key: <key>``
(Anthropic's SDKs, Claude Code). Health probes, ``/metrics``, generated images (unguessable names, fetched by
browsers that cannot send a header) and the console's page (``/ui``: it holds no data) stay open.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from ..dialects.errors import error_bytes
from ..errors import ConfigError, Unauthorized

ADMIN_PREFIXES = ("/status", "/events", "/admin/", "/logs/")


def load_keys(value: str | None) -> frozenset[str]:
    """Keys from ``GATEWAY_API_KEYS``: comma-separated, or the path of a file with one key per line."""
    if not value or not value.strip():
        return frozenset()
    text = value.strip()
    candidate = Path(text).expanduser()
    if "," not in text and (text.startswith(("/", "~", ".")) or candidate.is_file()):
        try:
            text = candidate.read_text(encoding="utf-8").replace("\n", ",")
        except OSError as exc:
            raise ConfigError(
                f"GATEWAY_API_KEYS: cannot read the key file {str(candidate)!r}: {exc.strerror}."
            ) from exc
    keys = frozenset(k.strip() for k in text.split(",") if k.strip() and not k.strip().startswith("#"))
    if not keys:
        raise ConfigError("GATEWAY_API_KEYS is set but holds no key.")
    return keys


def exposure_warning(host: str, port: int, *, api_keys: frozenset[str], admin_key: str | None) -> str | None:
    """What to tell the operator at start when the gateway listens beyond this machine with nothing guarding it.

    On loopback, the browser guard (gateway/http/browsers.py) keeps web pages out and nothing else can connect; on
    an address others can reach, anyone can run prompts and, without an admin key either, stop engines and read
    their logs.
    """
    if api_keys or _loopback(host):
        return None
    admin = (
        "" if admin_key else " and the operator's routes (stopping engines, cancelling requests, reading engine logs)"
    )
    return (
        f"listening on {host}:{port} with no API key: anyone who can reach this port can run prompts{admin}. "
        "Set GATEWAY_API_KEYS (see SECURITY.md), or listen on 127.0.0.1 behind a proxy that checks keys."
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _matches(presented: str, keys: frozenset[str]) -> bool:
    # Constant-time for each key, and every key is compared: timing says nothing about which one matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


class KeyGuard:
    """Pure ASGI middleware; costs one header lookup per request, nothing when no key is configured."""

    def __init__(self, app: ASGIApp, *, api_keys: frozenset[str], admin_key: str | None) -> None:
        self.app = app
        # Without an admin key, the admin routes take an API key: keys on the API but none on the routes that stop
        # engines, cancel requests and read their logs would leave those open to anyone who can reach the port.
        self._admin_keys = frozenset({admin_key}) if admin_key else api_keys
        # The admin key opens the API routes too (the console's playground uses it), when they are guarded at all.
        self._api_keys = api_keys | self._admin_keys if api_keys else api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(ADMIN_PREFIXES):
                needed, what = self._admin_keys, "the admin key (GATEWAY_ADMIN_KEY)"
            elif path.startswith(("/v1/", "/api/")):
                needed, what = self._api_keys, "an API key"
            else:
                needed, what = frozenset(), ""
            if needed and not _matches(_presented(scope), needed):
                await _unauthorized(send, what, path)
                return
        await self.app(scope, receive, send)


def _presented(scope: Scope) -> str:
    """The key a request presents: ``Authorization: Bearer``, else ``x-api-key``."""
    api_key = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            text: str = value.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
        elif name == b"x-api-key":
            api_key = value.decode("latin-1").strip()
    return api_key


async def _unauthorized(send: Send, what: str, path: str) -> None:
    error = Unauthorized(f"This request needs {what}: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
    body = error_bytes(error, path)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
