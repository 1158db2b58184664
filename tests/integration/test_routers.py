"""Three gateways behind a real router, on loopback, configured as docs/scale-out.md says (gateway/fleet/): nodes 1 and
2 serve alpha and beta, node 3 also gamma; 300 mixed requests (a fifth of them streams), node 2 killed (SIGKILL)
halfway, while streams run on every node.

What must hold: every request that is not a stream is answered; no request for a model some node serves gets a 404;
the streams on the killed node end cut (the router cannot finish them), the others whole; each model's requests are
spread over the nodes that serve it, and none reaches node 2 once it is gone; nothing a router adds to a body reaches
an engine. The run's figures (answered, retried, spread per node, what the kill cost) are printed (``pytest -s``).

Each router is installed from PyPI into a venv of the test cache the first time (tests/routers.py); its test is
skipped, saying why, when that fails. LiteLLM's proxy pins about a hundred packages (a few hundred MB, 80 s on a fresh
machine): its install starts in the background when this test is collected; MISTRAL_GATEWAY_TEST_LITELLM=0 leaves
it out.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import json
import math
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.chat.checks import ROUTER_FIELDS
from gateway.fleet import litellm, nodes, vllm_router
from tests.helpers import Gateway, HeldStream, free_port, held_streams, start_gateway, wait_for, wait_serving
from tests.routers import LITELLM, VLLM_ROUTER, counter_sum, installed, litellm_env

Start = Callable[..., Gateway]
Node = Callable[[Mapping[str, str]], str]  # which node answered, from the headers the router passes on

REQUESTS = 300
CONCURRENCY = 12
MODELS = (("alpha", 0.4), ("beta", 0.4), ("gamma", 0.2))
NODE_MODELS = {"node1": ("alpha", "beta"), "node2": ("alpha", "beta"), "node3": ("alpha", "beta", "gamma")}


def models_file(ids: tuple[str, ...]) -> str:
    return "".join(f'[[models]]\nid = "{m}"\nkind = "plain"\nrepo = "org/{m}"\nprefetch = false\n' for m in ids)


@dataclass(frozen=True)
class Spec:
    model: str
    stream: bool
    words: int


@dataclass
class Outcome:
    spec: Spec
    sent: float  # when it was sent (monotonic)
    status: int = 0
    node: str = ""
    complete: bool = False  # a stream's [DONE] came
    error: str = ""


@dataclass
class Fleet:
    """The three nodes and the kill of node 2."""

    gateways: dict[str, Gateway]
    killed: float = math.inf  # when node 2 was killed (monotonic)

    def kill_node2(self) -> None:
        self.gateways["node2"].proc.send_signal(signal.SIGKILL)
        self.gateways["node2"].proc.wait(10)
        self.killed = time.monotonic()

    def phase(self, outcome: Outcome, half: int) -> str:
        return "before" if half == 0 else "after" if outcome.sent > self.killed else "around"


@pytest.fixture
def fleet(gateways: Start, tmp_path: Path) -> Iterator[Fleet]:
    """Nodes 1 and 3 in this process (fast); node 2 a process of its own, since it is killed."""
    node1 = gateways(models_file(NODE_MODELS["node1"]), env={"GATEWAY_NODE_NAME": "node1"})
    node3 = gateways(models_file(NODE_MODELS["node3"]), env={"GATEWAY_NODE_NAME": "node3"})
    node2 = start_gateway(tmp_path, models_file(NODE_MODELS["node2"]), name="node2", env={"GATEWAY_NODE_NAME": "node2"})
    try:
        yield Fleet({"node1": node1, "node2": node2, "node3": node3})
    finally:
        node2.stop(signal.SIGKILL)


def send(client: httpx.Client, url: str, spec: Spec, headers: Mapping[str, str], node_of: Node) -> Outcome:
    body = {
        "model": spec.model,
        "messages": [{"role": "user", "content": f"count:{spec.words}"}],
        "stream": spec.stream,
    }
    outcome = Outcome(spec, time.monotonic())
    try:
        if not spec.stream:
            response = client.post(url + "/v1/chat/completions", json=body, headers=headers)
            outcome.status, outcome.node = response.status_code, node_of(response.headers)
            outcome.complete = response.status_code == 200
            return outcome
        with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            outcome.status, outcome.node = response.status_code, node_of(response.headers)
            for line in response.iter_lines():
                outcome.complete |= line == "data: [DONE]"
                if line.startswith("data: ") and '"error"' in line:
                    outcome.error = line
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    return outcome


def run(fleet: Fleet, url: str, *, headers: Mapping[str, str], node_of: Node) -> dict[str, Any]:
    """The 300 requests, node 2 killed halfway while slow streams run on every node; what happened."""
    rng = random.Random(23)
    specs = [
        Spec(rng.choices([m for m, _ in MODELS], [w for _, w in MODELS])[0], rng.random() < 0.2, rng.randint(1, 6))
        for _ in range(REQUESTS)
    ]
    local = threading.local()

    def one(spec: Spec) -> Outcome:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=60)
        return send(local.client, url, spec, headers, node_of)

    slow = [{"model": "alpha", "messages": [{"role": "user", "content": "slow:8"}], "stream": True}] * 3
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool, contextlib.ExitStack() as held:
        first = list(pool.map(one, specs[: REQUESTS // 2]))
        # Slow streams on every node; a router that picks at random (LiteLLM's simple-shuffle) may need a few batches.
        streams: list[HeldStream] = []
        for _ in range(8):
            batch = held.enter_context(held_streams(url, slow, headers=headers))
            wait_for(functools.partial(_started, batch), 30, "the slow streams' first events")
            streams += batch
            if {node_of(s.headers) for s in streams} == {"node1", "node2", "node3"}:
                break
        assert {node_of(s.headers) for s in streams} == {"node1", "node2", "node3"}  # on every node
        second = [pool.submit(one, spec) for spec in specs[REQUESTS // 2 :]]
        wait_for(lambda: sum(f.done() for f in second) >= 10, 60, "the second half to be under way")
        fleet.kill_node2()
        phases = {id(o): "before" for o in first}
        outcomes = first + [future.result() for future in second]
        phases.update({id(o): fleet.phase(o, 1) for o in outcomes[len(first) :]})
        wait_for(lambda: all(s.ended for s in streams), 30, "the slow streams to end, whole or cut")
    return {"outcomes": outcomes, "phases": phases, "streams": streams, "node_of": node_of}


def check_and_report(fleet: Fleet, result: dict[str, Any], router: str, retried: float | None) -> None:
    outcomes: list[Outcome] = result["outcomes"]
    phases: dict[int, str] = result["phases"]
    streams: list[HeldStream] = result["streams"]
    node_of: Node = result["node_of"]
    failed = [o for o in outcomes if not o.spec.stream and o.status != 200]
    assert failed == [], f"requests not answered: {failed[:5]}"
    assert all(o.status != 404 for o in outcomes)
    # A stream that did not finish was on node 2 when it was killed (the router cuts it); every other one finished.
    cut = [o for o in outcomes if o.spec.stream and not o.complete]
    assert all(o.node == "node2" and phases[id(o)] == "around" for o in cut), cut[:5]
    on_node2 = [s for s in streams if node_of(s.headers) == "node2"]
    # Cut (vllm-router passes the broken connection on) or ended by the router with an error event (LiteLLM), never
    # passed off as whole.
    assert on_node2 and all("[DONE]" not in s.lines for s in on_node2)
    assert all(not s.complete or '"error"' in s.lines[-1] for s in on_node2), on_node2
    for stream in streams:
        if stream not in on_node2:  # the kill cost nothing elsewhere
            assert stream.complete and stream.lines[-1] == "[DONE]", stream
            assert _text(stream) == " ".join(f"w{i}" for i in range(10))
    spread: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        if outcome.status == 200:
            spread[(phases[id(outcome)], outcome.spec.model)][outcome.node] += 1
    for model in ("alpha", "beta"):
        assert set(spread[("before", model)]) == {"node1", "node2", "node3"}, spread[("before", model)]
        assert set(spread[("after", model)]) == {"node1", "node3"}, spread[("after", model)]  # never the dead one
    assert {node for (_, model), counter in spread.items() if model == "gamma" for node in counter} == {"node3"}
    late = [o for o in outcomes if phases[id(o)] == "around" and o.node == "node2" and o.complete]
    print(
        f"\n{router}: {sum(o.status == 200 and o.complete for o in outcomes)}/{len(outcomes)} answered whole "
        f"({sum(not o.spec.stream for o in outcomes)} whole answers, {sum(o.spec.stream for o in outcomes)} streams); "
        f"retried by the router: {retried if retried is not None else 'not reported'}; "
        f"cut by the kill: {len(cut)} of the mixed streams and the {len(on_node2)} of the {len(streams)} slow ones on "
        "node 2 "
        f"(the others finished whole); "
        f"answered by node 2 among the requests in flight at the kill: {len(late)}"
    )
    for phase in ("before", "around", "after"):
        for model in ("alpha", "beta", "gamma"):
            print(f"  {phase:>6} the kill, {model}: {dict(sorted(spread[(phase, model)].items()))}")
    # Nothing a router adds to a body reaches an engine.
    bodies = [request["body"] for request in fleet.gateways["node3"].upstream_requests()]
    assert bodies and not any(set(ROUTER_FIELDS) & set(body or {}) for body in bodies)


# ----------------------------------------------------------------------------------------------- vllm-router


@pytest.fixture(scope="module")
def vllm_router_program() -> Path:
    found = installed("venv-vllm-router", VLLM_ROUTER, "vllm-router")
    if isinstance(found, str):
        pytest.skip(found)
    return found


def test_vllm_router_in_front_of_three_nodes_one_killed_halfway(fleet: Fleet, vllm_router_program: Path) -> None:
    port, metrics_port = free_port(), free_port()
    argv = vllm_router.command(host="127.0.0.1", port=port)
    log_path = fleet.gateways["node1"].log_path.parent / "vllm-router.log"
    with log_path.open("wb") as log:
        router = subprocess.Popen(
            [str(vllm_router_program), *argv[1:], "--prometheus-port", str(metrics_port), "--log-level", "warning"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(router, url + "/health", lambda: log_path.read_text()[-3000:], 60, "vllm-router")
        with httpx.Client(timeout=10) as client:
            found = [nodes.parse(gw.url, model_dir=gw.log_path.parent, client=client) for gw in fleet.gateways.values()]
            assert [node.name for node in found] == ["node1", "node2", "node3"]
            assert vllm_router.register(found, url, client=client) == []
            assert len(client.get(url + "/workers").json()["workers"]) == 7
        result = run(fleet, url, headers={}, node_of=lambda headers: headers.get("x-gateway-node", ""))
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        check_and_report(fleet, result, "vllm-router 0.1.17", counter_sum(metrics, "vllm_router_retries_total"))
    finally:
        router.terminate()
        router.wait(10)


# -------------------------------------------------------------------------------------------- LiteLLM proxy


@pytest.fixture(scope="module")
def litellm_program() -> Path:
    if os.environ.get("MISTRAL_GATEWAY_TEST_LITELLM") == "0":
        pytest.skip(f"MISTRAL_GATEWAY_TEST_LITELLM=0: LiteLLM's proxy ({LITELLM}) is not installed nor run")
    found = installed("venv-litellm", LITELLM, "litellm")
    if isinstance(found, str):
        pytest.skip(found)
    return found


def test_litellm_in_front_of_three_nodes_one_killed_halfway(fleet: Fleet, litellm_program: Path) -> None:
    port = free_port()
    folder = fleet.gateways["node1"].log_path.parent
    found = [nodes.parse(gw.url, model_dir=folder) for gw in fleet.gateways.values()]
    config = folder / "litellm.yaml"
    config.write_text(litellm.config(found) + "  master_key: sk-test\n")
    env = litellm_env()
    log_path = folder / "litellm.log"
    with log_path.open("wb") as log:
        proxy = subprocess.Popen(
            [str(litellm_program), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proxy, url + "/health/liveliness", lambda: log_path.read_text()[-3000:], 180, "the LiteLLM proxy")
        # LiteLLM names the deployment that answered (model_info.id: node/model) in x-litellm-model-id.
        result = run(
            fleet,
            url,
            headers={"Authorization": "Bearer sk-test"},
            node_of=lambda headers: headers.get("x-litellm-model-id", "").split("/")[0],
        )
        check_and_report(fleet, result, LITELLM, None)
    finally:
        proxy.terminate()
        proxy.wait(30)


# ------------------------------------------------------------------------------------------------- helpers


def _started(streams: list[HeldStream]) -> bool:
    return all(s.lines for s in streams)


def _text(stream: HeldStream) -> str:
    chunks = [json.loads(line) for line in stream.lines if line != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
