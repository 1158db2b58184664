"""OpenAI requests made engine requests: what the engine gets for a checked chat or completions request.

The engine takes one choice of one prompt per request, no ``json_object`` and no ``stream_options``
(docs/engine-contract.md). A :class:`Plan` holds the engine requests that answer one client request (several
when it asks for ``n`` > 1 or sends several prompts: they are fanned out, and the engine batches them) and the
:class:`~gateway.chat.answers.Shape` of the answer the client expects. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import InvalidRequest
from .answers import Shape
from .checks import ROUTER_FIELDS

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# Fields OpenAI has that change nothing the engine does (they are about OpenAI's platform), or that the gateway
# handles itself: none of them reach the engine.
_GATEWAY_ONLY = (
    "n",
    "stream_options",
    "seed",
    "parallel_tool_calls",
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "modalities",
    "verbosity",
    *ROUTER_FIELDS,  # what a router in front of the gateway adds, at the value the engine follows anyway
)
# mistral.rs constrains JSON with llguidance, which by default lets the model put any whitespace between tokens: small
# models then fill max_tokens with tabs. Compact JSON means the same to every JSON reader.
COMPACT = {"whitespace_flexible": False}
JSON_OBJECT_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "json_object", "schema": {"type": "object", "x-guidance": COMPACT}},
}


@dataclass(frozen=True)
class Plan:
    """The engine requests for one client request, and how to put their answers together."""

    path: str
    bodies: tuple[dict[str, Any], ...]  # without "model": the serving layer sets the engine's id
    shape: Shape
    chat: bool
    stream: bool  # what the client gets
    prompts: int = 1  # bodies come in `prompts` groups of `n` (completions with several prompts)
    text_offsets: tuple[int, ...] = ()  # completions with echo: where each body's choice text starts
    # The engine is asked for whole answers even though the client streams: mistral.rs reports no usage in
    # completion streams, so a completions stream that must end with the usage is generated whole, then sent.
    whole: bool = False

    def shapes(self) -> list[Shape]:
        """The shape of each body's answer (they differ only in where an echoed prompt's text ends)."""
        if not self.text_offsets:
            return [self.shape] * len(self.bodies)
        return [replace(self.shape, text_offset=offset) for offset in self.text_offsets]


def _engine_body(body: dict[str, Any]) -> dict[str, Any]:
    out = {key: value for key, value in body.items() if key not in _GATEWAY_ONLY and key != "model"}
    fmt = out.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["response_format"] = JSON_OBJECT_SCHEMA
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt["json_schema"]
        schema = spec.get("schema") or {}
        if "x-guidance" not in schema:
            out["response_format"] = {**fmt, "json_schema": {**spec, "schema": {**schema, "x-guidance": COMPACT}}}
    return out


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's ``developer`` role is the ``system`` role of models that are not its own reasoning models."""
    if all(m.get("role") != "developer" for m in messages):
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def _images(messages: list[dict[str, Any]]) -> str | None:
    """The first image part's parameter path, if any message has one."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    return f"messages[{i}].content[{j}]"
    return None


def _forced_tools(body: dict[str, Any]) -> tuple[str, ...]:
    """The tools a forced call is one of: every tool for tool_choice "required", the named one for a name."""
    choice = body.get("tool_choice")
    tools = [t["function"]["name"] for t in body.get("tools") or [] if isinstance(t, dict) and "function" in t]
    if choice == "required":
        return tuple(tools)
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        return (name,) if isinstance(name, str) else ()
    return ()


def plan_chat(body: dict[str, Any], model: str, *, takes_images: bool) -> Plan:
    """``body`` has passed ``checks.chat``; ``model`` is the id the client used."""
    messages = body["messages"]
    image = _images(messages)
    if image is not None and not takes_images:
        raise InvalidRequest(
            f"The model '{model}' does not take images: it is not a vision model. Remove the image part, or use a "
            "model of kind vision-plain.",
            param=image,
            code="model_not_supported",
        )
    engine = _engine_body(body)
    engine["messages"] = _developer_as_system(messages)
    stream = body.get("stream") is True
    shape = Shape(
        model=model,
        logprobs=(body.get("top_logprobs") or 0) if body.get("logprobs") else None,
        include_usage=stream and (body.get("stream_options") or {}).get("include_usage") is True,
        single_tool_call=body.get("parallel_tool_calls") is False,
        forced_tools=_forced_tools(body),
    )
    n = body.get("n") or 1
    return Plan(CHAT_PATH, tuple(engine for _ in range(n)), shape, chat=True, stream=stream)


def plan_completion(body: dict[str, Any], model: str) -> Plan:
    """``body`` has passed ``checks.completion``."""
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = body.get("n") or 1
    engine = _engine_body(body)
    stream = body.get("stream") is True
    include_usage = stream and (body.get("stream_options") or {}).get("include_usage") is True
    if include_usage:
        engine["stream"] = False
    bodies = tuple({**engine, "prompt": text} for text in prompts for _ in range(n))
    shape = Shape(model=model, logprobs=body.get("logprobs"), include_usage=include_usage)
    # Legacy logprobs give each token's offset in the choice's text, which starts with the prompt when echoed.
    offsets = tuple(len(text) for text in prompts for _ in range(n)) if body.get("echo") is True else ()
    return Plan(
        COMPLETIONS_PATH,
        bodies,
        shape,
        chat=False,
        stream=stream,
        prompts=len(prompts),
        text_offsets=offsets,
        whole=include_usage,
    )
