"""The first run on a machine that cannot download: a clear error at once, and the same answer at once after it.

A `url` model whose host name does not resolve stands for a machine without network (or one that needs a proxy or
a mirror): `.invalid` never resolves (RFC 2606). A Hugging Face mirror is a local file server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.fileserver import FileServer
from tests.helpers import Gateway, wait_for

Start = Callable[..., Gateway]
UNREACHABLE = """
[[models]]
id = "qwen"
kind = "gguf"
url = "https://hub.example.invalid/org/repo/resolve/main/model.gguf"
file = "org/model.gguf"
"""
CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}


def _chat_requests(gw: Gateway) -> int:
    return gw.log().count("POST /v1/chat/completions model=")


def test_a_failed_download_answers_at_once_says_what_to_do_and_stops_sdk_retries(gateways: Start) -> None:
    gw = gateways(UNREACHABLE)
    first = httpx.post(gw.v1 + "/chat/completions", json=CHAT, timeout=60)
    assert first.status_code == 503
    error = first.json()["error"]
    assert error["code"] == "model_download_failed" and "hub.example.invalid" in error["message"]
    for advice in (
        "`mistral-gateway pull`",
        "`.venv/bin/mistral-gateway pull`",
        "HF_ENDPOINT",
        "HTTPS_PROXY",
        "`path`",
    ):
        assert advice in error["message"], advice
    assert first.headers["x-should-retry"] == "false" and int(first.headers["retry-after"]) >= 1
    assert "after 1 attempt:" in error["message"]  # a name that does not resolve is not retried for seconds
    # The next request is answered from the remembered failure: no new download, and when the next try comes.
    again = httpx.post(gw.v1 + "/chat/completions", json=CHAT, timeout=60)
    assert again.status_code == 503 and again.json()["error"]["code"] == "model_download_failed"
    assert "Next try in" in again.json()["error"]["message"]
    assert gw.log().count('"type":"download.failed"') == 1
    # The OpenAI SDK, with its default two retries, makes one request and raises.
    # (The access log's line is written once the answer is sent: wait for the two requests' lines before counting.)
    wait_for(lambda: _chat_requests(gw) == 2, 10, "the access log's lines of the first two requests")
    with pytest.raises(openai.APIStatusError) as info:
        openai.OpenAI(base_url=gw.v1, api_key="unused").chat.completions.create(model="qwen", **CHAT)
    wait_for(lambda: _chat_requests(gw) >= 3, 10, "the SDK request's line")
    assert info.value.status_code == 503 and _chat_requests(gw) == 3
    # A stream gets the same error with its status, not a 200 stream that fails later.
    streamed = httpx.post(gw.v1 + "/chat/completions", json={**CHAT, "stream": True}, timeout=60)
    assert streamed.status_code == 503 and streamed.json()["error"]["code"] == "model_download_failed"


def test_hf_endpoint_points_huggingface_urls_at_a_mirror(gateways: Start) -> None:
    content = b"GGUF" + bytes(range(256)) * 64
    with FileServer(content, path="/unsloth/Tiny-GGUF/resolve/main/tiny.gguf") as mirror:
        toml = (
            '[[models]]\nid = "tiny"\nkind = "gguf"\n'
            'url = "https://huggingface.co/unsloth/Tiny-GGUF/resolve/main/tiny.gguf"\nfile = "hub/tiny.gguf"\n'
            f'sha256 = "{mirror.sha256}"\n'
        )
        gw = gateways(toml, env={"HF_ENDPOINT": mirror.url.removesuffix(mirror.path)})
        response = httpx.post(gw.v1 + "/chat/completions", json=CHAT, timeout=60)
        assert response.status_code == 200, response.text
        assert [r.path for r in mirror.gets()] == ["/unsloth/Tiny-GGUF/resolve/main/tiny.gguf"]
