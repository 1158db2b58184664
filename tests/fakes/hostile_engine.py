"""An engine that misbehaves on demand, at the level of HTTP bytes, for the gateway's hostile-engine tests.

    python tests/fakes/hostile_engine.py PORT

It answers ``GET /health`` and ``GET /v1/models`` like mistral.rs (so a gateway adopts it with
``GATEWAY_ENGINE_URL`` and its health checks pass), and every ``POST`` with the scenario named by the last user
message of a chat request (``{"messages": [..., {"role": "user", "content": "<scenario>"}], "stream": ...}``),
written byte for byte on the socket:

    ok            a correct answer (whole or streamed)
    extra-bytes   a correct answer followed by the bytes of another, unasked-for answer on the same connection
    cut-chunk     chunked encoding, one chunk cut in the middle, then the connection closed
    short-body    Content-Length longer than the body, then the connection closed
    reset-before  the request read, then a TCP reset, nothing sent
    reset-during  the head and part of the body, then a TCP reset
    no-headers    the request read, then nothing at all, the connection held open
    drip          the head, then one byte of the body every HOSTILE_DRIP seconds (default 0.5)
    slow-head     the head itself one byte every HOSTILE_DRIP seconds (each read short, the head never done)
    silent        the head (and a stream's first event), then nothing, the connection held open
    endless       the head, then events (a whole answer: body bytes) every HOSTILE_DRIP seconds, without end
    keepalive     a stream's head, then SSE comments every HOSTILE_DRIP seconds, without end
    invalid-http  bytes that are not HTTP
    continue      ``100 Continue``, then the correct answer
    204, 304      that status, no body
    html-500      a 500 with an HTML body
    http10        an HTTP/1.0 answer without Content-Length, ended by closing the connection
    conn-close    ``Connection: close``, then the connection closed after the answer
    big-line      a correct stream whose one content event is a single 1 MB line
    big-header    a header 4 MB long

It records nothing and needs nothing but the standard library: each scenario is a few lines of raw bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import time

MODEL = "hostile"
DRIP = float(os.environ.get("HOSTILE_DRIP", "0.5"))


def _chunk(content: str, finish: str | None = None) -> bytes:
    body = {
        "id": "1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "system_fingerprint": "x",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2} if finish else None,
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _whole(content: str = "fine") -> bytes:
    return json.dumps(
        {
            "id": "1",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()


def _stream(content: str = "fine") -> bytes:
    return _chunk(content) + _chunk("", "stop") + b"data: [DONE]\n\n"


def _answer(body: bytes, *, stream: bool, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    kind = b"text/event-stream" if stream else b"application/json"
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + kind
        + b"\r\ncontent-length: %d\r\n" % len(body)
        + extra
        + b"\r\n"
        + body
    )


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed process's kernel would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line = head.split(b"\r\n", 1)[0]
    length = 0
    for header in head.split(b"\r\n")[1:]:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return line, body


def _scenario(body: bytes) -> tuple[str, bool]:
    try:
        request = json.loads(body)
        content = request["messages"][-1]["content"]
        if isinstance(content, list):  # content parts, as a translated Anthropic message may carry
            content = "".join(part.get("text", "") for part in content)
        return str(content), request.get("stream") is True
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "ok", False


async def _serve_scenario(name: str, stream: bool, writer: asyncio.StreamWriter) -> bool:
    """Write the scenario's bytes; whether the connection may carry another request."""
    good = _stream() if stream else _whole()
    if name == "extra-bytes":
        writer.write(_answer(good, stream=stream) + _answer(_whole("stale"), stream=False))
    elif name == "cut-chunk":
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        writer.write(head + b"%x\r\n" % len(_chunk("fine")) + _chunk("fine") + b"\r\n" + b'64\r\ndata: {"id"')
        return False
    elif name == "short-body":
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n" + good[:50])
        return False
    elif name == "reset-before":
        _reset(writer)
        return False
    elif name == "reset-during":
        writer.write(_answer(good, stream=stream)[: -len(good) // 2])
        await writer.drain()
        _reset(writer)
        return False
    elif name == "no-headers":
        await asyncio.Event().wait()  # until the gateway gives up and closes
    elif name == "drip":
        answer = _answer(good, stream=stream)
        split = answer.index(b"\r\n\r\n") + 4
        writer.write(answer[:split])
        for byte in answer[split:]:
            await writer.drain()
            await asyncio.sleep(DRIP)
            writer.write(bytes([byte]))
    elif name == "slow-head":
        for byte in _answer(good, stream=stream):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(DRIP)
    elif name == "silent":
        answer = _answer(good, stream=stream)
        split = answer.index(b"\r\n\r\n") + 4
        writer.write(answer[:split] + (_chunk("fine") if stream else b""))
        await writer.drain()
        await asyncio.Event().wait()
    elif name in ("endless", "keepalive"):
        kind = b"text/event-stream" if stream else b"application/json"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = b": keep-alive\n\n" if name == "keepalive" else _chunk("more") if stream else b" "
        while True:
            writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(DRIP)
    elif name == "invalid-http":
        writer.write(b"HELLO THERE, THIS IS NOT HTTP\r\n\r\n")
        return False
    elif name == "continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + _answer(good, stream=stream))
    elif name in ("204", "304"):
        status = b"204 No Content" if name == "204" else b"304 Not Modified"
        writer.write(b"HTTP/1.1 " + status + b"\r\n\r\n")
    elif name == "html-500":
        page = _answer(
            b"<html><body>Internal Server Error</body></html>", stream=False, status=b"500 Internal Server Error"
        )
        writer.write(page.replace(b"application/json", b"text/html"))
    elif name == "http10":
        writer.write(
            b"HTTP/1.0 200 OK\r\ncontent-type: "
            + (b"text/event-stream" if stream else b"application/json")
            + b"\r\n\r\n"
            + good
        )
        return False
    elif name == "conn-close":
        writer.write(_answer(good, stream=stream, extra=b"connection: close\r\n"))
        return False
    elif name == "big-line":
        big = _chunk("x" * (1 << 20)) + _chunk("", "stop") + b"data: [DONE]\n\n"
        writer.write(_answer(big if stream else _whole("x" * (1 << 20)), stream=stream))
    elif name == "big-header":
        writer.write(b"HTTP/1.1 200 OK\r\nx-huge: " + b"a" * (4 << 20) + b"\r\ncontent-length: 2\r\n\r\n{}")
        return False
    else:
        writer.write(_answer(good, stream=stream))
    return True


async def _connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (request := await _read_request(reader)) is not None:
            line, body = request
            if line.startswith(b"GET /health"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nOK")
            elif line.startswith(b"GET /v1/models"):
                listing = {
                    "object": "list",
                    "data": [{"id": MODEL, "object": "model", "created": int(time.time()), "owned_by": "local"}],
                }
                writer.write(_answer(json.dumps(listing).encode(), stream=False))
            elif not await _serve_scenario(*_scenario(body), writer):
                await writer.drain()
                break
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_connection, "127.0.0.1", port)
    print(f"hostile engine on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
