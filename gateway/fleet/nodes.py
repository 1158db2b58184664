"""The nodes of a fleet and the model names each one answers to, as a router must know them.

A node is named on the command line as ``URL`` (it is asked: ``GET URL/server_info``, open like the health probes)
or ``URL=MODELS_FILE`` (its models file is read: the node need not run yet). Either way a node's names are its model
ids and their aliases, since a client may send either and a router routes by the name it is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ..catalog import load_catalog
from ..errors import ConfigError


@dataclass(frozen=True)
class Node:
    """One gateway: its base URL, its name (GATEWAY_NODE_NAME, or its host and port), and the model each name it
    answers to stands for."""

    url: str
    name: str
    models: dict[str, str]  # every name (ids and aliases) -> the model id

    @property
    def ids(self) -> list[str]:
        return list(dict.fromkeys(self.models.values()))


def parse(spec: str, *, model_dir: Path, client: httpx.Client | None = None) -> Node:
    """The node ``URL`` or ``URL=MODELS_FILE`` describes."""
    url, _, models_file = spec.partition("=")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--node {spec!r}: give the node's base URL, such as http://10.0.0.5:8080[=models.toml]")
    default_name = parts.netloc
    if models_file:
        catalog = load_catalog(Path(models_file).expanduser(), model_dir=model_dir)
        names = {name: model.id for model in catalog.models for name in (model.id, *model.entry.aliases)}
        return Node(url, default_name, names)
    if client is not None:
        return _ask(url, default_name, client)
    with httpx.Client(timeout=10) as own:
        return _ask(url, default_name, own)


def _ask(url: str, default_name: str, client: httpx.Client) -> Node:
    try:
        response = client.get(url + "/server_info")
        response.raise_for_status()
        info = response.json()
        ids = [str(model) for model in info["models"]]
        aliases = {str(alias): str(model) for alias, model in (info.get("aliases") or {}).items()}
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"--node {url}: cannot read what it serves from {url}/server_info ({exc}). Is it a mistral-gateway that "
            "runs? Or name its models file: --node URL=models.toml"
        ) from exc
    return Node(url, str(info.get("node") or default_name), {**{model: model for model in ids}, **aliases})


def peers_line(nodes: Sequence[Node]) -> str:
    """The setting every node gets so that a cold one sends a request to a warm one (gateway/fleet/peers.py), as a
    comment of a router's configuration."""
    return "# On every node, so that a node whose engine is stopped sends a request to one that has it warm:\n" + (
        "#   GATEWAY_PEERS=" + ",".join(node.url for node in nodes)
    )
