"""A router's configuration for several gateways (gateway/fleet/): the nodes' names, one registration or deployment
per node and model name, and the command that writes them."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.cli import main
from gateway.errors import ConfigError
from gateway.fleet import litellm, vllm_router
from gateway.fleet.nodes import Node, parse

TOML = """
[[models]]
id = "alpha"
kind = "plain"
repo = "org/alpha"
aliases = ["a"]

[[models]]
id = "org/gamma"
kind = "plain"
repo = "org/gamma"
"""
ONE = Node("http://gw1:8080", "gw1", {"alpha": "alpha", "a": "alpha", "org/gamma": "org/gamma"})
TWO = Node("http://gw2:8080", "gw2:8080", {"alpha": "alpha"})


def test_a_node_from_its_models_file_or_from_what_it_says_it_serves(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text(TOML)
    node = parse(f"http://gw1:8080/={tmp_path / 'models.toml'}", model_dir=tmp_path)
    assert node == Node("http://gw1:8080", "gw1:8080", {"alpha": "alpha", "a": "alpha", "org/gamma": "org/gamma"})
    assert node.ids == ["alpha", "org/gamma"]

    def server_info(request: httpx.Request) -> httpx.Response:
        assert request.url == "http://gw1:8080/server_info"
        return httpx.Response(200, json={"node": "gw1", "models": ["alpha", "org/gamma"], "aliases": {"a": "alpha"}})

    client = httpx.Client(transport=httpx.MockTransport(server_info))
    assert parse("http://gw1:8080", model_dir=tmp_path, client=client) == ONE

    down = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(502)))
    with pytest.raises(ConfigError, match=r"URL=models\.toml"):
        parse("http://gw1:8080", model_dir=tmp_path, client=down)
    with pytest.raises(ConfigError, match="base URL"):
        parse("gw1:8080", model_dir=tmp_path)


def test_vllm_router_registers_each_node_once_per_model_under_its_prefix() -> None:
    assert vllm_router.workers([ONE, TWO]) == [
        {"url": "http://gw1:8080/m/alpha", "model_id": "alpha"},
        {"url": "http://gw1:8080/m/a", "model_id": "a"},
        {"url": "http://gw1:8080/m/org/gamma", "model_id": "org/gamma"},
        {"url": "http://gw2:8080/m/alpha", "model_id": "alpha"},
    ]
    script = vllm_router.script([ONE, TWO], router="http://router:31000")
    assert "--enable-igw" in script and "--policy round_robin" in script and "--port 31000" in script
    posts = [line for line in script.splitlines() if line.startswith("curl ")]
    assert [json.loads(shlex.split(line)[-1]) for line in posts] == vllm_router.workers([ONE, TWO])
    assert "ROUTER=${ROUTER:-http://router:31000}" in script
    assert "#   GATEWAY_PEERS=http://gw1:8080,http://gw2:8080\n" in script  # what every node gets
    assert "--api-key $NODE_API_KEY" in vllm_router.script([ONE], api_key=True)


def test_vllm_router_registration_reports_what_the_router_refused() -> None:
    seen: list[dict[str, str]] = []

    def router(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(400 if body["model_id"] == "a" else 200, json={"error": "no"})

    client = httpx.Client(transport=httpx.MockTransport(router))
    failed = vllm_router.register([ONE], "http://router:30000/", client=client)
    assert seen == vllm_router.workers([ONE]) and failed == ['http://gw1:8080/m/a (a): 400 {"error":"no"}']


def test_litellm_gets_one_deployment_per_node_and_model_name() -> None:
    config = yaml.safe_load(litellm.config([ONE, TWO]))
    deployments = [
        (d["model_name"], d["litellm_params"]["api_base"], d["model_info"]["id"]) for d in config["model_list"]
    ]
    assert deployments == [
        ("alpha", "http://gw1:8080/v1", "gw1/alpha"),
        ("a", "http://gw1:8080/v1", "gw1/a"),
        ("org/gamma", "http://gw1:8080/v1", "gw1/org/gamma"),
        ("alpha", "http://gw2:8080/v1", "gw2:8080/alpha"),
    ]
    assert {d["litellm_params"]["model"] for d in config["model_list"]} == {
        "openai/alpha",
        "openai/a",
        "openai/org/gamma",
    }
    assert config["router_settings"]["routing_strategy"] == "simple-shuffle"
    assert "#   GATEWAY_PEERS=http://gw1:8080,http://gw2:8080\n" in litellm.config([ONE, TWO])
    assert config["general_settings"] == {"background_health_checks": False}
    keys = {d["litellm_params"]["api_key"] for d in yaml.safe_load(litellm.config([ONE], api_key=True))["model_list"]}
    assert keys == {"os.environ/NODE_API_KEY"}


def test_the_command_writes_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "models.toml").write_text(TOML)
    spec = f"http://gw1:8080={tmp_path / 'models.toml'}"
    assert main(["routers", "litellm", "--node", spec]) == 0
    assert len(yaml.safe_load(capsys.readouterr().out)["model_list"]) == 3
    assert (
        main(["routers", "vllm-router", "--node", spec, "--node", f"http://gw2:8080={tmp_path / 'models.toml'}"]) == 0
    )
    assert capsys.readouterr().out.count("curl ") == 6
    assert main(["routers", "litellm", "--node", "nowhere"]) == 2
    assert "--node 'nowhere'" in capsys.readouterr().err
