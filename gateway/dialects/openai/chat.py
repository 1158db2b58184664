"""OpenAI's chat completions and completions as the client gets them: the answer as it is, or Server-Sent Events.

The chat core already made every answer and chunk OpenAI's (gateway/chat/); what is left is the wire: ``data:``
lines, the usage chunk a client asked for with ``stream_options.include_usage``, ``[DONE]``, and one final error
event when a stream fails after it began.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from ...chat import answers
from ...errors import GatewayError
from ...serving.chat import Stream


def error_event(error: GatewayError) -> bytes:
    """The final SSE event that carries an error once a stream has begun."""
    return b"data: " + error.body_bytes() + b"\n\n"


async def openai_sse(stream: Stream) -> AsyncIterator[bytes]:
    """OpenAI's Server-Sent Events for a stream: the chunks, the usage chunk if asked for, ``[DONE]``; a failure
    after the start is one final error event."""
    rename = stream.rename
    try:
        async for event in stream.events:
            if event.raw is not None:
                yield b"data: " + rename(event.raw) + b"\n\n"
            elif event.data is not None:
                yield b"data: " + orjson.dumps(event.data) + b"\n\n"
            elif event.comment:
                yield event.comment + b"\n\n"
        shape = stream.plan.shape
        total, head = stream.usage(), stream.head()
        if shape.include_usage and total is not None and head is not None:
            yield b"data: " + orjson.dumps(answers.usage_chunk(head, total, shape)) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except GatewayError as exc:
        yield error_event(exc)


class OpenAIChat:
    """The :class:`~gateway.serving.calls.ChatWriter` of chat completions and completions."""

    media_type = "text/event-stream"
    loading_comments = True

    def answer(self, chat_answer: dict[str, Any]) -> bytes:
        return orjson.dumps(chat_answer)

    def stream(self, stream: Stream) -> AsyncIterator[bytes]:
        return openai_sse(stream)

    def failed(self, error: GatewayError) -> bytes:
        return error_event(error)


OPENAI = OpenAIChat()
