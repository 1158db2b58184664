"""What a web page may make the gateway do (gateway/http/browsers.py): tried as an attacker would, with foreign Host
headers (DNS rebinding) and with a page of another origin in a real headless Chromium (cross-site form posts and
no-cors fetches), while curl-like clients, the SDKs and the same-origin console keep working."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver

from tests.helpers import Gateway, free_port, wait_for

Start = Callable[..., Gateway]
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


def host(gw: Gateway, name: str) -> dict[str, str]:
    return {"Host": f"{name}:{gw.url.rsplit(':', 1)[1]}"}


def test_a_foreign_host_is_refused_on_every_route_in_its_dialect(gateways: Start) -> None:
    gw = gateways()
    foreign = host(gw, "evil.example")
    for method, path, body in (
        ("GET", "/status", None),
        ("GET", "/v1/models", None),
        ("GET", "/admin/requests", None),
        ("GET", "/logs/stream", None),
        ("POST", "/admin/engine/stop", None),
        ("POST", "/v1/chat/completions", CHAT),
    ):
        answer = httpx.request(method, gw.url + path, headers=foreign, json=body, timeout=10)
        assert answer.status_code == 403, path
        error = answer.json()["error"]
        assert error["code"] == "host_not_allowed" and "GATEWAY_ALLOWED_HOSTS" in error["message"], path
    anthropic_answer = httpx.post(gw.url + "/v1/messages", headers=foreign, json={**CHAT, "max_tokens": 5})
    assert anthropic_answer.json()["type"] == "error" and anthropic_answer.json()["error"]["type"] == "permission_error"
    ollama_answer = httpx.post(gw.url + "/api/chat", headers=foreign, json=CHAT)
    assert ollama_answer.status_code == 403 and "GATEWAY_ALLOWED_HOSTS" in ollama_answer.json()["error"]
    assert gw.upstream_requests() == [] and gw.engine()["starts"] == 0  # nothing reached an engine


def test_the_names_a_local_user_types_and_the_configured_ones_are_answered(gateways: Start) -> None:
    gw = gateways(env={"GATEWAY_ALLOWED_HOSTS": "llm.example.com,*.corp.example"})
    names = [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "console.localhost",
        socket.gethostname(),
        "192.168.1.20",
        "llm.example.com",
        "box.corp.example",
    ]
    for name in names:
        assert httpx.get(gw.url + "/v1/models", headers=host(gw, name), timeout=10).status_code == 200, name
    assert httpx.get(gw.url + "/v1/models", headers=host(gw, "corp.example.evil"), timeout=10).status_code == 403


def test_a_page_of_another_origin_may_not_send_but_clients_that_are_not_browsers_and_the_console_may(
    gateways: Start,
) -> None:
    gw = gateways()
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost:1", "Sec-Fetch-Site": "same-site"},
    ):
        refused = httpx.post(gw.v1 + "/chat/completions", json=CHAT, headers=headers, timeout=10)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_site_request", headers
        assert "GATEWAY_CORS_ORIGINS" in refused.json()["error"]["message"]
    assert httpx.post(gw.url + "/admin/engine/stop", headers={"Origin": "http://evil.example"}).status_code == 403
    assert gw.upstream_requests() == []
    # A page may still read nothing cross-origin (no CORS header), but a GET is no harm to send.
    read = httpx.get(gw.v1 + "/models", headers={"Origin": "http://evil.example"}, timeout=10)
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    # curl -d (a form content type), the SDKs and the console on the gateway's own origin go through.
    curl = httpx.post(
        gw.v1 + "/chat/completions",
        content=b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert curl.status_code == 200
    same = httpx.post(
        gw.v1 + "/chat/completions", json=CHAT, headers={"Origin": gw.url, "Sec-Fetch-Site": "same-origin"}, timeout=30
    )
    assert same.status_code == 200
    client = openai.OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    assert client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}]).choices
    claude = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    assert claude.messages.create(model="tiny-chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}]).content


@pytest.mark.parametrize("origins", ["http://app.example", "*"])
def test_cors_origins_let_a_browser_application_in_with_proper_preflights(gateways: Start, origins: str) -> None:
    gw = gateways(env={"GATEWAY_CORS_ORIGINS": origins})
    preflight = httpx.options(
        gw.v1 + "/chat/completions",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    allowed = preflight.headers["access-control-allow-origin"]
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = httpx.post(gw.v1 + "/chat/completions", json=CHAT, headers={"Origin": "http://app.example"}, timeout=30)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == allowed
    if origins == "*":
        assert allowed == "*" and "access-control-allow-credentials" not in preflight.headers  # never * with them
    else:
        assert allowed == "http://app.example" and preflight.headers["access-control-allow-credentials"] == "true"
        other = httpx.post(gw.v1 + "/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"})
        assert other.status_code == 403


# ------------------------------------------------------------------------------------------- a real browser

ATTACK = """<!doctype html><html><body>
<form id="stop" method="POST" action="{gateway}/admin/engine/stop"></form>
<form id="chat" method="POST" enctype="text/plain" action="{gateway}/v1/chat/completions">
  <input name='{{"model": "tiny-chat", "messages": [{{"role": "user", "content": "form", "x": "' value='"}}]}}'>
</form>
<script>
  const gateway = "{gateway}";
  const body = JSON.stringify({{model: "tiny-chat", messages: [{{role: "user", content: "fetch"}}]}});
  fetch(gateway + "/v1/chat/completions", {{method: "POST", mode: "no-cors", body: body,
    headers: {{"Content-Type": "text/plain"}}}}).finally(() => {{
      fetch(gateway + "/admin/engine/start", {{method: "POST", mode: "no-cors"}}).finally(() => {{
        document.getElementById("chat").target = "chatframe";
        document.getElementById("chat").submit();
        setTimeout(() => document.getElementById("stop").submit(), 300);
      }});
  }});
</script>
<iframe name="chatframe"></iframe>
</body></html>"""


def serve_page(folder: Path, html: str) -> tuple[str, http.server.ThreadingHTTPServer]:
    (folder / "index.html").write_text(html)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            return None

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://localhost:{port}/index.html", server


def test_a_page_of_another_site_in_a_real_browser_can_neither_prompt_nor_stop_an_engine(
    gateways: Start, browser: WebDriver, tmp_path: Path
) -> None:
    gw = gateways()
    httpx.post(gw.v1 + "/chat/completions", json=CHAT, timeout=30).raise_for_status()  # the engine runs
    before = len(gw.upstream_requests())
    url, server = serve_page(tmp_path, ATTACK.format(gateway=gw.url))  # localhost:other vs 127.0.0.1: another site
    try:
        browser.get(url)
        # The refusals are the sign the page ran (a mark on the page itself would be gone once its last form navigates
        # it away, 300 ms later: a poll on a busy machine missed it).
        wait_for(lambda: _refused(gw) >= 4, 30, "the gateway to refuse the page's four requests")
    finally:
        server.shutdown()
    assert len(gw.upstream_requests()) == before  # no prompt reached the engine
    engine = gw.engine()
    assert engine["state"] == "ready" and engine["starts"] == 1  # not stopped, not restarted


def _refused(gw: Gateway) -> int:
    return sum(1 for line in gw.log().splitlines() if "gateway.access" in line and "status=403" in line)
