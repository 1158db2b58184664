"""vllm-router (PyPI ``vllm-router``, the Rust router of vllm-project) in front of gateways that serve different
models.

In its plain mode the router treats every server as serving every model: a request for a model that only some nodes
serve reaches the others and gets a 404, which it does not retry. So the router runs in its multi-model mode
(``--enable-igw``), where servers are registered at run time, each for one model (``POST /workers {url,
model_id}``), and a request goes to the servers registered for its ``model``. The router keys servers by URL (a
second registration of a URL replaces the first), so a node is registered once per model under the node's
``/m/<model>/`` prefix (gateway/http/node.py), where it answers as a server of that model alone: its ``/health``
is that model's, and the router's ``{url}{route}`` lands on the node's own route.

The policy is ``round_robin``: the router retries a failed attempt (a refused connection, 5xx, 408, 429) by running
its policy again without excluding the server that failed, and only round-robin moves on to another one; the
load-aware ``power_of_two`` prefers a dead server (it has no requests left), and ``cache_aware`` picks the same
server for the same prompt again. A node that stops answering its ``/health`` three times in a row (the router's
fixed threshold for registered servers) is taken out; ``--health-check-interval-secs`` sets how often it asks, and
so how long a node being stopped should keep answering with GATEWAY_SHUTDOWN_NOTICE (three intervals and some).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from urllib.parse import quote, urlsplit

import httpx

from .nodes import Node, peers_line

HEALTH_INTERVAL = 2  # seconds between two health checks of every registered server
POLICY = "round_robin"


def workers(nodes: Sequence[Node]) -> list[dict[str, str]]:
    """One registration per node and model name: the node's /m/<name> prefix, for that name."""
    return [
        {"url": f"{node.url}/m/{quote(name, safe='/')}", "model_id": name} for node in nodes for name in node.models
    ]


def command(*, host: str = "0.0.0.0", port: int = 30000, api_key: bool = False) -> list[str]:
    """The router's command line (its servers are registered once it runs). ``api_key``: the nodes want one, taken
    from $NODE_API_KEY."""
    argv = ["vllm-router", "--enable-igw", "--host", host, "--port", str(port), "--policy", POLICY]
    argv += ["--health-check-interval-secs", str(HEALTH_INTERVAL)]
    if api_key:
        argv += ["--api-key", "$NODE_API_KEY"]
    return argv


def script(nodes: Sequence[Node], *, router: str = "http://127.0.0.1:30000", api_key: bool = False) -> str:
    """A shell script: how to start the router, then the registration of every node and model."""
    port = urlsplit(router).port or 30000
    argv = " ".join(arg if arg.startswith("$") else shlex.quote(arg) for arg in command(port=port, api_key=api_key))
    lines = [
        "#!/bin/sh",
        "# vllm-router in front of mistral-gateway nodes (docs/scale-out.md); written by `mistral-gateway routers "
        "vllm-router`.",
        "# Start the router (multi-model mode: servers are registered while it runs):",
        f"#   {argv}",
        peers_line(nodes),
        "# then register each node once per model name, under the node's /m/<model>/ prefix:",
        "set -e",
        f"ROUTER=${{ROUTER:-{router}}}",
    ]
    for worker in workers(nodes):
        body = shlex.quote(json.dumps(worker))
        lines.append(f'curl -fsS -w "\\n" -X POST "$ROUTER/workers" -H "content-type: application/json" -d {body}')
    return "\n".join(lines) + "\n"


def register(nodes: Sequence[Node], router: str, *, client: httpx.Client) -> list[str]:
    """Register every node and model with the router running at ``router``; what failed, one line each."""
    failed = []
    for worker in workers(nodes):
        try:
            response = client.post(router.rstrip("/") + "/workers", json=worker)
        except httpx.HTTPError as exc:
            failed.append(f"{worker['url']} ({worker['model_id']}): {exc}")
            continue
        if response.status_code != 200:
            failed.append(f"{worker['url']} ({worker['model_id']}): {response.status_code} {response.text[:200]}")
    return failed
