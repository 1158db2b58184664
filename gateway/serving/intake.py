"""Taking a model request in, for every dialect: its body (bounded, parsed as JSON), its model (by name or the
default, aliases included, checked against what the route serves) and its keep-alive."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from starlette.requests import Request

from ..catalog import Catalog, Model
from ..chat import fields as validation
from ..errors import BodyTooLarge, InvalidRequest, ModelNotFound, UnsupportedForModel


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
        return validation.parse_json_body(await self.read(request), request.headers.get("content-type"))

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"The request body is larger than {self._max_body_mb:g} MiB (GATEWAY_MAX_BODY_MB).")

    def model(
        self, name: Any, kinds: Iterable[str], route: str, *, find: Callable[[str], Model | None] | None = None
    ) -> Model:
        """The model a request names (``find``: a dialect's own way to look names up), or the default for
        ``kinds`` when it names none."""
        kinds = frozenset(kinds)
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
                f"The model '{model.id}' is a {model.kind} model and cannot serve {route}.", param="model"
            )
        return model


def keep_alive(body: dict[str, Any], request: Request) -> float | None:
    """Ollama's keep_alive, from the body (taken out of it: the engine does not know it) or ``X-Keep-Alive``."""
    if "keep_alive" in body:
        value = body.pop("keep_alive")
        if value is not None:
            return validation.parse_keep_alive(value, "keep_alive")
    header = request.headers.get("x-keep-alive")
    return validation.parse_keep_alive(header, "X-Keep-Alive") if header is not None else None
