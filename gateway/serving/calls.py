"""What a route asks of a model, as a value: the model, how long its engine stays up afterwards, and the engine work.

A route only translates: it reads its dialect's request and returns a :class:`ModelCall`. Serving
(:mod:`gateway.serving.service`) takes the engine lease, waits for the engine, runs the work, writes the answer and
releases the lease, in one place. The work is one of:

- :class:`ChatWork`: a chat or completions plan, answered whole or streamed, written by the dialect's
  :class:`ChatWriter` (every dialect's chat routes);
- :class:`EmbeddingWork`: embedding items, through the cache (the engine starts only for items it does not hold);
- :class:`RelayWork`: a body the engine answers as it is (images, speech), the answer made the client's;
- :class:`LoadWork`: nothing but the engine made ready (Ollama's preload).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import Response

from ..catalog import Model
from ..chat.plans import Plan
from .limits import Policy

if TYPE_CHECKING:
    from ..errors import GatewayError
    from ..upstream.relay import Reply
    from .chat import Stream


class ChatWriter(Protocol):
    """How one dialect answers a chat request: the OpenAI answer or stream of chunks in, the client's bytes out."""

    media_type: str  # of its streams
    loading_comments: bool  # whether its streams can carry `: loading` comments while the engine starts

    def answer(self, chat_answer: dict[str, Any]) -> bytes: ...

    def stream(self, stream: Stream) -> AsyncIterator[bytes]: ...

    def failed(self, error: GatewayError) -> bytes:
        """The last event of a stream that fails after it began."""
        ...


@dataclass(frozen=True)
class ChatWork:
    plan: Plan
    writer: ChatWriter
    answer_media_type: str = "application/json"  # of a whole answer
    # When max_tokens does not fit the room the prompt leaves (gateway/serving/limits.py): refuse (OpenAI), clamp
    # (Anthropic, Ollama), or leave it to the engine (a token count).
    limit: Policy = "refuse"


@dataclass(frozen=True)
class EmbeddingWork:
    body: dict[str, Any]  # an OpenAI embeddings request
    cache_control: str | None
    # The OpenAI answer's JSON and the cache outcome (hit, miss, partial) made the client's answer.
    write: Callable[[bytes, str], Response]


@dataclass(frozen=True)
class RelayWork:
    path: str
    body: dict[str, Any]
    raw: bytes  # the body as the client sent it: sent as it is when nothing in it must change
    edited: bool  # something in ``body`` was changed: it must be encoded again
    # The engine's answer (its model ids already the client's) made the client's; None: passed on as it is.
    write: Callable[[Reply], Response] | None = None


@dataclass(frozen=True)
class LoadWork:
    answer: Callable[[], Response]  # what the client gets once the engine is ready


Work = ChatWork | EmbeddingWork | RelayWork | LoadWork


@dataclass(frozen=True)
class ModelCall:
    model: Model
    keep_alive: float | None  # seconds the engine stays up after this request; None: its idle timeout
    work: Work
    headers: Mapping[str, str] = field(default_factory=dict)  # added to the answer

    @property
    def streams(self) -> bool:
        return isinstance(self.work, ChatWork) and self.work.plan.stream
