from __future__ import annotations

import base64
from pathlib import Path

import pytest

from gateway.dialects.openai.images import ImageStore, from_engine_reply, to_engine_request
from gateway.errors import InvalidRequest


def test_request_translation() -> None:
    body = {"prompt": "cat", "size": "512x256", "response_format": "b64_json"}
    assert to_engine_request(body) == "b64_json"
    assert body == {"prompt": "cat", "width": 512, "height": 256, "response_format": "B64Json"}
    body = {"prompt": "cat"}
    assert to_engine_request(body) == "url"
    assert body["response_format"] == "B64Json"


@pytest.mark.parametrize("body", [{"size": "big"}, {"size": "0x10"}, {"size": 5}, {"response_format": "Url"}])
def test_bad_image_requests(body: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        to_engine_request({"prompt": "x", **body})


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (["url"], "invalid_type"),
        ({}, "invalid_type"),
        (3, "invalid_type"),
        (True, "invalid_type"),
        ("", "invalid_value"),
        ("URL", "invalid_value"),
        ("b64", "invalid_value"),
    ],
)
def test_response_format_is_url_or_b64_json_and_nothing_else(value: object, code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        to_engine_request({"prompt": "x", "response_format": value})
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "response_format", code)


def test_response_format_null_means_url() -> None:
    body = {"prompt": "x", "response_format": None}
    assert to_engine_request(body) == "url" and body["response_format"] == "B64Json"


def test_reply_translation_strips_prefix_and_serves_urls(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    encoded = base64.b64encode(png).decode()
    store = ImageStore(tmp_path, ttl=60)
    reply = {"created": 1, "data": [{"url": None, "b64_json": "data:image/png;base64," + encoded}]}
    out = from_engine_reply(reply, "b64_json", store, "http://gw/")
    assert out["data"][0] == {"b64_json": encoded}
    reply = {"created": 1, "data": [{"url": None, "b64_json": "data:image/png;base64," + encoded}]}
    out = from_engine_reply(reply, "url", store, "http://gw/")
    url = out["data"][0]["url"]
    assert url.startswith("http://gw/images/image-") and "b64_json" not in out["data"][0]
    name = url.rsplit("/", 1)[1]
    path = store.path_of(name)
    assert path is not None and path.read_bytes() == png


@pytest.mark.parametrize("name", ["../etc/passwd", "image-zz.png", "..%2fimage.png", "image-" + "0" * 32 + ".png"])
def test_store_refuses_anything_but_its_own_files(name: str, tmp_path: Path) -> None:
    assert ImageStore(tmp_path, ttl=60).path_of(name) is None


def test_old_images_expire(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = ImageStore(tmp_path, ttl=10, clock=lambda: now[0])
    first = store.save(b"a")
    import os

    os.utime(tmp_path / first, (now[0] - 60, now[0] - 60))
    store.save(b"b")
    assert store.path_of(first) is None
