"""Taking a model request in, for every dialect: its body (bounded, parsed as JSON), its model (by name or the
default, aliases included, checked against what the route serves) and its keep-alive."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

from ..catalog import Catalog, Model
from ..errors import BodyTooLarge, InvalidRequest, ModelNotFound, UnsupportedForModel, UnsupportedMediaType

_SCOPED = "node_model"  # the scope state key: the name the /m/<name>/ prefix gave, when there was one


def scope_to(scope: Scope, name: str) -> None:
    """Note that a request was sent for the model ``name`` by its path (the node protocol's ``/m/<model>/`` prefix:
    gateway/http/node.py)."""
    scope.setdefault("state", {})[_SCOPED] = name


def scoped_name(scope: Scope) -> str | None:
    """The model a request was sent for by its ``/m/<model>/`` prefix, as the prefix named it (id or alias)."""
    state = scope.get("state")
    return state.get(_SCOPED) if state else None


class Intake:
    def __init__(self, catalog: Catalog, *, max_body_mb: float) -> None:
        self._catalog = catalog
        self._max_body_mb = max_body_mb
        self._max_body = int(max_body_mb * 1024 * 1024)

    async def read(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be larger than GATEWAY_MAX_BODY_MB."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    async def json(self, request: Request) -> dict[str, Any]:
        return self.parse(await self.read(request), request)

    @staticmethod
    def parse(raw: bytes, request: Request) -> dict[str, Any]:
        return parse_json_body(raw, request.headers.get("content-type"))

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"The request body is larger than {self._max_body_mb:g} MiB (GATEWAY_MAX_BODY_MB).")

    def model(
        self, request: Request, name: Any, kinds: Iterable[str], *, find: Callable[[str], Model | None] | None = None
    ) -> Model:
        """The model a request names (``find``: a dialect's own way to look names up), or the default for
        ``kinds`` when it names none; noted in the request's state for its log line and metrics."""
        model = self._find(name, frozenset(kinds), request, find)
        request.state.model = model.id
        return model

    def _find(
        self, name: Any, kinds: frozenset[str], request: Request, find: Callable[[str], Model | None] | None
    ) -> Model:
        if name is None or name == "":
            name = self._catalog.default_for(kinds)
            if name is None:
                raise ModelNotFound(
                    f"No model was named and no model of kind {' or '.join(sorted(kinds))} is configured.",
                    param="model",
                )
        if not isinstance(name, str):
            raise InvalidRequest("Invalid type for 'model': expected a string.", param="model", code="invalid_type")
        model = (find or self._catalog.find)(name)
        if model is None:
            raise ModelNotFound(
                f"The model '{name}' does not exist. Available models: "
                f"{', '.join(m.id for m in self._catalog.models)}.",
                param="model",
            )
        if model.kind not in kinds:
            raise UnsupportedForModel(
                # request.url only here: building it parses the whole URL, about 10 us of CPU (tests/bench/app_cpu.py)
                f"The model '{model.id}' is a {model.kind} model and cannot serve {request.url.path}.",
                param="model",
            )
        return model


def keep_alive(body: dict[str, Any], request: Request) -> float | None:
    """Ollama's keep_alive, from the body (taken out of it: the engine does not know it) or ``X-Keep-Alive``."""
    if "keep_alive" in body:
        value = body.pop("keep_alive")
        if value is not None:
            return parse_keep_alive(value, "keep_alive")
    header = request.headers.get("x-keep-alive")
    return parse_keep_alive(header, "X-Keep-Alive") if header is not None else None


# Go's duration syntax, as Ollama takes it: "-1", "300", "30s", "5m", "1h30m", "1.5h", "500ms".
_DURATION = re.compile(r"^\s*(-?)((?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+|\d+(?:\.\d+)?)\s*$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

MAX_DEPTH = 64  # nesting of JSON objects and arrays; OpenAI's bodies need a handful (a tool schema a few more)
_INT_RANGE = (-(1 << 63), 1 << 64)  # what the engine's integer fields (i64, u64) can hold


class _Refused(ValueError):
    """A JSON value the gateway does not accept even though Python's parser would."""


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    value = int(text)  # Python refuses more than 4300 digits with ValueError
    if not _INT_RANGE[0] <= value < _INT_RANGE[1]:
        raise _Refused(f"the number {text[:30]}{'...' if len(text) > 30 else ''} is out of range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:30]} is out of range")
    return value


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests deeper than MAX_DEPTH (without recursion, so no depth can overflow the stack)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """A request body as a JSON object; anything else, or anything an engine could not take, is a 400.

    ``NaN``, ``Infinity`` and numbers beyond 64 bits are refused here rather than forwarded (the engine's parser
    refuses them, or worse, takes them), and so is nesting deeper than MAX_DEPTH (Python's parser would recurse
    until it fails, and every later encoder has a lower limit).
    """
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        # curl -d sends form-urlencoded and some clients text/plain; the body decides. Multipart never is JSON.
        if media.startswith("multipart/"):
            raise UnsupportedMediaType(
                f"Content-Type {media!r} is not supported here: send a JSON body with Content-Type: application/json."
            )
    if not raw.strip():
        raise InvalidRequest("The request body is empty: send a JSON object.", code="invalid_json")
    try:
        # UTF-8 as JSON must be (a byte-order mark tolerated), decoded strictly: json.loads would take bytes that
        # encode a UTF-16 surrogate ("surrogatepass"), which no engine and no encoder downstream can take.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 4]!r}). Send the "
            "JSON as UTF-8 text.",
            code="invalid_json",
        ) from exc
    try:
        body = json.loads(text, parse_constant=_constant, parse_int=_integer, parse_float=_float)
    except _Refused as exc:
        raise InvalidRequest(f"The JSON body has a value no engine can take: {exc}.", code="invalid_value") from exc
    except RecursionError as exc:
        raise InvalidRequest(f"The JSON body nests deeper than {MAX_DEPTH} levels.", code="invalid_json") from exc
    except ValueError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a valid JSON object with "
            "Content-Type: application/json.",
            code="invalid_json",
        ) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if b"\\u" in raw and (bad := _lone_surrogate(body)) is not None:
        # JSON lets a string hold half of a UTF-16 pair (\ud800); no engine, and no UTF-8 encoder, can take one.
        raise InvalidRequest(
            f"The JSON body has a string that is not valid Unicode at {bad or 'the top level'}: a lone UTF-16 "
            "surrogate (an escape such as \\ud800 without its pair). Send valid UTF-8 text.",
            param=bad or None,
            code="invalid_value",
        )
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(body):
        raise InvalidRequest(f"The JSON body nests deeper than {MAX_DEPTH} levels.", code="invalid_json")
    return body


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path (``messages[1].content``) of the first string holding a lone surrogate, key or value; None if none."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if not _valid_unicode(item):
                return at
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _valid_unicode(key):
                    return at
                stack.append((child, f"{at}.{key}" if at else key))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]") for i, child in enumerate(item))
    return None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_keep_alive(value: Any, param: str) -> float:
    """Seconds from a number or an Ollama-style (Go) duration ("30s", "5m", "1h30m"); negative (Ollama's -1): until
    further notice, returned as -1."""
    if isinstance(value, bool):
        raise InvalidRequest(f"Invalid {param}: use seconds or a duration like '5m'.", param=param)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        sign, body = -1.0 if match.group(1) else 1.0, match.group(2)
        parts = _PART.findall(body)
        seconds = sign * (sum(float(n) * _UNITS[unit] for n, unit in parts) if parts else float(body))
    else:
        raise InvalidRequest(f"Invalid {param} {value!r}: use seconds or a duration like '5m'.", param=param)
    if not math.isfinite(seconds):
        raise InvalidRequest(f"Invalid {param} {value!r}: use seconds, a duration like '5m', or -1.", param=param)
    return -1.0 if seconds < 0 else seconds
