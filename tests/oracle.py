"""An oracle we did not write: OpenAI's own response types, as the `openai` package generates them from OpenAI's
API specification, checked strictly (pydantic strict mode: no coercion, so a string where an integer belongs fails,
as do a missing required field and a `finish_reason` outside OpenAI's values).

Every JSON body and stream event the contract suite gets from the gateway goes through :func:`check_body` or
:func:`check_stream`.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import pydantic
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent


def _event_types() -> dict[str, type[pydantic.BaseModel]]:
    """Each Responses stream event type by its ``type`` value (validating against the one class, not the whole union,
    keeps a failure's message short)."""
    union = typing.get_args(ResponseStreamEvent)[0]
    out = {}
    for cls in typing.get_args(union):
        (value,) = typing.get_args(cls.model_fields["type"].annotation)
        out[value] = cls
    return out


EVENTS = _event_types()
BODIES: dict[str, type[pydantic.BaseModel]] = {
    "chat": ChatCompletion,
    "completion": Completion,
    "embedding": CreateEmbeddingResponse,
    "response": Response,
}
CHUNKS: dict[str, type[pydantic.BaseModel]] = {"chat": ChatCompletionChunk, "completion": Completion}


def check_body(kind: str, body: Any) -> Any:
    """``body`` (decoded JSON) as OpenAI's type for ``kind``; raises pydantic.ValidationError if it is not one."""
    return BODIES[kind].model_validate(body, strict=True)


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each event of a Server-Sent Events body; comments dropped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, "\n".join(data)))
    return events


def check_stream(kind: str, text: str) -> list[Any]:
    """Every event of a stream as OpenAI's type: chat and completion chunks end with ``[DONE]``; Responses events
    have their ``event:`` name equal to their type and no ``[DONE]``. Returns the validated events."""
    events = sse_events(text)
    validated: list[Any] = []
    if kind == "response":
        assert events, "an empty stream"
        for name, data in events:
            payload = json.loads(data)
            assert payload.get("type") in EVENTS, f"not a Responses stream event: {payload.get('type')!r}"
            event: Any = EVENTS[payload["type"]].model_validate(payload, strict=True)
            assert name == payload["type"], f"event name {name!r} but type {payload['type']!r}"
            validated.append(event)
        numbers = [e.sequence_number for e in validated]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers
        return validated
    assert events and events[-1][1] == "[DONE]", f"the stream does not end with [DONE]: {events[-3:]}"
    for _, data in events[:-1]:
        validated.append(CHUNKS[kind].model_validate(json.loads(data), strict=True))
    return validated
