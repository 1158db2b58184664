"""LiteLLM proxy in front of gateways: one deployment per node and model name in its ``model_list``.

LiteLLM routes by ``model_name`` among the deployments that carry it, so a node gets a deployment for each name it
answers to (ids and aliases) and nothing else: a model only some nodes serve is only sent to them. Each deployment
speaks to the node's OpenAI API (``openai/<name>``, ``api_base`` = the node's ``/v1``), and is keyed by node and
name (``model_info.id``), which is what LiteLLM counts failures and cooldowns by.

The routing strategy is ``simple-shuffle`` (LiteLLM's default, random): its ``least-busy`` counts requests it has
sent and not seen finish, and sent a dozen concurrent streams to one node in a 3-node trial. A failure (a refused
connection, a 5xx, a 429) is retried (``num_retries``) and cools the failing deployment down for a few seconds at
once (``allowed_fails: 0``), which is how a node that stopped is left out: LiteLLM's retry picks among the
deployments not cooling down, and with a failure allowed before the cooldown a retry could pick the dead node again
(one request of 300 failed so, in a 3-node run). A 404 is not retried. LiteLLM's background health
checks make a real completion per deployment, so they are left off: a gateway's cold engine would be started by
them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .nodes import Node, peers_line


def config(nodes: Sequence[Node], *, api_key: bool = False) -> str:
    """The proxy's config.yaml. ``api_key``: the nodes want one, taken from $NODE_API_KEY; otherwise a
    placeholder, since LiteLLM's OpenAI client insists on some key."""
    key = "os.environ/NODE_API_KEY" if api_key else "unused"
    lines = [
        "# LiteLLM proxy in front of mistral-gateway nodes (docs/scale-out.md); written by `mistral-gateway routers "
        "litellm`.",
        "# Run: litellm --config config.yaml --port 4000",
        peers_line(nodes),
        "model_list:",
    ]
    for node in nodes:
        for name in node.models:
            lines += [
                f"  - model_name: {_quoted(name)}",
                "    litellm_params:",
                f"      model: {_quoted('openai/' + name)}",
                f"      api_base: {_quoted(node.url + '/v1')}",
                f"      api_key: {_quoted(key)}",
                "    model_info:",
                f"      id: {_quoted(node.name + '/' + name)}",
            ]
    lines += [
        "router_settings:",
        "  routing_strategy: simple-shuffle",
        "  num_retries: 3",
        "  retry_after: 0",
        "  allowed_fails: 0",
        "  cooldown_time: 5",
        "general_settings:",
        "  background_health_checks: false",
    ]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """A YAML scalar: JSON's double-quoted strings are YAML's too."""
    return json.dumps(text)
