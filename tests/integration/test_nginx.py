"""deploy/nginx/mistral-gateway.conf in front of a real gateway: a real nginx, run by the test on loopback.

The site file is used as shipped; only its listen address and the upstream port are rewritten, and it is
wrapped in a minimal main config that keeps the pid file, logs and temporary files in the test's folder.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from tests.helpers import ROOT, Gateway, free_port, pid_alive, wait_for, wait_serving

SITE = ROOT / "deploy" / "nginx" / "mistral-gateway.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx); CI installs it in .ci/run"
)

Start = Callable[..., Gateway]


@dataclass
class Nginx:
    url: str
    proc: subprocess.Popen[bytes]
    folder: Path

    def log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def workers(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def stop(self) -> None:
        workers = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers, then exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        wait_for(lambda: not any(pid_alive(pid) for pid in workers), 10, f"nginx workers {workers} to exit")


def site_config(upstream_port: int, listen_port: int) -> str:
    """The shipped site file, listening on a loopback port and pointing at the test's gateway."""
    text = SITE.read_text()
    text, n_upstream = re.subn(r"server 127\.0\.0\.1:8080;", f"server 127.0.0.1:{upstream_port};", text)
    text, n_listen = re.subn(r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{listen_port};", text, flags=re.M)
    text, n_listen6 = re.subn(r"^\s*listen \[::\]:80;\n", "", text, flags=re.M)
    assert (n_upstream, n_listen, n_listen6) == (1, 1, 1), "the site file's upstream or listen lines changed"
    return text


def main_config(folder: Path, site: str) -> str:
    # As root, nginx would switch its workers to `nobody`, who cannot write to the test's folder.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        f"daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log info;\n{user}"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    log_format ids '$request_id $status';\n"
        f"    access_log {folder}/access.log ids;\n"
        f"    client_body_temp_path {folder}/client_body;\n"
        f"    proxy_temp_path {folder}/proxy;\n"
        f"    fastcgi_temp_path {folder}/fastcgi;\n"
        f"    uwsgi_temp_path {folder}/uwsgi;\n"
        f"    scgi_temp_path {folder}/scgi;\n"
        f"{site}\n"
        "}\n"
    )


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[Callable[[Gateway], Nginx]]:
    """Start nginx with the shipped site file in front of a gateway; every nginx is stopped at the end."""
    started: list[Nginx] = []

    def start(gateway: Gateway) -> Nginx:
        assert NGINX is not None
        folder = tmp_path / f"nginx{len(started)}"
        folder.mkdir()
        port = free_port()
        upstream_port = int(gateway.url.rsplit(":", 1)[1])
        conf = folder / "nginx.conf"
        conf.write_text(main_config(folder, site_config(upstream_port, port)))
        argv = [NGINX, "-e", str(folder / "error.log"), "-p", str(folder), "-c", str(conf)]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        with (folder / "stderr.log").open("wb") as err:
            proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT)
        server = Nginx(f"http://127.0.0.1:{port}", proc, folder)
        started.append(server)

        wait_serving(proc, server.url + "/healthz", server.log, 15, "nginx (proxying /healthz to the gateway)")
        return server

    yield start
    for server in started:
        server.stop()


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_stream_arrives_chunk_by_chunk_through_nginx(
    gateways: Start, nginx_in_front: Callable[[Gateway], Nginx]
) -> None:
    gw = gateways()
    proxy = nginx_in_front(gw)
    # Request ids: a client's passes through nginx and comes back; without one, nginx's own is used.
    sent = httpx.get(proxy.url + "/healthz", headers={"X-Request-ID": "client-id-1"}, timeout=5)
    assert sent.headers["x-request-id"] == "client-id-1"
    made = httpx.get(proxy.url + "/healthz", timeout=5).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    wait_for(lambda: f"{made} 200" in (proxy.folder / "access.log").read_text(), 5, "nginx's access log line")
    # Warm the engine first, so that the stream's timing is the engine's alone.
    httpx.post(proxy.url + "/v1/chat/completions", json={"messages": say("warm")}, timeout=30).raise_for_status()

    body = {"model": "tiny-chat", "stream": True, "messages": say("slow:3")}  # 10 chunks over 3 s
    arrivals: list[float] = []
    # httpx asks for gzip: the stream must still come back uncompressed.
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in response.headers
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 10
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    spread = arrivals[-1] - arrivals[0]
    measured = f"spread {spread:.2f} s, gaps {[round(g, 2) for g in gaps]}"
    print(f"stream through nginx: {measured}")
    # Buffered, the ten chunks would arrive together at the end: spread ~0, no gap.
    assert spread > 1.5, measured
    assert sum(gap > 0.1 for gap in gaps) >= 5, measured


