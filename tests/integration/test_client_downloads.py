"""Clients cannot choose what the gateway fetches or writes: Ollama's pull takes only configured models (whatever
name, path or URL a client sends), and no image URL or path a client sends reaches an engine, which would fetch or
read it. In-process gateways with real HTTP servers: a request that reached the wrong server would show in its log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fileserver import FileServer
from tests.helpers import Gateway

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_ollama_pull_fetches_only_configured_models(gateways: Any, tmp_path: Path) -> None:
    with (
        FileServer(b"\0" * 4096, path="/files/tiny-Q8_0.gguf") as configured,
        FileServer(b"evil", path="/evil.gguf") as other,
    ):
        toml = f'[[models]]\nid = "tiny-chat"\nkind = "gguf"\nurl = "{configured.url}"\nfile = "tiny/tiny-Q8_0.gguf"\n'
        gw: Gateway = gateways(toml)
        model_dir = Path(gw.env["GATEWAY_MODEL_DIR"])
        for name in ("nope", "../../etc/passwd", "tiny/../../tiny-chat", "/tmp/x", other.url, "tiny-chat/../x"):
            for field in ("model", "name"):
                reply = httpx.post(gw.url + "/api/pull", json={field: name, "stream": False}, timeout=30)
                assert reply.status_code == 404, (name, reply.text)
                assert "does not exist" in reply.json()["error"]
        assert configured.gets() == [] and not model_dir.exists()
        # A configured model with a URL, an `insecure` flag or a file name of the client's: the configured file only.
        body = {"model": "tiny-chat", "insecure": True, "url": other.url, "file": "../../evil.gguf", "stream": False}
        reply = httpx.post(gw.url + "/api/pull", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json() == {"status": "success"}
        assert len(configured.gets()) == 1 and other.gets() == []
        assert [f for f in files_under(model_dir) if not f.endswith(".sha256")] == ["tiny/tiny-Q8_0.gguf"]
    assert not list(tmp_path.rglob("evil.gguf")) and not list(tmp_path.rglob("passwd"))


VISION = """
[[models]]
id = "tiny-vision"
kind = "vision-plain"
path = "{folder}"
[models.options]
arch = "qwen2_5vl"
"""


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/evil.png",
        "https://169.254.169.254/latest/meta-data",
        "/etc/passwd",
        "file:///etc/passwd",
    ],
)
def test_an_image_a_client_names_by_url_or_path_never_reaches_an_engine(
    gateways: Any, tmp_path: Path, url: str
) -> None:
    (tmp_path / "vision").mkdir(exist_ok=True)
    with FileServer(b"\x89PNG", path="/evil.png") as other:
        url = url.format(port=other.url.split(":")[2].split("/")[0])
        gw: Gateway = gateways(VISION.format(folder=tmp_path / "vision"))
        image: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "what is it?"},
        ]
        chat = {"model": "tiny-vision", "messages": [{"role": "user", "content": image}]}
        openai = httpx.post(gw.v1 + "/chat/completions", json=chat, timeout=30)
        assert openai.status_code == 400, openai.text
        error = openai.json()["error"]
        assert error["param"] == "messages[0].content[0].image_url.url" and error["code"] == "unsupported_parameter"
        assert "data URL" in error["message"]
        content = [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": "what is it?"}]
        responses = {"model": "tiny-vision", "input": [{"role": "user", "content": content}]}
        assert httpx.post(gw.v1 + "/responses", json=responses, timeout=30).status_code == 400
        block = {"type": "image", "source": {"type": "url", "url": url}}
        messages = {"model": "tiny-vision", "max_tokens": 8, "messages": [{"role": "user", "content": [block]}]}
        anthropic = httpx.post(gw.v1 + "/messages", json=messages, timeout=30)
        assert anthropic.status_code == 400 and anthropic.json()["error"]["type"] == "invalid_request_error"
        assert "base64" in anthropic.json()["error"]["message"]
        assert gw.upstream_requests() == [] and other.gets() == []  # no engine was even started
        # The same image inline is served.
        image[0]["image_url"] = {"url": f"data:image/png;base64,{PNG}"}
        assert httpx.post(gw.v1 + "/chat/completions", json=chat, timeout=30).status_code == 200
        assert [r["path"] for r in gw.upstream_requests() if r["method"] == "POST"] == ["/v1/chat/completions"]
