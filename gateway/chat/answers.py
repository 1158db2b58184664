"""Engine answers made OpenAI answers: pure functions from decoded engine JSON to OpenAI's shapes.

The engine speaks mistral.rs's dialect of the API (docs/engine-contract.md): a stream chunk's ``logprobs`` is one
token's entry instead of ``{"content": [...]}``, its ``top_logprobs`` carry token ids where OpenAI has token
text, ``usage`` rides on the last content chunk whatever the client asked, completions carry chat-shaped logprobs,
and ``finish_reason`` can be ``canceled``. Everything here takes what the engine sent and returns what OpenAI
would have sent; nothing here does I/O, and nothing changes what the model said.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

# OpenAI's finish reasons; mistral.rs adds canceled, generated_image and generated_speech.
_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True)
class Shape:
    """What one client request asked for, as far as the shape of its answer goes."""

    model: str  # the id the client used, which every answer carries
    logprobs: int | None = None  # None: no logprobs; else how many alternatives per token (top_logprobs)
    include_usage: bool = False  # stream_options.include_usage
    single_tool_call: bool = False  # parallel_tool_calls: false
    text_offset: int = 0  # completions: where the choice's text starts (the prompt's length with echo)
    # tool_choice "required" or a named function: the tools the forced call is one of. The engine writes such a
    # call as the text of a JSON object (a grammar makes it) and turns it into a tool call once whole; cut short by
    # max_tokens, it stays text, which must reach the client as the call it was becoming, as OpenAI answers it.
    forced_tools: tuple[str, ...] = ()


def finish_reason(value: Any) -> str | None:
    """OpenAI's value for the engine's: ``canceled`` and the like end a choice the way ``stop`` does."""
    if value is None:
        return None
    return value if value in _FINISH else "stop"


def usage(value: Any) -> dict[str, Any] | None:
    """OpenAI's usage fields (and the token details OpenAI also has), without the engine's timing extras."""
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {name: int(value.get(name) or 0) for name in _USAGE_FIELDS}
    for details in ("prompt_tokens_details", "completion_tokens_details"):
        if isinstance(value.get(details), dict):
            out[details] = value[details]
    return out


def add_usage(total: dict[str, Any] | None, part: dict[str, Any] | None, *, prompt: bool) -> dict[str, Any] | None:
    """Sum the usage of fanned-out requests; ``prompt``: count this part's prompt tokens (once per prompt)."""
    if part is None:
        return total
    if total is None:
        total = {name: 0 for name in _USAGE_FIELDS}
    total["completion_tokens"] += part["completion_tokens"]
    if prompt:
        total["prompt_tokens"] += part["prompt_tokens"]
    total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]
    return total


# ------------------------------------------------------------------------------------------------ logprobs


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _logprob(value: Any) -> float:
    """A log-probability; -inf (a token a grammar banned), which JSON carries as null, is OpenAI's -9999.0."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > -9999.0:
        return float(value)
    return -9999.0


def _top(entry: Any) -> dict[str, Any]:
    """One alternative: mistral.rs's ``{"token": <id>, "bytes": "<text>"}`` or OpenAI's ``{"token": "<text>"}``."""
    token = entry.get("token")
    text = token if isinstance(token, str) else entry.get("bytes") if isinstance(entry.get("bytes"), str) else ""
    raw = entry.get("bytes")
    return {
        "token": text,
        "logprob": _logprob(entry.get("logprob")),
        "bytes": raw if isinstance(raw, list) else _utf8(text),
    }


def token_logprob(entry: Any, top: int) -> dict[str, Any]:
    """One generated token's entry, OpenAI-shaped, with at most ``top`` alternatives."""
    token = entry.get("token")
    text = token if isinstance(token, str) else ""
    raw = entry.get("bytes")
    alternatives = entry.get("top_logprobs") or []
    return {
        "token": text,
        "logprob": _logprob(entry.get("logprob")),
        "bytes": raw if isinstance(raw, list) else _utf8(text),
        "top_logprobs": [_top(alt) for alt in alternatives[:top] if isinstance(alt, dict)],
    }


def _entries(value: Any) -> list[Any]:
    """The per-token entries of a logprobs value: ``{"content": [...]}`` (whole answers), or one entry (chunks)."""
    if isinstance(value, dict):
        content = value.get("content")
        if isinstance(content, list):
            return content
        if "logprob" in value:
            return [value]
    if isinstance(value, list):
        return value
    return []


