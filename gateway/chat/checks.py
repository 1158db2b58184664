"""Checks on OpenAI chat, completions and responses requests, done before an engine is started.

Each check raises :class:`InvalidRequest` naming the field the way OpenAI's API does (``messages[1].content``),
so that a bad request never costs a cold start, never reaches an engine (whose refusals name Rust types), and
never has a field silently ignored: what no engine behind the gateway can do is refused here with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .fields import boolean, integer, invalid, is_int, is_number, number, require, string, unsupported, wrong_type

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
# mistral.rs fetches an image URL, or reads an image path, itself: a client could make it fetch from the gateway's
# network or read the gateway's files. Only images sent inline reach an engine.
INLINE_IMAGES_ONLY = (
    "images are taken inline, as data URLs (data:image/png;base64,...): the gateway fetches no URL and reads no "
    "file a client names, and lets no engine do it."
)

# Fields that sglang's and vLLM's routers write into every chat and completions body they forward, whatever the client
# sent (vllm-router 0.1.17 adds them all, at these values). Each is accepted at the value that asks for what every
# engine behind the gateway does anyway, and never reaches the engine (gateway/chat/plans.py); another value asks
# for something no engine here does, and is refused with the reason, as any other field would be.
ROUTER_FIELDS: dict[str, tuple[bool, str]] = {
    "no_stop_trim": (False, "the engine always leaves the stop sequence out of the answer."),
    "ignore_eos": (False, "the engine always ends the answer at the model's end-of-sequence token."),
    "continue_final_message": (False, "the engine always answers with a new assistant message."),
    "skip_special_tokens": (True, "the engine never writes special tokens into the text."),
    "return_hidden_states": (False, "the engine does not return hidden states."),
    "separate_reasoning": (True, "the model's reasoning comes as the engine separates it (reasoning_content)."),
    "stream_reasoning": (True, "a stream carries the model's reasoning as the engine sends it."),
    "include_reasoning": (True, "the model's reasoning comes as the engine separates it (reasoning_content)."),
}


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise wrong_type(param, "an object")
    return value


# ------------------------------------------------------------------------------------------ shared fields


def sampling(body: dict[str, Any]) -> None:
    """The sampling fields chat and completions share."""
    boolean(body, "stream")
    integer(body, "n", 1, 128)
    integer(body, "max_tokens", 1, 1 << 24)
    integer(body, "max_completion_tokens", 1, 1 << 24)
    number(body, "temperature", 0, 2)
    number(body, "top_p", 0, 1)
    number(body, "presence_penalty", -2, 2)
    number(body, "frequency_penalty", -2, 2)
    number(body, "repetition_penalty", 0, 100)
    number(body, "min_p", 0, 1)
    integer(body, "top_k", 0, 1 << 20)
    _stop(body)
    _logit_bias(body)
    _seed(body)
    _stream_options(body)


def _stop(body: dict[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise wrong_type("stop", "a string or an array of strings")
    if len(stop) > 4:
        raise invalid("stop", f"Invalid 'stop': at most 4 sequences, got {len(stop)}.")


def _logit_bias(body: dict[str, Any]) -> None:
    bias = body.get("logit_bias")
    if bias is None:
        return
    for token, value in _object(bias, "logit_bias").items():
        if not token.isdigit() or int(token) >= 1 << 32:
            raise invalid("logit_bias", f"Invalid 'logit_bias': the key {token!r} is not a token id.")
        if not is_number(value) or not -100 <= value <= 100:
            raise invalid("logit_bias", f"Invalid 'logit_bias[{token}]': use a number from -100 to 100.")


def _seed(body: dict[str, Any]) -> None:
    """mistral.rs cannot seed its sampler per request; greedy decoding needs no seed to repeat itself."""
    seed = body.get("seed")
    if seed is None:
        return
    if not is_int(seed):
        raise wrong_type("seed", "an integer")
    if body.get("temperature") != 0 and body.get("top_k") != 1:
        raise unsupported(
            "seed",
            "the mistral.rs engine cannot seed its sampler per request, so a seed would not make sampled answers "
            "repeat. Send temperature 0 (greedy decoding, which always repeats itself), or leave out seed.",
        )


def _stream_options(body: dict[str, Any]) -> None:
    options = body.get("stream_options")
    if options is None:
        return
    _object(options, "stream_options")
    if body.get("stream") is not True:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    if "include_usage" in options and not isinstance(options["include_usage"], bool):
        raise wrong_type("stream_options.include_usage", "a boolean")


def router_fields(body: dict[str, Any]) -> None:
    """The fields a router adds (:data:`ROUTER_FIELDS`): booleans, at the value every engine here follows."""
    for name, (value, why) in ROUTER_FIELDS.items():
        given = boolean(body, name)
        if given is not None and given is not value:
            raise unsupported(name, f"{why} Send {str(value).lower()}, or leave it out.")


def _refuse(body: dict[str, Any], fields: dict[str, str]) -> None:
    for name, why in fields.items():
        if body.get(name) is not None:
            raise unsupported(name, why)


# ------------------------------------------------------------------------------------------------- chat


def _text_parts(parts: list[Any], param: str, *, only_text: bool) -> None:
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(where, f"Invalid '{where}': each content part needs a 'type'.")
        kind = part["type"]
        if kind not in _PART_TYPES:
            raise invalid(f"{where}.type", f"Invalid '{where}.type': unknown content part type {kind!r}.")
        if kind in ("text", "refusal") and not isinstance(part.get(kind), str):
            raise wrong_type(f"{where}.{kind}", "a string")
        if only_text and kind != "text":
            raise invalid(where, f"Invalid '{where}': this message takes only text parts.")
        if kind == "image_url":
            image = part.get("image_url")
            if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                raise wrong_type(f"{where}.image_url.url", "a string")
            if not image["url"].startswith("data:"):
                raise unsupported(f"{where}.image_url.url", INLINE_IMAGES_ONLY)
        if kind in ("input_audio", "file"):
            raise unsupported(where, f"the mistral.rs engine takes no {kind.replace('_', ' ')} parts in chat messages.")


def _tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise wrong_type(param, "an array")
    for k, call in enumerate(calls):
        where = f"{param}[{k}]"
        if not isinstance(call, dict):
            raise wrong_type(where, "an object")
        if call.get("type", "function") != "function":
            raise invalid(f"{where}.type", f"Invalid '{where}.type': only 'function' tool calls exist.")
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise wrong_type(f"{where}.function.name", "a string")
        if not isinstance(function.get("arguments", ""), str):
            raise wrong_type(f"{where}.function.arguments", "a string (JSON text)")


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    value = require(body, "messages")
    if not isinstance(value, list) or not value:
        raise invalid("messages", "'messages' must be a non-empty array.")
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise wrong_type(where, "an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise invalid(f"{where}.role", f"Missing required parameter: '{where}.role'.", "missing_required_parameter")
        if role not in _ROLES:
            roles = ", ".join(sorted(_ROLES))
            raise invalid(f"{where}.role", f"Invalid '{where}.role': {role!r} is not one of {roles}.")
        content = message.get("content")
        if content is None:
            if role != "assistant" or not message.get("tool_calls"):
                raise invalid(
                    f"{where}.content", f"Missing required parameter: '{where}.content'.", "missing_required_parameter"
                )
        elif isinstance(content, list):
            _text_parts(content, f"{where}.content", only_text=role in ("system", "developer", "tool", "assistant"))
        elif not isinstance(content, str):
            raise wrong_type(f"{where}.content", "a string or an array of content parts")
        if role == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise invalid(
                f"{where}.tool_call_id",
                f"Missing required parameter: '{where}.tool_call_id'.",
                "missing_required_parameter",
            )
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise invalid(f"{where}.tool_calls", f"Invalid '{where}': only assistant messages carry tool_calls.")
            _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise wrong_type(f"{where}.name", "a string")
    return value


def tools(body: dict[str, Any]) -> list[str]:
    """The names of the function tools offered (checked), in order."""
    value = body.get("tools")
    if value is None:
        return []
    if not isinstance(value, list):
        raise wrong_type("tools", "an array")
    names: list[str] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise wrong_type(where, "an object")
        if tool.get("type") != "function":
            kind = tool.get("type")
            raise unsupported(f"{where}.type", f"only function tools can be offered to the engine, not {kind!r}.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(
                f"{where}.function", f"Missing required parameter: '{where}.function'.", "missing_required_parameter"
            )
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid(
                f"{where}.function.name",
                f"Invalid '{where}.function.name': use 1 to 64 letters, digits, underscores or dashes.",
            )
        if function.get("parameters") is not None:
            _object(function["parameters"], f"{where}.function.parameters")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise wrong_type(f"{where}.function.description", "a string")
        names.append(name)
    return names


def tool_choice(body: dict[str, Any], names: list[str]) -> None:
    choice = body.get("tool_choice")
    if choice is None:
        return
    if not names:
        raise invalid("tool_choice", "'tool_choice' is only allowed when 'tools' are given.")
    if choice in ("none", "auto", "required"):
        return
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise wrong_type("tool_choice.function.name", "a string")
        if name not in names:
            raise invalid("tool_choice", f"Invalid 'tool_choice': no tool named {name!r} is in 'tools'.")
        return
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        raise unsupported("tool_choice", "the 'allowed_tools' form is not offered; pass only the tools allowed.")
    raise invalid(
        "tool_choice",
        "Invalid 'tool_choice': use 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.",
    )


def response_format(body: dict[str, Any], param: str = "response_format") -> None:
    value = body.get("response_format")
    if value is None:
        return
    _object(value, param)
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return
    if kind != "json_schema":
        raise invalid(f"{param}.type", f"Invalid '{param}.type': use 'text', 'json_object' or 'json_schema'.")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(
            f"{param}.json_schema", f"Missing required parameter: '{param}.json_schema'.", "missing_required_parameter"
        )
    if not isinstance(spec.get("name"), str) or not _NAME.match(spec["name"]):
        raise invalid(
            f"{param}.json_schema.name",
            f"Invalid '{param}.json_schema.name': use 1 to 64 letters, digits, underscores or dashes.",
        )
    if spec.get("schema") is not None:
        _object(spec["schema"], f"{param}.json_schema.schema")


def logprobs(body: dict[str, Any]) -> None:
    wanted = boolean(body, "logprobs")
    top = integer(body, "top_logprobs", 0, 20)
    if top is not None and not wanted:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true.")


def chat(body: dict[str, Any]) -> None:
    messages(body)
    sampling(body)
    router_fields(body)
    logprobs(body)
    tool_choice(body, tools(body))
    boolean(body, "parallel_tool_calls")
    response_format(body)
    _refuse(
        body,
        {
            "functions": "use 'tools' (the function-calling fields OpenAI deprecated are not translated).",
            "function_call": "use 'tool_choice' (the function-calling fields OpenAI deprecated are not translated).",
            "audio": "the engine does not produce audio in chat; use /v1/audio/speech with a speech model.",
            "prediction": "the engine has no predicted outputs.",
        },
    )
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", "the engine answers chat with text only.")


# ------------------------------------------------------------------------------------------- completions


def completion(body: dict[str, Any]) -> None:
    prompt = require(body, "prompt")
    if isinstance(prompt, list):
        if not prompt:
            raise invalid("prompt", "'prompt' must not be an empty array.")
        if not all(isinstance(p, str) for p in prompt):
            raise unsupported(
                "prompt", "the engine takes prompts as text (a string or an array of strings), not as token ids."
            )
    elif not isinstance(prompt, str):
        raise wrong_type("prompt", "a string or an array of strings")
    sampling(body)
    router_fields(body)
    integer(body, "logprobs", 0, 5)
    boolean(body, "echo")
    string(body, "suffix")
    best_of = integer(body, "best_of", 1, 20)
    if best_of is not None and best_of > 1:
        raise unsupported(
            "best_of",
            "the engine cannot rank several candidate completions; use 'n' to get several and choose yourself.",
        )


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"chat": chat, "completion": completion}