def test_a_cold_start_through_nginx_waits_as_long_as_the_gateway_does(
    gateways: Start, nginx_in_front: Callable[[Gateway], Nginx]
) -> None:
    """nginx's default 60 s read timeout would answer 504 to the first request after an idle stop when the engine
    takes longer to load: the shipped site waits as long as the gateway's own start-up timeout (read from nginx's
    own view of its configuration, `nginx -T`), and a cold start through it is answered."""
    gw = gateways(fake_env={"FAKE_ENGINE_LOAD_DELAY": "2"})
    proxy = nginx_in_front(gw)
    assert NGINX is not None  # the fixture skips the test without nginx
    effective = subprocess.run(
        [NGINX, "-T", "-p", str(proxy.folder), "-c", str(proxy.folder / "nginx.conf")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    startup = Settings(_env_file=None).startup_timeout
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = re.findall(rf"^\s*{directive}\s+(\d+)s;", effective, flags=re.M)
        assert seconds and all(int(value) >= startup for value in seconds), (directive, seconds)
    reply = httpx.post(
        proxy.url + "/v1/chat/completions", json={"model": "tiny-chat", "messages": say("cold")}, timeout=120
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "echo: cold"
    assert len(gw.spawns()) == 1


def test_large_embeddings_body_passes_and_oversized_gets_an_openai_413(
    gateways: Start, nginx_in_front: Callable[[Gateway], Nginx]
) -> None:
    gw = gateways()
    proxy = nginx_in_front(gw)
    texts = [f"{i:05d}" + "x" * 9_995 for i in range(2000)]  # 2000 x 10 kB = 20 MB of JSON
    payload = json.dumps({"model": "tiny-embed", "input": texts}).encode()
    assert len(payload) > 20_000_000
    headers = {"Content-Type": "application/json"}
    reply = httpx.post(proxy.url + "/v1/embeddings", content=payload, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text[:500]
    assert len(reply.json()["data"]) == 2000
    posted = [r for r in gw.upstream_requests() if r["method"] == "POST"]
    assert len(posted[-1]["body"]["input"]) == 2000  # the whole batch reached the engine

    # Beyond client_max_body_size (= GATEWAY_MAX_BODY_MB): nginx answers, in the gateway's error shape.
    too_big = b'{"input": "' + b"x" * (65 * 1024 * 1024) + b'"}'
    refused = httpx.post(proxy.url + "/v1/embeddings", content=too_big, headers=headers, timeout=120)
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["code"] == "request_too_large" and set(error) == {"message", "type", "param", "code"}
    assert len([r for r in gw.upstream_requests() if r["method"] == "POST"]) == 1


def test_image_urls_name_the_proxy_the_client_used(gateways: Start, nginx_in_front: Callable[[Gateway], Nginx]) -> None:
    gw = gateways()
    proxy = nginx_in_front(gw)
    reply = httpx.post(proxy.url + "/v1/images/generations", json={"model": "tiny-flux", "prompt": "a cat"}, timeout=60)
    assert reply.status_code == 200, reply.text
    url = reply.json()["data"][0]["url"]
    assert url.startswith(proxy.url + "/images/image-")  # scheme, host and port from nginx's X-Forwarded-* headers
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
