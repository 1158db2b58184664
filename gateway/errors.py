"""The gateway's one error tree, and the OpenAI error body every failure is rendered as.

::

    GatewayError                      every error a client can see; carries status, type, code
      InvalidRequest                  400 - the request itself is wrong
        ContextLengthExceeded         400 - the prompt does not fit the model's context
        BodyTooLarge                  413
        UnsupportedMediaType          415
        UnsupportedForModel           400 - e.g. embeddings asked of a chat model
      ModelNotFound                   404 - code model_not_found
      Unauthorized                    401 - no key, or not one of GATEWAY_API_KEYS / GATEWAY_ADMIN_KEY
      Forbidden                       403 - a Host not allowed (DNS rebinding), a page of another origin
      RouteNotFound                   404 - code unknown_url
      MethodNotAllowed                405
      NotImplementedByGateway         501 - /v1/moderations, /v1/files; never retried by SDKs
      EngineError                     the engine answered with an error (status kept, body translated)
      EngineUnavailable               503 - no engine to talk to, with Retry-After
        EngineNotInstalled            503 - no engine program found
        EngineStartFailed             503 - it exited or timed out while starting; never retried by SDKs
          ModelDownloadFailed         503 - a model could not be downloaded before the start
        ModelTooLarge                 503 - the model takes more memory than the whole budget; never retried
        BudgetExhausted               503 - no room for the model: the engines holding the memory stayed busy
        WarmElsewhere                 503 - the model is stopped here, warm on a peer: a router retries there
      RequestCancelled                503 - an operator cancelled it (the console, /admin/requests); never retried
      QueueFull                       429 - too many requests already wait for the engine, with Retry-After
      EngineCrashed                   502 - it died or broke the connection mid-request
      EngineStalled                   504 - no byte from the engine for too long
      TooManyConnections              503 - GATEWAY_MAX_CONNECTIONS reached; sent by the server itself, with Retry-After
    ConfigError                       start-up configuration is broken (never reaches a client)

Each is written in the dialect of the route it happened on (OpenAI's, Anthropic's, Ollama's: gateway/dialects.py).
Foreign errors (httpx, OS) are translated into this tree at exactly one boundary each: the relay for
HTTP, the engine pool for processes.
"""

from __future__ import annotations

import json
from typing import Any


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The body OpenAI's API and SDKs use for every error."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def retry_after_header(seconds: float) -> str:
    """Whole seconds, rounded up, at least 1: a client told to retry after 0 would retry at once."""
    return str(max(1, int(seconds + 0.999)))


class GatewayError(Exception):
    """An error with everything needed to answer a client in OpenAI's shape."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"  # the usual case; checks that know better say invalid_type, invalid_json, ...


class ContextLengthExceeded(InvalidRequest):
    """The prompt (or the prompt and ``max_tokens``) does not fit the model's context: ``prompt_tokens`` and
    ``limit`` let each dialect say it in its own words (Claude Code reads Anthropic's)."""

    code = "context_length_exceeded"

    def __init__(self, message: str, *, prompt_tokens: int, limit: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class UnsupportedForModel(InvalidRequest):
    code = "model_not_supported"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("www-authenticate", "Bearer")


class Forbidden(GatewayError):
    """A request refused for where it comes from: a Host the gateway does not answer to, a page of another origin."""

    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class RouteNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class NotImplementedByGateway(GatewayError):
    """A route OpenAI has and the engine does not; the SDKs must not retry it."""

    status = 501
    type = "invalid_request_error"
    code = "not_implemented"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class EngineError(GatewayError):
    """The engine refused or failed a request; ``status`` is the engine's own status."""

    code = "engine_error"


class EngineUnavailable(GatewayError):
    """There is no engine to relay to right now; the client may retry after ``retry_after`` seconds."""

    status = 503
    code = "engine_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers["Retry-After"] = retry_after_header(retry_after)


class EngineNotInstalled(EngineUnavailable):
    code = "engine_not_installed"


class EngineStartFailed(EngineUnavailable):
    """The engine could not be started. An SDK retrying within seconds would only meet the same failure (and, before
    the backoff ends, the same answer): ``x-should-retry: false`` tells the OpenAI SDKs not to."""

    code = "engine_start_failed"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class ModelDownloadFailed(EngineStartFailed):
    code = "model_download_failed"


class ModelTooLarge(EngineUnavailable):
    """The model alone takes more than GATEWAY_MEMORY_BUDGET_MB: no eviction can make room, so no retry will."""

    code = "model_too_large"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class BudgetExhausted(EngineUnavailable):
    code = "memory_budget_exhausted"


class WarmElsewhere(EngineUnavailable):
    """The model's engine is stopped on this node and warm on another one (gateway/fleet/peers.py): a router retries
    the request on another node; sent here again, it is served here. ``x-gateway-warm-on`` names the peer."""

    code = "model_warm_elsewhere"

    def __init__(self, message: str, *, node: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["x-gateway-warm-on"] = node


class RequestCancelled(GatewayError):
    """An operator cancelled the request (``POST /admin/requests/{id}/cancel``): the SDKs must not send it again."""

    status = 503
    code = "request_cancelled"

    def __init__(self, message: str = "The request was cancelled by the gateway's operator.", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class QueueFull(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["Retry-After"] = retry_after_header(retry_after)


class EngineCrashed(GatewayError):
    status = 502
    code = "engine_crashed"


class EngineStalled(GatewayError):
    status = 504
    code = "engine_stalled"


class TooManyConnections(GatewayError):
    """The gateway holds as many open connections as it may; answered by the HTTP server (gateway/server.py)."""

    status = 503
    code = "too_many_connections"

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers["Retry-After"] = retry_after_header(retry_after)


class ConfigError(Exception):
    """The gateway's configuration is broken; the message says which file, which entry and the fix."""
