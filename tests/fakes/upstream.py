"""A small fake of the gateway's :class:`~gateway.upstream.client.Upstream` interface, for unit tests of the modules
that use it (the relay, the launcher's health probe). Each request is answered by a handler the test writes; the real
client is tested against real sockets in tests/unit/test_upstream.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.upstream.client import Deadline, UpstreamError


@dataclass
class Answer:
    """What the fake engine sends: a status, then the body in pieces (or an error raised while reading)."""

    status: int = 200
    pieces: list[bytes] = field(default_factory=list)
    content_type: str = "application/json"
    fails_with: UpstreamError | None = None  # raised after the pieces

    @classmethod
    def of(cls, body: bytes, status: int = 200, content_type: str = "application/json") -> Answer:
        return cls(status, [body], content_type)


@dataclass
class Call:
    method: str
    url: str
    body: bytes
    deadline: Deadline | None
    headers: dict[str, str]


Handler = Callable[[Call], Answer]


class _Response:
    def __init__(self, answer: Answer) -> None:
        self.status = answer.status
        self.content_type = answer.content_type
        self._answer = answer
        self.closed = False

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self._answer.pieces:
            yield piece
        if self._answer.fails_with is not None:
            raise self._answer.fails_with

    async def close(self) -> None:
        self.closed = True


class FakeUpstream:
    """Answers every request with ``handler(call)``; a handler may raise an UpstreamError instead."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.calls: list[Call] = []
        self.responses: list[_Response] = []

    async def get(self, url: str, *, timeout: float) -> tuple[int, bytes]:
        response = self._answer(Call("GET", url, b"", Deadline(total=timeout), {}))
        return response.status, await response.read()

    async def post(
        self, url: str, body: bytes, *, deadline: Deadline, headers: dict[str, str] | None = None
    ) -> _Response:
        return self._answer(Call("POST", url, body, deadline, dict(headers or {})))

    def _answer(self, call: Call) -> _Response:
        self.calls.append(call)
        response = _Response(self._handler(call))
        self.responses.append(response)
        return response

    async def aclose(self) -> None:
        return None
