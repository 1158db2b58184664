"""Fuzzing that reaches the bytes: request bodies mutated at the level of JSON text, for every model route of the
three dialects, against a gateway with the fake engine behind it.

The schemathesis run (test_fuzz.py) draws valid JSON from the gateway's OpenAPI document, so it never wrote a lone
UTF-16 surrogate, invalid UTF-8, a number beyond any float, a key given twice or a nesting hundreds deep. Here each
route's valid body is mutated in its text: every string value and key in turn gets escapes (lone and reversed
surrogates, NUL, control characters), raw invalid UTF-8, or an empty value; numbers become huge, negative,
non-finite or of another type; lists become empty; the whole body is nested deep or made wide, given duplicate keys,
a byte-order mark or trailing garbage. The run is bounded (a fixed, seeded set of cases per route, FUZZ_BYTES to
raise it) and asserts what a client must always get: no 5xx the gateway caused itself (an engine's own failure,
code ``engine_*``, is allowed), and an error in the shape of the route's dialect.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from tests.helpers import Gateway

Start = Callable[..., Gateway]
CASES = int(os.environ.get("FUZZ_BYTES", "40"))  # per route

CHAT = [{"role": "user", "content": "hello there"}]
ROUTES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "tiny-chat", "messages": CHAT, "max_tokens": 5, "temperature": 0.5},
    "/v1/completions": {"model": "tiny-chat", "prompt": "hello", "max_tokens": 5, "stop": ["x"]},
    "/v1/responses": {"model": "tiny-chat", "input": "hello", "max_output_tokens": 5},
    "/v1/embeddings": {"model": "tiny-embed", "input": ["one", "two"], "encoding_format": "float"},
    "/v1/images/generations": {"model": "tiny-flux", "prompt": "a cat", "size": "64x64", "n": 1},
    "/v1/audio/speech": {"model": "tiny-speech", "input": "hello", "voice": "alloy"},
    "/v1/messages": {"model": "tiny-chat", "max_tokens": 5, "messages": CHAT, "system": "be brief"},
    "/v1/messages/count_tokens": {"model": "tiny-chat", "messages": CHAT},
    "/api/chat": {"model": "tiny-chat", "messages": CHAT, "stream": False, "options": {"temperature": 0.1}},
    "/api/generate": {"model": "tiny-chat", "prompt": "hello", "stream": False, "options": {"num_predict": 5}},
    "/api/embed": {"model": "tiny-embed", "input": ["one", "two"]},
    "/api/embeddings": {"model": "tiny-embed", "prompt": "one"},
    "/api/show": {"model": "tiny-chat"},
}

ESCAPES = ["\\ud800", "\\udfff", "\\udc00\\ud800", "\\ud83d", "\\u0000", "\\u001b[2J", "\\n\\r\\t", "\\uffff", "\\\\"]
RAW_BYTES = [b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xc0\xaf"]
NUMBERS = [
    "1e400",
    "-1e400",
    "99999999999999999999999999",
    "-0",
    "1.7976931348623157e309",
    "NaN",
    "Infinity",
    "0.0000000000000000000000001",
    "-9223372036854775809",
    "18446744073709551616",
    '"5"',
    "[]",
    "{}",
    "true",
]


def _strings(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, child in value.items():
            yield (*path, key), ""  # the key itself (marked by the empty value)
            yield from _strings(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _strings(child, (*path, i))


def _numbers(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _numbers(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _numbers(child, (*path, i))


def _lists(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, list):
        yield path
        for i, child in enumerate(value):
            yield from _lists(child, (*path, i))
    elif isinstance(value, dict):
        for key, child in value.items():
            yield from _lists(child, (*path, key))


MARK = "\x00MUTATE\x00"


def _with_mark(body: Any, path: tuple[Any, ...], *, key: bool = False) -> str:
    """The body as JSON text with the value (or, ``key``, the key) at ``path`` replaced by a marker to substitute."""
    copy = json.loads(json.dumps(body))
    node = copy
    for step in path[:-1]:
        node = node[step]
    last = path[-1]
    if key:
        node[MARK] = node.pop(last)
    else:
        node[last] = MARK
    return json.dumps(copy)


def mutations(body: dict[str, Any], rng: random.Random) -> Iterator[bytes]:
    text = json.dumps(body)
    strings = [p for p, _ in _strings(body) if p]
    numbers = list(_numbers(body))
    lists = list(_lists(body))
    kinds = ["escape", "raw", "empty", "number", "list", "nest", "wide", "duplicate", "bom", "trailing", "type"]
    while True:
        kind = rng.choice(kinds)
        if kind in ("escape", "raw", "empty") and strings:
            path = rng.choice(strings)
            is_key = _is_key(body, path) and rng.random() < 0.3
            marked = json.dumps(MARK)
            template = _with_mark(body, path, key=is_key)
            if kind == "escape":
                payload = '"a' + rng.choice(ESCAPES) + 'b"'
                yield template.replace(marked, payload).encode()
            elif kind == "raw":
                before, _, after = template.partition(marked)
                yield before.encode() + b'"a' + rng.choice(RAW_BYTES) + b'b"' + after.encode()
            else:
                yield template.replace(marked, '""').encode()
        elif kind == "number" and numbers:
            template = _with_mark(body, rng.choice(numbers))
            yield template.replace(json.dumps(MARK), rng.choice(NUMBERS)).encode()
        elif kind == "list" and lists:
            yield _with_mark(body, rng.choice(lists)).replace(json.dumps(MARK), "[]").encode()
        elif kind == "nest":
            depth = rng.choice([70, 500, 5000])
            inner = '{"a":' * depth + "1" + "}" * depth
            yield text[:-1].encode() + b', "extra": ' + inner.encode() + b"}"
        elif kind == "wide":
            wide = ",".join(f'"k{i}": {i}' for i in range(rng.choice([1000, 20000])))
            yield text[:-1].encode() + b", " + wide.encode() + b"}"
        elif kind == "duplicate":
            key = rng.choice(list(body))
            yield b"{" + json.dumps(key).encode() + b': {"x": [1]}, ' + text[1:].encode()
        elif kind == "bom":
            yield b"\xef\xbb\xbf" + text.encode()
        elif kind == "trailing":
            yield text.encode() + rng.choice([b" x", b"}", b"\x00", b", {}"])
        elif kind == "type" and strings:
            template = _with_mark(body, rng.choice(strings))
            yield template.replace(json.dumps(MARK), rng.choice(["1", "null", "[]", "{}", "true"])).encode()


def _is_key(body: Any, path: tuple[Any, ...]) -> bool:
    node = body
    for step in path[:-1]:
        node = node[step]
    return isinstance(node, dict) and path[-1] in node and not isinstance(node[path[-1]], str)


def _check_shape(path: str, response: httpx.Response) -> None:
    assert response.status_code < 500 or _engines_own(path, response), (path, response.status_code, response.text)
    if response.status_code < 400:
        return
    body = response.json()
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str), body
    elif path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body


def _engines_own(path: str, response: httpx.Response) -> bool:
    """A 5xx relayed from the engine (its own failure, code engine_*) is not the gateway's."""
    body = response.json()
    if path.startswith("/api/"):
        return "engine" in body.get("error", "").lower()
    error = body.get("error") or {}
    return str(error.get("code") or error.get("type") or "").startswith(("engine_", "api_error"))


