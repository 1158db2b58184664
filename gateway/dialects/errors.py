"""The API dialects the gateway speaks, and errors written in each: a client gets an error in the shape its SDK
parses, whatever went wrong and wherever (a bad body, a missing key, an unknown route, an engine failure).

- OpenAI (``/v1/...``, and everything that is not one of the others): ``{"error": {"message", "type", "param",
  "code"}}``;
- Anthropic (``/v1/messages...``): ``{"type": "error", "error": {"type", "message"}}``;
- Ollama (``/api/...``): ``{"error": "<message>"}``.

The status code and headers (``Retry-After``, ``x-should-retry``) are the same in every dialect.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from starlette.responses import JSONResponse

from ..errors import GatewayError
from .anthropic import protocol as anthropic
from .ollama import protocol as ollama


class Dialect(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    OLLAMA = "ollama"


def dialect_of(path: str) -> Dialect:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return Dialect.ANTHROPIC
    if path.startswith("/api/"):
        return Dialect.OLLAMA
    return Dialect.OPENAI


def error_body(error: GatewayError, dialect: Dialect) -> dict[str, Any]:
    if dialect is Dialect.ANTHROPIC:
        return anthropic.error_body(error)
    if dialect is Dialect.OLLAMA:
        return ollama.error_body(error)
    return error.body()


def error_bytes(error: GatewayError, path: str) -> bytes:
    return json.dumps(error_body(error, dialect_of(path))).encode()


def error_response(error: GatewayError, path: str) -> JSONResponse:
    return JSONResponse(error_body(error, dialect_of(path)), status_code=error.status, headers=error.headers)
