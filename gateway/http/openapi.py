"""The gateway's own OpenAPI document, served at ``/openapi.json``.

Hand-written rather than generated: the routes take OpenAI's bodies, which are far larger than what the
gateway itself checks. The document describes what the gateway validates (required fields and their
types) and lets everything else through (``additionalProperties``), as the gateway does; a fuzzer run
against it (tests/integration/test_fuzz.py) proves that no input makes the gateway itself fail.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..catalog import CHAT_KINDS, Catalog

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_OK = {"200": {"description": "OK"}}
_JSON_OBJECT = {"type": "object", "additionalProperties": True}


def _names(catalog: Catalog, kinds: frozenset[str]) -> list[str]:
    return [name for m in catalog.models if m.kind in kinds for name in (m.id, *m.entry.aliases)] or ["none"]


def _post(summary: str, schema: dict[str, Any], answer: str = "application/json") -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {
                "200": {"description": "The engine's answer", "content": {answer: {"schema": {}}}},
                "default": {
                    "description": "An OpenAI-shaped error",
                    "content": {"application/json": {"schema": _ERROR}},
                },
            },
        }
    }


def _get(summary: str, content: str = "application/json") -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": {content: {"schema": {}}}},
                "default": {
                    "description": "An OpenAI-shaped error",
                    "content": {"application/json": {"schema": _ERROR}},
                },
            },
        }
    }


def _body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": True}


def openapi_document(catalog: Catalog) -> dict[str, Any]:
    chat_models = {"type": "string", "enum": _names(catalog, CHAT_KINDS)}
    common = {
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
        "n": {"type": "integer", "minimum": 1, "maximum": 4},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "keep_alive": {"type": "number", "minimum": -1, "maximum": 3600},
    }
    message = _body(
        ["role", "content"],
        {"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
    )
    embedding_input = {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "minItems": 1, "maxItems": 16, "items": {"type": "string"}},
            {"type": "array", "minItems": 1, "maxItems": 16, "items": {"type": "integer", "minimum": 0}},
            {
                "type": "array",
                "minItems": 1,
                "maxItems": 8,
                "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            },
        ]
    }
    paths: dict[str, Any] = {
        "/v1/chat/completions": _post(
            "Chat completion (streams with stream: true)",
            _body(
                ["messages"],
                {"model": chat_models, "messages": {"type": "array", "minItems": 1, "items": message}, **common},
            ),
        ),
        "/v1/completions": _post(
            "Text completion", _body(["prompt"], {"model": chat_models, "prompt": {"type": "string"}, **common})
        ),
        "/v1/responses": _post("Responses API", _body(["input"], {"model": chat_models, "input": {"type": "string"}})),
        "/v1/embeddings": _post(
            "Embeddings (cached per item)",
            _body(
                ["input"],
                {
                    "model": {"type": "string", "enum": _names(catalog, frozenset({"embedding"}))},
                    "input": embedding_input,
                    "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                    "dimensions": {"type": "integer", "minimum": 1},
                },
            ),
        ),
        "/v1/images/generations": _post(
            "Image generation",
            _body(
                ["prompt"],
                {
                    "model": {"type": "string", "enum": _names(catalog, frozenset({"diffusion"}))},
                    "prompt": {"type": "string", "minLength": 1},
                    "size": {"type": "string", "enum": ["256x256", "512x512", "1024x1024", "auto"]},
                    "response_format": {"type": "string", "enum": ["url", "b64_json"]},
                    "n": {"type": "integer", "minimum": 1, "maximum": 2},
                },
            ),
        ),
        "/v1/audio/speech": _post(
            "Speech",
            _body(
                ["input"],
                {
                    "model": {"type": "string", "enum": _names(catalog, frozenset({"speech"}))},
                    "input": {"type": "string", "minLength": 1},
                    "voice": {"type": "string"},
                },
            ),
            answer="audio/wav",
        ),
        "/v1/models": _get("The configured models and aliases"),
        "/v1/models/{model}": {
            "get": {
                **_get("One model")["get"],
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            }
        },
        "/healthz": _get("Liveness"),
        "/readyz": _get("Readiness"),
        "/health": _get("Readiness, as routers poll it"),
        "/get_load": _get("Requests at this node, running and waiting, by model"),
        "/server_info": _get("What this node serves (sglang's shape)"),
        "/model_info": _get("This node's models (sglang's shape)"),
        "/status": _get("Engine and cache status"),
        "/metrics": _get("Prometheus metrics", "text/plain"),
        "/admin/engine/start": {"post": {"summary": "Start the engine now", "responses": _OK}},
        "/admin/engine/stop": {"post": {"summary": "Stop the engine now", "responses": _OK}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mistral-gateway", "version": "1", "description": "OpenAI-compatible gateway for mistral.rs"},
        "paths": paths,
        "components": {"schemas": {"Error": _ERROR, "Object": _JSON_OBJECT}},
    }


def openapi_route(catalog: Catalog) -> Route:
    """``GET /openapi.json``; the document is built once (the catalog does not change while the gateway runs)."""
    document = openapi_document(catalog)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    return Route("/openapi.json", openapi, methods=["GET"])
