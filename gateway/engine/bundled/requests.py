"""OpenAI request fields as the arguments of the `mistralrs` package, and its refusals as the engine's.

Facts this module is built on (measured with the 0.9.5 wheel):

- The package reads every key of a chat message as a string or a list of string maps: ``"content": null``, an
  ``"index"`` in a tool call or an SDK's ``"refusal": null`` are type errors naming Rust types; a message without
  ``role`` or ``content`` panics. It hands the chat template only ``role`` and ``content``.
- Its ``ToolChoice`` has only ``Auto`` and ``NoTools``; a JSON-schema grammar forcing one call makes the engine
  parse its own output as that call.
- It raises ValueError both for requests mistral.rs would refuse with 422 and for failures while generating: they
  are told apart by mistral.rs's own wording.

Everything here is pure: a request body in, package arguments (or :class:`RequestError`, naming the field) out.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

_BACKTRACE = re.compile(r"\n\s*(0:|Stack backtrace:)")


class RequestError(Exception):
    """The request is invalid for the engine (HTTP 422 ``{"message"}``, as mistral.rs answers).

    ``param`` names the field at fault, above all when the package cannot do what a field asks: the gateway
    then tells the client which field to change instead of the request silently getting something else.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class GenerationError(Exception):
    """The engine failed while generating (HTTP 500, or a plain-text error event in a stream)."""


def clean_message(exc: BaseException) -> str:
    """The engine's message without the Rust backtrace it appends."""
    return _BACKTRACE.split(str(exc), maxsplit=1)[0].strip() or type(exc).__name__


def argument_error(exc: BaseException, kwargs: dict[str, Any], fields: dict[str, str]) -> RequestError:
    """A request object's constructor refused an argument: name the request field, never the Rust type.

    pyo3 says ``argument 'temperature': must be real number, not str``, or names a Rust type
    (``failed to convert the value to 'Union[alloc::string::String, ...]'``), or nothing at all
    (``can't convert negative int to unsigned``); ``fields`` maps the package's argument names, the
    keys of ``kwargs``, back to the request's.
    """
    text = clean_message(exc)
    match = re.match(r"argument '(\w+)'", text)
    arg = match[1] if match else _blamed_argument(exc, text, kwargs)
    field = None if arg is None else fields.get(arg, arg)
    if isinstance(exc, ValueError) and "::" not in text:
        return RequestError(text, field)  # the engine's own words (an unknown reasoning effort)
    if field is None:
        return RequestError("the engine could not read a field of the request: a value of the wrong type")
    return RequestError(f"`{field}` has a value of the wrong type or out of range", field)


def _blamed_argument(exc: BaseException, text: str, kwargs: dict[str, Any]) -> str | None:
    if isinstance(exc, OverflowError):  # an unsigned Rust integer given a negative or a huge number
        for arg, value in kwargs.items():
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 1 << 64:
                return arg
    lowered = text.lower()
    named = [
        arg for arg in kwargs if arg not in ("model", "stream") and (arg in lowered or arg.replace("_", " ") in lowered)
    ]
    return max(named, key=len, default=None)


_VALIDATION_ERRORS = (  # what mistral.rs answers 422 to (add_request.rs), and the field at fault
    ("Invalid grammar", "grammar"),
    ("max_tokens must be", "max_tokens"),
    ("Number of choices", "n"),
    ("Stop token", "stop"),
    ("Prompt sequence length is greater", "prompt"),
    ("Received an empty prompt", "prompt"),
    ("Received messages for a model which does not have a chat template", None),
)


def engine_error(
    exc: BaseException, *, prompt: str, grammar_source: str | None = None
) -> RequestError | GenerationError:
    """An error the engine sent instead of an answer: the request's fault (422) or the engine's (500).

    The package raises ValueError for both: the request's validation errors are told apart by the words
    mistral.rs uses for them. ``prompt`` is the field the prompt came from (``messages`` or ``prompt``); a
    grammar error is the fault of the field the grammar came from.
    """
    text = clean_message(exc)
    for prefix, param in _VALIDATION_ERRORS:
        if text.startswith(prefix):
            fields = {"grammar": grammar_source or "grammar", "prompt": prompt}
            return RequestError(text, fields.get(param, param) if param else None)
    return GenerationError(text)


# ---------------------------------------------------------------------------------------------- messages

_MEDIA_PARTS = ("image_url", "audio_url", "video_url")


