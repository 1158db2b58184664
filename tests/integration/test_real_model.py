"""A real model through the gateway: SmolLM2-135M-Instruct on the bundled engine (tests/realmodel.py).

Its greedy answers through the gateway equal the engine's own (the `mistralrs` package called directly, with no
gateway in between), and real clients work against it: a LangChain agent loop with one tool. The contract suite
(test_contract.py) runs every other case on this model too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.helpers import Gateway, start_gateway

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours."]
TOKENS = 12

# The engine's own answers: the same model loaded by the `mistralrs` package in a process of its own, the same
# requests in the same order (the engine's prefix cache then holds the same prefixes as the gateway's engine).
DIRECT = """
import json, sys
from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which
folder, name, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
runner = Runner(which=Which.GGUF(quantized_model_id=folder, quantized_filename=name))
out = {"chat": [], "completion": None}
for prompt in json.loads(sys.stdin.read()):
    reply = runner.send_chat_completion_request(ChatCompletionRequest(
        model="smollm2", messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0))
    out["chat"].append(reply.choices[0].message.content)
reply = runner.send_completion_request(CompletionRequest(
    model="smollm2", prompt="The capital of France is", max_tokens=tokens, temperature=0))
out["completion"] = reply.choices[0].text
print(json.dumps(out))
"""


@pytest.fixture
def gateway(tmp_path: Path, smollm2: Path) -> Iterator[Gateway]:
    toml = f'[[models]]\nid = "smollm2"\nkind = "gguf"\npath = "{smollm2}"\n'
    gw = start_gateway(
        tmp_path, toml, env={"GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": "", "RUST_LOG": "error"}
    )
    yield gw
    gw.stop()


def test_greedy_answers_through_the_gateway_equal_the_engines_own(gateway: Gateway, smollm2: Path) -> None:
    import openai

    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=300)
    through = [
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompt}], max_tokens=TOKENS, temperature=0
        )
        .choices[0]
        .message.content
        for prompt in PROMPTS
    ]
    completion = (
        client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=TOKENS, temperature=0)
        .choices[0]
        .text
    )
    direct = subprocess.run(
        [sys.executable, "-c", DIRECT, str(smollm2.parent), smollm2.name, str(TOKENS)],
        input=json.dumps(PROMPTS),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env={**os.environ, "RUST_LOG": "error"},
    )
    own = json.loads(direct.stdout.strip().splitlines()[-1])
    print(f"\nthrough the gateway: {[*through, completion]}\nthe engine's own: {own}")
    assert through == own["chat"]
    assert completion == own["completion"]
    assert all(through) and "Paris" in completion  # a real model, not noise


def test_a_langchain_agent_loop_with_one_tool(gateway: Gateway) -> None:
    from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    calls: list[str] = []

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    llm = ChatOpenAI(
        base_url=gateway.v1, api_key="unused", model="smollm2", temperature=0, max_tokens=40, max_retries=0
    )
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Paris? Use the tool.")]
    # SmolLM2's chat template does not show it tools, so the first turn names the tool; then the model decides.
    model: Any = llm.bind_tools([get_weather], tool_choice="get_weather")
    for _ in range(3):
        reply = model.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
        model = llm.bind_tools([get_weather])
    assert calls and calls[0] in ("Paris", "Rome")
    final = messages[-1]
    assert not getattr(final, "tool_calls", None) and isinstance(final.content, str) and final.content
    print(f"\nagent: {len(calls)} call(s) {calls}; answer: {final.content!r}")
