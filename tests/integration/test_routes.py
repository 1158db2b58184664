"""The OpenAI surface: every route, every bad input, through a real gateway and the fake engine."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.helpers import Gateway

Start = Callable[..., Gateway]

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from tests.helpers import start_gateway
    from tests.integration.conftest import models_toml

    root = tmp_path_factory.mktemp("routes")
    gateway = start_gateway(root, models_toml(root / "models"), env={"GATEWAY_MAX_BODY_MB": "1"})
    yield gateway
    gateway.stop()


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error: dict[str, object] = body["error"]
    return error


@pytest.mark.parametrize(
    ("content", "headers", "status", "fragment"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "could not parse the JSON body"),
        (b"[1, 2]", {"content-type": "application/json"}, 400, "must be a JSON object"),
        (b"", {"content-type": "application/json"}, 400, "body is empty"),
        (b'{"messages": "hi"}', {"content-type": "application/json"}, 400, "'messages' must be a non-empty array"),
        (b"--x\r\n", {"content-type": "multipart/form-data; boundary=x"}, 415, "application/json"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": 7}', {}, 400, "expected a string"),
    ],
)
def test_bad_requests_get_openai_errors(
    gw: Gateway, content: bytes, headers: dict[str, str], status: int, fragment: str
) -> None:
    response = httpx.post(gw.v1 + "/chat/completions", content=content, headers=headers, timeout=30)
    assert response.status_code == status
    assert fragment in str(error_of(response)["message"])


def test_oversized_body_is_413(gw: Gateway) -> None:
    big = {"input": ["x" * 1000] * 2000}
    response = httpx.post(gw.v1 + "/embeddings", json=big, timeout=30)
    assert response.status_code == 413 and "GATEWAY_MAX_BODY_MB" in str(error_of(response)["message"])

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(300):
            yield b"x" * 10_000

    response = httpx.post(gw.v1 + "/embeddings", content=chunks(), timeout=30)
    assert response.status_code == 413


def test_unknown_model_is_404_model_not_found(gw: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk(gw).chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found" and body["param"] == "model"
    assert "tiny-chat" in body["message"]


def test_model_of_the_wrong_kind_is_a_400(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError, match="embedding model and cannot serve /v1/chat/completions"):
        sdk(gw).chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "x"}])


def test_unknown_route_and_method(gw: Gateway) -> None:
    response = httpx.get(gw.v1 + "/nope")
    assert response.status_code == 404 and error_of(response)["code"] == "unknown_url"
    response = httpx.get(gw.v1 + "/chat/completions")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/moderations", "/files", "/files/file-abc/content"])
def test_moderations_and_files_are_501_and_not_retried(gw: Gateway, method: str, path: str) -> None:
    response = httpx.request(method, gw.v1 + path, json={"input": "x"} if method == "POST" else None)
    assert response.status_code == 501 and response.headers["x-should-retry"] == "false"
    assert error_of(response)["code"] == "not_implemented"


def test_sdk_does_not_retry_501(gw: Gateway) -> None:
    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=3)
    with pytest.raises(openai.APIStatusError) as info:
        client.moderations.create(input="hello")
    assert info.value.status_code == 501
    assert info.value.response.request.headers.get("x-stainless-retry-count") == "0"


def test_completions_plain_and_streaming(gw: Gateway) -> None:
    out = sdk(gw).completions.create(model="tiny-chat", prompt="once upon")
    assert out.choices[0].text == "echo: once upon" and out.model == "tiny-chat"
    pieces = [c.choices[0].text for c in sdk(gw).completions.create(model="tiny-chat", prompt="count:5", stream=True)]
    assert "".join(pieces).split() == ["w0", "w1", "w2", "w3", "w4"]


def test_responses_api(gw: Gateway) -> None:
    response = sdk(gw).responses.create(model="gpt-4o-mini", input="hello")
    assert response.output_text == "echo: hello"
    assert response.model == "tiny-chat"


def test_embeddings_forms_and_default_model(gw: Gateway) -> None:
    out = sdk(gw).embeddings.create(input="hello", model="tiny-embed")
    assert len(out.data) == 1 and abs(sum(v * v for v in out.data[0].embedding) - 1) < 1e-5
    response = httpx.post(gw.v1 + "/embeddings", json={"input": [[1, 2, 3], [4]]}, timeout=30)
    assert response.status_code == 200 and response.json()["model"] == "tiny-embed"
    response = httpx.post(gw.v1 + "/embeddings", json={"input": "x", "dimensions": 8}, timeout=30)
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 8


def test_images_url_and_b64(gw: Gateway) -> None:
    b64 = sdk(gw).images.generate(model="tiny-flux", prompt="a cat", size="32x16", response_format="b64_json")
    assert b64.data is not None
    png = base64.b64decode(b64.data[0].b64_json or "")
    assert png.startswith(b"\x89PNG")
    sent = [r["body"] for r in gw.upstream_requests() if r["path"] == "/v1/images/generations"][-1]
    assert (sent["width"], sent["height"], sent["response_format"]) == (32, 16, "B64Json") and "size" not in sent

    by_url = sdk(gw).images.generate(model="tiny-flux", prompt="a dog")
    assert by_url.data is not None
    url = by_url.data[0].url or ""
    assert url.startswith(gw.url + "/images/image-")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content.startswith(b"\x89PNG")
    for trick in ("/images/..%2f..%2fetc%2fpasswd", "/images/image-zz.png", "/images/%2e%2e", "/images/.%2e%2fengine"):
        assert httpx.get(gw.url + trick).status_code == 404
    bad = httpx.post(gw.v1 + "/images/generations", json={"prompt": "x", "size": "huge"}, timeout=30)
    assert bad.status_code == 400 and error_of(bad)["param"] == "size"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (["url"], "invalid_type"),
        ({}, "invalid_type"),
        (3, "invalid_type"),
        ("", "invalid_value"),
        ("URL", "invalid_value"),
    ],
)
def test_image_response_format_is_url_or_b64_json(gw: Gateway, value: object, code: str) -> None:
    body = {"model": "tiny-flux", "prompt": "x", "response_format": value}
    response = httpx.post(gw.v1 + "/images/generations", json=body, timeout=30)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == ("response_format", code)


def test_image_response_format_null_is_url(gw: Gateway) -> None:
    body = {"model": "tiny-flux", "prompt": "x", "response_format": None}
    response = httpx.post(gw.v1 + "/images/generations", json=body, timeout=30)
    assert response.status_code == 200 and response.json()["data"][0]["url"].startswith(gw.url + "/images/")


def test_speech_relays_audio(gw: Gateway) -> None:
    response = httpx.post(
        gw.v1 + "/audio/speech", json={"model": "tiny-speech", "input": "hi", "voice": "x"}, timeout=30
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("audio/")
    assert response.content[:4] == b"RIFF"


def test_unknown_fields_pass_through(gw: Gateway) -> None:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "top_k": 5, "min_p": 0.1}
    assert httpx.post(gw.v1 + "/chat/completions", json=body, timeout=30).status_code == 200
    sent = [r["body"] for r in gw.upstream_requests() if r["path"] == "/v1/chat/completions"][-1]
    assert sent["top_k"] == 5 and sent["min_p"] == 0.1


def test_status_and_model_retrieval(gw: Gateway) -> None:
    status = httpx.get(gw.url + "/status").json()
    assert [e["models"] for e in status["engines"]][:2] == [["tiny-chat"], ["tiny-gguf"]]  # one engine per model
    for engine in status["engines"]:
        assert {
            "name",
            "models",
            "state",
            "pid",
            "port",
            "memory_mb",
            "in_flight",
            "waiting",
            "starts",
            "crashes",
            "last_error",
            "seconds_until_idle_stop",
            "evictions",
        } <= set(engine)
    assert status["budget"] == {"budget_mb": None, "used_mb": status["budget"]["used_mb"]}
    assert [m["id"] for m in status["models"]][:2] == ["tiny-chat", "tiny-gguf"]
    assert {"state", "engine", "seconds_until_idle_stop", "memory_mb"} <= set(status["models"][0])
    model = sdk(gw).models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        sdk(gw).models.retrieve("nope")
    _ = json