def engine_messages(messages: Any, *, media: bool) -> list[dict[str, Any]] | str:
    """OpenAI chat messages in the one shape the package takes without a type error or a panic.

    The package reads every key of a message as a string or a list of string maps (``"content": null``, an
    ``"index": 0`` in a tool call or an SDK's ``"refusal": null`` are type errors), indexes ``role`` and
    ``content`` without checking they exist (a panic), and hands the chat template ONLY ``role`` and
    ``content``. So each message is rebuilt from what the template can use, and an assistant turn's
    ``tool_calls``, which would otherwise vanish, are written into its text as the calls the engine parses
    (``{"name": ..., "arguments": ...}``, the form a forced call takes): the model sees what it called
    before it sees the results. ``media`` says whether the model takes image, audio and video parts.
    """
    if isinstance(messages, str):
        return messages  # the package's own shorthand: one user message
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty array", "messages")
    return [_engine_message(f"messages[{i}]", message, media) for i, message in enumerate(messages)]


def _engine_message(where: str, message: Any, media: bool) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object", where)
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise RequestError(f"{where} needs a `role` string", f"{where}.role")
    content = _content(where, role, message.get("content"), media)
    calls = message.get("tool_calls")
    if calls:
        if role != "assistant" or not isinstance(content, str):
            raise RequestError(f"{where}: only an assistant message may carry `tool_calls`", f"{where}.tool_calls")
        written = tool_calls_as_text(calls, f"{where}.tool_calls")
        content = f"{content}\n{written}" if content else written
    out: dict[str, Any] = {"role": role, "content": content}
    for key in ("name", "tool_call_id"):  # accepted by the package (and not rendered by the 0.9.5 wheel)
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RequestError(f"{where}.{key} must be a string", f"{where}.{key}")
        out[key] = value
    return out


def _content(where: str, role: str, content: Any, media: bool) -> str | list[dict[str, Any]]:
    """A message's content: a string, or for a user turn with media the parts list the package expects.

    Text parts are joined with a space, as mistral.rs joins them. The package itself refuses a list of
    several parts on any role but ``user`` and a one-part list that is not text, so a text-only list always
    becomes a string, and a list with media always ends with its (possibly empty) text part.
    """
    if content is None:
        return ""  # an assistant turn that only called tools; HF templates treat a missing content the same
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string, an array of content parts, or null", f"{where}.content")
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{at}.text must be a string", f"{at}.text")
            texts.append(text)
        elif kind in _MEDIA_PARTS and media:
            if role != "user":
                raise RequestError(f"{at}: only user messages may carry {kind} content", at)
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RequestError(f"{at}.{kind}.url must be a string", f"{at}.{kind}.url")
            parts.append({"type": kind, kind: {"url": url}})
        elif kind in _MEDIA_PARTS:
            raise RequestError(f"{at}: this model takes text only, not {kind} content", at)
        else:
            takes = "`text`, `image_url`, `audio_url` or `video_url`" if media else "`text`"
            raise RequestError(f"{at}: content parts of type {kind!r} are not supported; this model takes {takes}", at)
    text = " ".join(texts)
    return [*parts, {"type": "text", "text": text}] if parts else text