def chat_logprobs(value: Any, top: int | None) -> dict[str, Any] | None:
    if top is None or value is None:
        return None
    return {"content": [token_logprob(e, top) for e in _entries(value) if isinstance(e, dict)], "refusal": None}


def completion_logprobs(value: Any, top: int | None, offset: int) -> tuple[dict[str, Any] | None, int]:
    """The legacy completions shape (parallel lists), and the text offset after these tokens."""
    if top is None or value is None:
        return None, offset
    tokens: list[str] = []
    token_logprobs: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for raw in _entries(value):
        if not isinstance(raw, dict):
            continue
        entry = token_logprob(raw, top)
        tokens.append(entry["token"])
        token_logprobs.append(entry["logprob"])
        tops.append({alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]})
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset


# ---------------------------------------------------------------------------------------------- tool calls


def tool_calls(value: Any, *, single: bool, delta: bool) -> list[dict[str, Any]] | None:
    """Tool calls with OpenAI's fields; ``single``: only the first (the client asked for no parallel calls)."""
    if not isinstance(value, list) or not value:
        return None
    calls = []
    for position, call in enumerate(value[:1] if single else value):
        if not isinstance(call, dict):
            continue
        function: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments", "")
        out: dict[str, Any] = {
            "id": str(call.get("id") or f"call_{position}"),
            "type": "function",
            "function": {
                "name": str(function.get("name", "")),
                "arguments": arguments if isinstance(arguments, str) else _compact(arguments),
            },
        }
        if delta:
            out["index"] = call["index"] if isinstance(call.get("index"), int) else position
        calls.append(out)
    return calls or None


