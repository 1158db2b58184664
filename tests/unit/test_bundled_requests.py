"""gateway/engine/bundled/requests.py: OpenAI requests into what the `mistralrs` package takes, its refusals into
the engine's (docs/engine-contract.md).

The package's objects are stood in for by plain namespaces with the same attributes (measured on mistralrs
0.9.5); the end-to-end proof against the real engine is in tests/integration/test_real_engine.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.engine.bundled.requests import (
    GenerationError,
    RequestError,
    ToolOptions,
    argument_error,
    completion_prompt,
    engine_error,
    engine_messages,
    forced_tool_schema,
    logit_bias,
    output_grammar,
    rebase_refs,
    stop_sequences,
    tool_calls_as_text,
    tool_options,
)

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}
TIME: dict[str, Any] = {"type": "function", "function": {"name": "get_time"}}
CALL: dict[str, Any] = {
    "id": "call-1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def refused(fn: Any, *args: Any, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        fn(*args, **kwargs)
    return caught.value


# ------------------------------------------------------------------------------------------- messages


def test_a_tool_loop_second_turn_becomes_what_the_package_takes() -> None:
    # What every OpenAI SDK sends back: content null, tool_calls with an index, and the SDK's null fields.
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [{**CALL, "index": 0}],
        },
        {
            "role": "tool",
            "tool_call_id": "call-1",
            "content": [{"type": "text", "text": "Sunny,"}, {"type": "text", "text": "24 C"}],
        },
    ]
    assert engine_messages(messages, media=False) == [
        {"role": "user", "content": "Weather in Paris?"},
        # The package hands the template only role and content: the call is written where the model sees it.
        {"role": "assistant", "content": '{"name":"get_weather","arguments":{"city":"Paris"}}'},
        {"role": "tool", "content": "Sunny, 24 C", "tool_call_id": "call-1"},
    ]


def test_missing_or_null_content_becomes_empty_text_and_text_before_calls_is_kept() -> None:
    assert engine_messages([{"role": "user"}], media=False) == [{"role": "user", "content": ""}]
    two = {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, {"function": {"name": "get_time"}}]}
    assert engine_messages([two], media=False) == [
        {
            "role": "assistant",
            "content": (
                'Let me check.\n{"name":"get_weather","arguments":{"city":"Paris"}}\n{"name":"get_time","arguments":{}}'
            ),
        }
    ]


def test_tool_call_arguments_that_are_not_json_stay_a_string() -> None:
    text = tool_calls_as_text([{"function": {"name": "f", "arguments": "not json"}}], "m")
    assert json.loads(text) == {"name": "f", "arguments": "not json"}


def test_text_parts_are_joined_for_every_role_and_a_plain_string_passes() -> None:
    system = {"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief"}]}
    assert engine_messages([system], media=False) == [{"role": "system", "content": "Be brief"}]
    assert engine_messages("hello", media=False) == "hello"
    named = engine_messages([{"role": "user", "content": "x", "name": "bob"}], media=False)
    assert named == [{"role": "user", "content": "x", "name": "bob"}]


def test_media_parts_for_a_multimodal_model_end_with_their_text_part() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": None}}
    assert engine_messages([{"role": "user", "content": [image]}], media=True) == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": ""},
            ],
        }
    ]
    assert refused(engine_messages, [{"role": "assistant", "content": [image]}], media=True).param == (
        "messages[0].content[0]"
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ({"role": "user"}, "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": 1, "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages[0].tool_calls"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "messages[0].tool_calls[0].function.name"),
        ([{"role": "tool", "content": "x", "tool_call_id": 7}], "messages[0].tool_call_id"),
    ],
)
def test_what_the_package_would_refuse_or_panic_on_is_a_422_naming_the_field(messages: Any, param: str) -> None:
    error = refused(engine_messages, messages, media=False)
    assert error.param == param and "::" not in str(error)


# ------------------------------------------------------------------------------------- tools, grammars


def test_auto_none_and_no_tools() -> None:
    assert tool_options({}) == ToolOptions()
    assert tool_options({"tool_choice": "none"}) == ToolOptions()
    auto = tool_options({"tools": [WEATHER]})
    assert auto.schemas == [json.dumps(WEATHER)] and not auto.no_tools and auto.grammar is None
    assert tool_options({"tools": [WEATHER], "tool_choice": "none"}).no_tools
    assert tool_options({"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False}).grammar is None


def test_required_forces_one_call_of_any_tool_and_a_named_choice_that_tool() -> None:
    required = tool_options({"tools": [WEATHER, TIME], "tool_choice": "required"}).grammar
    assert required is not None and required["x-guidance"] == {"whitespace_flexible": False}
    names = [option["properties"]["name"]["const"] for option in required["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert required["anyOf"][1]["properties"]["arguments"] == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    choice = {"type": "function", "function": {"name": "get_weather"}}
    named = tool_options({"tools": [WEATHER, TIME], "tool_choice": choice}).grammar
    assert named == {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
    ],
)
def test_tool_choices_the_engine_cannot_honour_are_refused(body: dict[str, Any], param: str) -> None:
    assert refused(tool_options, body).param == param


def test_refs_inside_tool_parameters_still_resolve_once_nested() -> None:
    loc = {"type": "object", "properties": {"next": {"$ref": "#/$defs/Loc"}}}
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"loc": {"$ref": "#/$defs/Loc"}, "again": {"$ref": "#"}},
        "$defs": {"Loc": loc},
    }
    schema = forced_tool_schema([WEATHER, {"type": "function", "function": {"name": "f", "parameters": parameters}}])
    arguments = schema["anyOf"][1]["properties"]["arguments"]
    assert arguments["properties"]["loc"] == {"$ref": "#/anyOf/1/properties/arguments/$defs/Loc"}
    assert arguments["properties"]["again"] == {"$ref": "#/anyOf/1/properties/arguments"}
    assert arguments["$defs"]["Loc"]["properties"]["next"]["$ref"] == "#/anyOf/1/properties/arguments/$defs/Loc"
    assert rebase_refs({"$ref": "http://x/s.json"}, "#/a") == {"$ref": "http://x/s.json"}  # only local pointers
    assert parameters["properties"]["loc"] == {"$ref": "#/$defs/Loc"}  # the request is not changed


def test_output_grammar_from_response_format_grammar_or_forced_call() -> None:
    none = ToolOptions()
    assert output_grammar({}, none) is None
    assert output_grammar({"response_format": {"type": "text"}}, none) is None
    assert output_grammar({"response_format": {"type": "json_object"}}, none) == (
        '{"type": "object"}',
        "json_schema",
        "response_format",
    )
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert output_grammar({"response_format": fmt}, none) == (json.dumps(schema), "json_schema", "response_format")
    assert output_grammar({"grammar": {"type": "regex", "value": "(yes|no)"}}, none) == ("(yes|no)", "regex", "grammar")
    assert output_grammar({"grammar": {"type": "json_schema", "value": schema}, "response_format": fmt}, none) == (
        json.dumps(schema),
        "json_schema",
        "grammar",
    )
    forced = tool_options({"tools": [WEATHER], "tool_choice": "required"})
    grammar = output_grammar({}, forced)
    assert (
        grammar is not None
        and json.loads(grammar[0]) == forced.grammar
        and grammar[1:] == ("json_schema", "tool_choice")
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "tool_choice"),
        ({"grammar": {"type": "regex", "value": "a"}}, "tool_choice"),
    ],
)
def test_a_forced_call_cannot_share_the_one_grammar(body: dict[str, Any], param: str) -> None:
    assert refused(output_grammar, body, tool_options({"tools": [WEATHER], "tool_choice": "required"})).param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": True}}}, "response_format"),
        ({"grammar": {"type": "peg", "value": "x"}}, "grammar"),
        ({"grammar": "(yes|no)"}, "grammar"),
    ],
)
def test_output_formats_the_engine_cannot_honour_are_refused(body: dict[str, Any], param: str) -> None:
    assert refused(output_grammar, body, ToolOptions()).param == param


def test_stop_logit_bias_and_prompt() -> None:
    assert stop_sequences(None) is None and stop_sequences("x") == ["x"] and stop_sequences(["a", "b"]) == ["a", "b"]
    assert refused(stop_sequences, [1]).param == "stop"
    assert logit_bias({"12": 1}) == {12: 1.0} and logit_bias(None) is None
    assert refused(logit_bias, {"abc": 1}).param == "logit_bias" and refused(logit_bias, [1]).param == "logit_bias"
    assert completion_prompt("once") == "once" and completion_prompt(["once"]) == "once"
    for prompt in (["a", "b"], [1, 2], None, 5):
        assert refused(completion_prompt, prompt).param == "prompt"


# ------------------------------------------------------------------------------------------ engine errors


def test_constructor_errors_name_the_request_field_never_a_rust_type() -> None:
    names = {
        "temperature": "temperature",
        "max_tokens": "max_completion_tokens",
        "reasoning_effort": "reasoning_effort",
    }
    error = argument_error(TypeError("argument 'temperature': must be real number, not str"), {}, names)
    assert (str(error), error.param) == ("`temperature` has a value of the wrong type or out of range", "temperature")
    error = argument_error(OverflowError("can't convert negative int to unsigned"), {"max_tokens": -1}, names)
    assert error.param == "max_completion_tokens"
    rust = TypeError("failed to convert the value to 'Union[alloc::string::String, alloc::vec::Vec<...>]'")
    assert "::" not in str(argument_error(rust, {}, names))
    words = ValueError("invalid reasoning effort `bogus`; expected one of: off, low")
    error = argument_error(words, {"reasoning_effort": "bogus"}, names)
    assert (str(error), error.param) == (str(words), "reasoning_effort")


def test_the_engines_validation_errors_are_422_and_its_failures_500() -> None:
    grammar = ValueError("Invalid grammar. at 1(8): invalid regex")
    refused = engine_error(grammar, prompt="messages", grammar_source="response_format")
    assert isinstance(refused, RequestError) and refused.param == "response_format"
    refused = engine_error(ValueError("max_tokens must be at least 1.\n   0: backtrace"), prompt="prompt")
    assert isinstance(refused, RequestError)
    assert (str(refused), refused.param) == ("max_tokens must be at least 1.", "max_tokens")
    refused = engine_error(ValueError("Prompt sequence length is greater than 8192"), prompt="messages")
    assert isinstance(refused, RequestError) and refused.param == "messages"
    failed = engine_error(ValueError("input tensor is not contiguous Layout { shape: [7, 1, 64] }"), prompt="prompt")
    assert isinstance(failed, GenerationError)
