"""The `mistralrs` package's answers in mistral.rs's wire shape (mistralrs-core/src/response.rs).

The package's response objects are pyo3 classes without ``__dict__`` or a dump method; each is written out field by
field as the mistral.rs server would serialise it, quirks included (docs/engine-contract.md): the gateway turns that
shape into OpenAI's for every engine alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def usage_json(usage: Any) -> dict[str, int] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _finite(value: float) -> float | None:
    # A grammar's banned alternatives have a log-probability of -inf, which JSON cannot carry: mistral.rs's
    # serde_json writes a non-finite float as null.
    return value if math.isfinite(value) else None


def logprob_json(logprob: Any) -> dict[str, Any]:
    """A ``ResponseLogprob``: the token's text and bytes, and its ``TopLogprob`` alternatives (a token id and its
    text), exactly as mistral.rs sends them; the gateway converts them to OpenAI's shape for every engine."""
    raw = logprob.bytes
    return {
        "token": logprob.token,
        "logprob": _finite(logprob.logprob),
        "bytes": None if raw is None else list(raw),
        "top_logprobs": [
            {"token": top.token, "logprob": _finite(top.logprob), "bytes": top.bytes} for top in logprob.top_logprobs
        ],
    }


def tool_call_json(call: Any) -> dict[str, Any]:
    # ``tp`` is a ToolCallType whose only member is Function: its name, in the snake_case serde gives it.
    return {
        "index": call.index,
        "id": call.id,
        "type": str(call.tp).rsplit(".", 1)[-1].lower(),
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


def chunk_json(chunk: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``ChatCompletionChunkResponse``; the chunk that finishes a choice carries the usage (the package's own)."""
    choices = []
    for choice in chunk.choices:
        delta = choice.delta
        out: dict[str, Any] = {
            "role": delta.role or "assistant",
            "content": delta.content,
            "tool_calls": [tool_call_json(c) for c in delta.tool_calls] if delta.tool_calls else None,
        }
        if getattr(delta, "reasoning_content", None):
            out["reasoning_content"] = delta.reasoning_content
        choices.append(
            {
                "index": choice.index,
                "delta": out,
                "finish_reason": choice.finish_reason,
                "logprobs": None if choice.logprobs is None else logprob_json(choice.logprobs),
            }
        )
    return {
        **meta,
        "object": "chat.completion.chunk",
        "system_fingerprint": "local",
        "choices": choices,
        "usage": usage_json(chunk.usage),
    }


@dataclass
class _Choice:
    texts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


class ChatCollector:
    """A whole chat answer assembled from the stream it was generated as (every chat request streams)."""

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None

    def add(self, chunk: Any) -> None:
        for choice in chunk.choices:
            into = self._choices.setdefault(choice.index, _Choice())
            delta = choice.delta
            if delta.content is not None:
                into.texts.append(delta.content)
            if getattr(delta, "reasoning_content", None):
                into.reasoning.append(delta.reasoning_content)
            if delta.tool_calls:
                into.tool_calls.extend(tool_call_json(call) for call in delta.tool_calls)
            if choice.logprobs is not None:
                into.logprobs.append(logprob_json(choice.logprobs))
            into.finish_reason = choice.finish_reason or into.finish_reason
        self._usage = chunk.usage or self._usage

    def partial(self) -> dict[int, str]:
        """What each choice had said before a failure (mistral.rs's ``partial_response``)."""
        return {index: "".join(choice.texts) for index, choice in sorted(self._choices.items())}

    def answer(self, meta: dict[str, Any], *, logprobs: bool) -> dict[str, Any]:
        """A ``ChatCompletionResponse``: ``content`` is null when the model only called tools."""
        choices = []
        for index, choice in sorted(self._choices.items()):
            text = "".join(choice.texts) if choice.texts or not choice.tool_calls else None
            message: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": choice.tool_calls or None}
            if choice.reasoning:
                message["reasoning_content"] = "".join(choice.reasoning)
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "finish_reason": choice.finish_reason,
                    "logprobs": {"content": choice.logprobs} if logprobs else None,
                }
            )
        return {
            **meta,
            "object": "chat.completion",
            "system_fingerprint": "local",
            "choices": choices,
            "usage": usage_json(self._usage),
        }


def completion_json(response: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``CompletionResponse``; streamed, it is the one chunk, and so carries the finish reason and usage."""
    choices = [
        {"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None} for c in response.choices
    ]
    return {
        **meta,
        "object": "text_completion",
        "system_fingerprint": "local",
        "choices": choices,
        "usage": usage_json(response.usage),
    }