def test_no_body_mutated_byte_by_byte_makes_the_gateway_fail(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_LOG_LEVEL": "warning", "GATEWAY_MAX_BODY_MB": "1", "GATEWAY_STALL_TIMEOUT": "3"})
    rng = random.Random(20)
    cases = [(path, raw) for path, body in ROUTES.items() for raw in itertools.islice(mutations(body, rng), CASES)]

    async def run() -> list[str]:
        findings: list[str] = []
        # Several at a time: each request waits on the network's acknowledgement timers far more than on either end.
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            for path, body in ROUTES.items():
                seed = await client.post(path, json=body)
                assert seed.status_code == 200, (path, seed.text)  # the body mutated is a valid one

            async def one(path: str, raw: bytes) -> None:
                async with limit:
                    try:
                        response = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
                    except httpx.HTTPError as exc:
                        findings.append(f"{path} {raw[:200]!r}: no answer ({exc!r})")
                        return
                try:
                    _check_shape(path, response)
                except AssertionError as exc:
                    findings.append(f"{path} {raw[:200]!r}: {exc}")

            await asyncio.gather(*(one(path, raw) for path, raw in cases))
        return findings

    findings = asyncio.run(run())
    assert findings == [], "\n".join(findings[:20])


def test_option_names_a_client_sends_cannot_add_or_break_a_header(gateways: Start) -> None:
    """What the byte fuzzing found in Ollama's answers: unknown option names are listed in X-Ignored-Options."""
    gw = gateways()
    for name in ("a\r\nX-Injected: 1", "\uffff", "ok_name"):
        body = {"model": "tiny-chat", "prompt": "hi", "stream": False, "options": {name: 1}}
        answer = httpx.post(gw.url + "/api/generate", json=body, timeout=30)
        assert answer.status_code == 200 and "x-injected" not in answer.headers
        assert answer.headers["x-ignored-options"].isascii() and "\n" not in answer.headers["x-ignored-options"]
