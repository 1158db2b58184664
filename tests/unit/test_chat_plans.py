"""gateway/openai/checks.py and requests.py: what is refused, and what the engine gets for what is not."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.chat import checks
from gateway.chat.plans import JSON_OBJECT_SCHEMA, plan_chat, plan_completion
from gateway.errors import InvalidRequest

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
        (
            {
                "messages": [
                    {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (chat(n=0), "n"),
        (chat(temperature=3), "temperature"),
        (chat(top_p="1"), "top_p"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(logit_bias={"x": 1}), "logit_bias"),
        (chat(top_logprobs=2), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(seed=1), "seed"),
        (chat(seed=1, temperature=0.7), "seed"),
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(tool_choice="auto"), "tool_choice"),
        (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}}), "tool_choice"),
        (chat(tools=[TOOL], tool_choice={"type": "allowed_tools", "tools": []}), "tool_choice"),
        (chat(tools=[{"type": "web_search"}]), "tools[0].type"),
        (chat(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
        (chat(response_format={"type": "xml"}), "response_format.type"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
            "response_format.json_schema.name",
        ),
        (chat(functions=[{"name": "f"}]), "functions"),
        (chat(modalities=["text", "audio"]), "modalities"),
    ],
)
def test_chat_requests_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        checks.chat(body)
    assert info.value.param == param and info.value.status == 400
    assert "alloc::" not in info.value.message and info.value.message


@pytest.mark.parametrize(
    "body",
    [
        chat(seed=7, temperature=0),
        chat(stream=True, stream_options={"include_usage": True}),
        chat(logprobs=True, top_logprobs=0),
        chat(tools=[TOOL], tool_choice="required"),
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        chat(response_format={"type": "json_object"}),
        {
            "messages": [
                *USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ]
        },
    ],
)
def test_chat_requests_that_pass(body: dict[str, Any]) -> None:
    checks.chat(body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": 5}, "prompt"),
    ],
)
def test_completion_requests_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        checks.completion(body)
    assert info.value.param == param


def test_n_fans_out_and_the_engine_never_sees_what_it_cannot_do() -> None:
    body = chat(
        n=3,
        seed=1,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "json_object"},
        parallel_tool_calls=False,
        user="u",
        top_k=5,
    )
    plan = plan_chat(body, "m", takes_images=False)
    assert len(plan.bodies) == 3
    for engine in plan.bodies:
        assert not {"n", "seed", "stream_options", "parallel_tool_calls", "user", "model"} & set(engine)
        assert engine["response_format"] == JSON_OBJECT_SCHEMA and engine["top_k"] == 5 and engine["stream"]
    assert plan.shape.include_usage and plan.shape.single_tool_call and plan.shape.logprobs is None


def test_developer_messages_reach_the_engine_as_system_and_images_need_a_vision_model() -> None:
    plan = plan_chat({"messages": [{"role": "developer", "content": "be brief"}, *USER]}, "m", takes_images=False)
    assert [m["role"] for m in plan.bodies[0]["messages"]] == ["system", "user"]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]}
    with pytest.raises(InvalidRequest) as info:
        plan_chat(image, "m", takes_images=False)
    assert info.value.param == "messages[0].content[0]"
    assert plan_chat(image, "m", takes_images=True).bodies[0]["messages"] == image["messages"]


def test_completions_fan_out_per_prompt_and_choice() -> None:
    plan = plan_completion({"prompt": ["a", "bb"], "n": 2, "echo": True, "logprobs": 1}, "m")
    assert [b["prompt"] for b in plan.bodies] == ["a", "a", "bb", "bb"]
    assert plan.prompts == 2 and [s.text_offset for s in plan.shapes()] == [1, 1, 2, 2]
    assert plan.shape.logprobs == 1


# What vllm-router 0.1.17 writes into every body it forwards (read off its wire): the values every engine follows.
ROUTER_CHAT = {
    "logprobs": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "continue_final_message": False,
    "skip_special_tokens": True,
    "separate_reasoning": True,
    "stream_reasoning": True,
    "return_hidden_states": False,
    "include_reasoning": True,
}
ROUTER_COMPLETION = {
    "echo": False,
    "no_stop_trim": False,
    "ignore_eos": False,
    "skip_special_tokens": True,
    "return_hidden_states": False,
}


def test_what_a_router_adds_is_accepted_and_never_reaches_the_engine() -> None:
    body = chat(max_tokens=3, **ROUTER_CHAT)
    checks.chat(body)
    (engine,) = plan_chat(body, "m", takes_images=False).bodies
    assert not set(checks.ROUTER_FIELDS) & set(engine)
    assert engine["logprobs"] is False  # an OpenAI field: the engine's own

    completion = {"prompt": "x", **ROUTER_COMPLETION}
    checks.completion(completion)
    (engine,) = plan_completion(completion, "m").bodies
    assert not set(checks.ROUTER_FIELDS) & set(engine)


@pytest.mark.parametrize("name", sorted(checks.ROUTER_FIELDS))
def test_a_router_field_asking_what_no_engine_does_is_refused_with_the_reason(name: str) -> None:
    accepted, why = checks.ROUTER_FIELDS[name]
    with pytest.raises(InvalidRequest) as info:
        checks.chat(chat(**{name: not accepted}))
    assert info.value.param == name and info.value.code == "unsupported_parameter"
    assert why in info.value.message
    with pytest.raises(InvalidRequest) as info:
        checks.completion({"prompt": "x", name: "yes"})
    assert info.value.param == name and info.value.code == "invalid_type"