def tool_calls_as_text(calls: Any, where: str) -> str:
    """An assistant turn's tool calls as the text the engine parses as calls: one compact JSON object a line."""
    if not isinstance(calls, list):
        raise RequestError(f"{where} must be an array", where)
    lines = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str):
            raise RequestError(f"{where}[{k}] needs `function.name`", f"{where}[{k}].function.name")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):  # not JSON: the model sees the string it wrote
                arguments = json.loads(arguments)
        elif arguments is None:
            arguments = {}
        lines.append(json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- tools, grammars

_CHOICE_FORMS = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


@dataclass(frozen=True)
class ToolOptions:
    """What ``tools`` and ``tool_choice`` become for the package.

    The package's ``ToolChoice`` has only ``Auto`` and ``NoTools``. A required or named call is an ``Auto``
    request whose output a JSON-schema grammar forces into one call: the engine then parses its own output
    as that call (``tool_calls``, finish reason ``tool_calls``), streamed or not.
    """

    schemas: list[str] | None = None
    no_tools: bool = False
    grammar: dict[str, Any] | None = None


def tool_options(body: dict[str, Any]) -> ToolOptions:
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    forced: list[dict[str, Any]] = []
    if choice is None or choice in ("auto", "none"):
        pass
    elif choice == "required":
        forced = tools
        if not forced:
            raise RequestError('tool_choice "required" needs at least one tool in `tools`', "tool_choice")
    elif (name := _named_choice(choice)) is not None:
        forced = [tool for tool in tools if tool["function"]["name"] == name]
        if not forced:
            raise RequestError(f"tool_choice names the function {name!r}, which is not in `tools`", "tool_choice")
    else:
        raise RequestError(f"tool_choice must be {_CHOICE_FORMS}", "tool_choice")
    if not tools:
        return ToolOptions()
    return ToolOptions(
        schemas=[json.dumps(tool) for tool in tools],
        no_tools=choice == "none",
        grammar=forced_tool_schema(forced) if forced else None,
    )


def _named_choice(choice: Any) -> str | None:
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _tools(tools: Any) -> list[dict[str, Any]]:
    """Check what the package would refuse in words that do not say which tool (``missing field `name```)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError("`tools` must be an array", "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}', f"tools[{i}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise RequestError(
                f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function.parameters"
            )
    return tools


def forced_tool_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A JSON schema whose every match is one call of one of ``tools``: ``{"name": ..., "arguments": {...}}``.

    Compact (llguidance's ``whitespace_flexible`` off): with the default, small models pad the JSON with
    whitespace until they run out of tokens.
    """
    if len(tools) == 1:
        schema = _call_schema(tools[0]["function"], "#")
    else:
        schema = {"anyOf": [_call_schema(tool["function"], f"#/anyOf/{i}") for i, tool in enumerate(tools)]}
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def _call_schema(function: dict[str, Any], at: str) -> dict[str, Any]:
    # No parameters (or {}) is OpenAI's function without arguments: an empty object.
    parameters = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": rebase_refs(parameters, f"{at}/properties/arguments"),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def rebase_refs(schema: Any, base: str) -> Any:
    """``schema`` with its local ``$ref`` pointers (``#/$defs/X``, ``#``) made to point under ``base``.

    A tool's parameters are nested inside the call schema, so ``#`` is no longer their root: without this,
    a pydantic model's ``$defs`` make the grammar invalid ("Reference segment '$defs' not found").
    """
    if isinstance(schema, dict):
        return {
            key: base + value[1:]
            if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else rebase_refs(value, base)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [rebase_refs(value, base) for value in schema]
    return schema


_GRAMMAR_TYPES = ("regex", "lark", "json_schema", "llguidance")


def output_grammar(body: dict[str, Any], tools: ToolOptions) -> tuple[str, str, str] | None:
    """The grammar the output must match, its type, and the field it comes from; None when unconstrained.

    ``grammar`` (mistral.rs's own extension) wins over ``response_format``, as the engine orders them. A
    forced tool call needs the one grammar for itself, so it cannot be combined with either.
    """
    fmt = _response_format_schema(body.get("response_format"))
    extension = _grammar_extension(body.get("grammar"))
    if tools.grammar is not None:
        if fmt is not None or extension is not None:
            raise RequestError(
                'tool_choice "required" or a named function cannot be combined with a JSON '
                "`response_format` or a `grammar`: both constrain the output with the one grammar "
                "the engine takes",
                "tool_choice",
            )
        return json.dumps(tools.grammar), "json_schema", "tool_choice"
    if extension is not None:
        return (*extension, "grammar")
    if fmt is not None:
        return json.dumps(fmt), "json_schema", "response_format"
    return None


def _response_format_schema(fmt: Any) -> dict[str, Any] | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}  # the gateway sends it as this json_schema; the same grammar either way
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema must be a JSON schema object", "response_format")
        return schema
    raise RequestError('response_format.type must be "text", "json_object" or "json_schema"', "response_format")


def _grammar_extension(grammar: Any) -> tuple[str, str] | None:
    if grammar is None:
        return None
    kind = grammar.get("type") if isinstance(grammar, dict) else None
    if kind not in _GRAMMAR_TYPES or "value" not in grammar:
        raise RequestError(f'grammar must be {{"type": one of {", ".join(_GRAMMAR_TYPES)}, "value": ...}}', "grammar")
    value = grammar["value"]
    return (value if isinstance(value, str) else json.dumps(value)), str(kind)


def completion_prompt(prompt: Any) -> str:
    """The one string the package completes (a list of one string too: the gateway fans out longer lists)."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("The bundled engine takes a completion prompt as one string", "prompt")
    return prompt


def submission_error(exc: BaseException, grammar_source: str | None) -> RequestError:
    """The engine refused a request as it was submitted (a bad image URL, a grammar it cannot build)."""
    text = clean_message(exc)
    lowered = text.lower()
    blames_grammar = grammar_source is not None and ("grammar" in lowered or "schema" in lowered)
    return RequestError(text, grammar_source if blames_grammar else None)


def stop_sequences(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise RequestError("stop must be a string or an array of strings", "stop")


def logit_bias(bias: Any) -> dict[int, float] | None:
    if bias is None:
        return None
    try:
        if isinstance(bias, dict):
            return {int(token): float(value) for token, value in bias.items()}
    except (TypeError, ValueError):
        pass
    raise RequestError("logit_bias must map token ids to numbers", "logit_bias")