def _compact(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)("?)')
_ARGUMENTS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def cut_tool_call(text: str, names: tuple[str, ...] | list[str]) -> dict[str, Any] | None:
    """The tool call a forced call's text (``{"name":...,"arguments":{...}}``) was on its way to be when
    ``max_tokens`` cut it: its name (completed from the tools when the cut fell inside it or before it: the first
    tool it can still be) and the arguments as far as they got. None only without any tool to name."""
    head = _CALL_HEAD.match(text)
    written = head.group(1) if head is not None else ""
    whole = head is not None and bool(head.group(2))
    name = written if whole else next((n for n in names if n.startswith(written)), names[0] if names else None)
    if name is None:
        return None
    after = _ARGUMENTS.match(text[head.end() :]) if head is not None and whole else None
    arguments = text[head.end() + after.end() :] if head is not None and after is not None else ""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


# ------------------------------------------------------------------------------------------ whole answers


def _chat_choice(choice: Any, shape: Shape, index: int) -> dict[str, Any]:
    message: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
    calls = tool_calls(message.get("tool_calls"), single=shape.single_tool_call, delta=False)
    out_message: dict[str, Any] = {"role": "assistant", "content": message.get("content"), "refusal": None}
    if calls:
        out_message["tool_calls"] = calls
    if message.get("reasoning_content"):
        out_message["reasoning_content"] = message["reasoning_content"]
    reason = finish_reason(choice.get("finish_reason")) or "stop"
    if calls and reason == "stop":
        reason = "tool_calls"
    text = message.get("content")
    if shape.forced_tools and reason == "length" and not calls and isinstance(text, str):
        cut = cut_tool_call(text, shape.forced_tools)
        if cut is not None:
            out_message["content"], out_message["tool_calls"] = None, [cut]
    return {
        "index": index,
        "message": out_message,
        "finish_reason": reason,
        "logprobs": chat_logprobs(choice.get("logprobs"), shape.logprobs),
    }


def _completion_choice(choice: Any, shape: Shape, index: int) -> dict[str, Any]:
    logprobs, _ = completion_logprobs(choice.get("logprobs"), shape.logprobs, shape.text_offset)
    return {
        "index": index,
        "text": str(choice.get("text") or ""),
        "finish_reason": finish_reason(choice.get("finish_reason")) or "stop",
        "logprobs": logprobs,
    }


def _head(body: dict[str, Any], shape: Shape, obj: str) -> dict[str, Any]:
    head = {
        "id": str(body.get("id") or ""),
        "object": obj,
        "created": int(body.get("created") or 0),
        "model": shape.model,
    }
    if isinstance(body.get("system_fingerprint"), str):
        head["system_fingerprint"] = body["system_fingerprint"]
    return head


def merge_answers(bodies: list[dict[str, Any]], shapes: list[Shape], *, chat: bool, prompts: int = 1) -> dict[str, Any]:
    """One OpenAI answer from the engine's answers to fanned-out requests, in order (``shapes``: one per body).

    ``bodies`` come ``prompts`` groups of ``n`` (one request per prompt and choice); choice ``i`` of the answer is
    the first choice of body ``i``, as OpenAI numbers them. Prompt tokens count once per prompt.
    """
    n = len(bodies) // prompts
    choices = []
    total: dict[str, Any] | None = None
    for i, (body, shape) in enumerate(zip(bodies, shapes, strict=True)):
        engine_choices = body.get("choices") or [{}]
        choice = engine_choices[0] if isinstance(engine_choices[0], dict) else {}
        choices.append(_chat_choice(choice, shape, i) if chat else _completion_choice(choice, shape, i))
        total = add_usage(total, usage(body.get("usage")), prompt=i % n == 0)
    answer = _head(bodies[0], shapes[0], "chat.completion" if chat else "text_completion")
    answer["choices"] = choices
    # One answer keeps the engine's token details (cached prompt tokens); a sum of several has only the counts.
    answer["usage"] = usage(bodies[0].get("usage")) if len(bodies) == 1 else total
    return answer


# ------------------------------------------------------------------------------------------ stream chunks


@dataclass
class ChunkParts:
    """A normalised chunk and the usage the engine put on it (which the stream decides where to send)."""

    chunk: dict[str, Any] | None  # None: nothing left to send of it (a usage-only engine chunk)
    usage: dict[str, Any] | None


def chat_chunk(body: dict[str, Any], shape: Shape, index: int = 0) -> ChunkParts:
    """One engine chunk of a single-choice request, as the chunk of choice ``index``, usage split off."""
    choices = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta: dict[str, Any] = choice["delta"] if isinstance(choice.get("delta"), dict) else {}
        out_delta: dict[str, Any] = {}
        if delta.get("role"):
            out_delta["role"] = "assistant"
        if "content" in delta:
            out_delta["content"] = delta["content"]
        if delta.get("reasoning_content"):
            out_delta["reasoning_content"] = delta["reasoning_content"]
        calls = tool_calls(delta.get("tool_calls"), single=shape.single_tool_call, delta=True)
        if calls:
            out_delta["tool_calls"] = calls
        reason = finish_reason(choice.get("finish_reason"))
        if calls and reason == "stop":
            reason = "tool_calls"
        choices.append(
            {
                "index": index,
                "delta": out_delta,
                "finish_reason": reason,
                "logprobs": chat_logprobs(choice.get("logprobs"), shape.logprobs),
            }
        )
    return _chunk_parts(body, shape, "chat.completion.chunk", choices)


@dataclass
class CompletionOffsets:
    """Where the next token of each choice starts in its text: legacy logprobs carry text offsets."""

    next: dict[int, int]


def completion_chunk(body: dict[str, Any], shape: Shape, offsets: CompletionOffsets, index: int = 0) -> ChunkParts:
    choices = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        start = offsets.next.get(index, shape.text_offset)
        logprobs, offsets.next[index] = completion_logprobs(choice.get("logprobs"), shape.logprobs, start)
        choices.append(
            {
                "index": index,
                "text": str(choice.get("text") or ""),
                "finish_reason": finish_reason(choice.get("finish_reason")),
                "logprobs": logprobs,
            }
        )
    return _chunk_parts(body, shape, "text_completion", choices)


def _chunk_parts(body: dict[str, Any], shape: Shape, obj: str, choices: list[dict[str, Any]]) -> ChunkParts:
    part_usage = usage(body.get("usage"))
    if not choices:
        return ChunkParts(None, part_usage)
    chunk = _head(body, shape, obj)
    chunk["choices"] = choices
    if shape.include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the final usage chunk
    return ChunkParts(chunk, part_usage)


def usage_chunk(head: dict[str, Any], total: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """OpenAI's last chunk when the client sent ``stream_options.include_usage``: no choices, the usage."""
    chunk: dict[str, Any] = {key: head[key] for key in ("id", "object", "created", "system_fingerprint") if key in head}
    chunk["model"] = shape.model
    chunk["choices"] = []
    chunk["usage"] = total
    return chunk
