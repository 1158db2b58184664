"""How many tokens a chat request's prompt takes, counted before any engine sees it, and how long a model's context
is: what the gateway needs to refuse a prompt that cannot fit at once, instead of letting an engine grind through
it (mistral.rs's bundled server takes no limit at all, and prefills the whole of it first).

A :class:`PromptCounter` renders the messages and tools with the model's own chat template (Jinja, as Hugging Face
and mistral.rs do) and tokenizes the result with the model's own tokenizer (the ``tokenizers`` library): from
``tokenizer.json`` in a Hugging Face folder, or built from the vocabulary inside a GGUF file the way mistral.rs
builds it (byte-level BPE for ``tokenizer.ggml.model = "gpt2"``, the tokenizer of Llama 3, Qwen, SmolLM, Mistral
Nemo and most recent models; other GGUF tokenizers are not counted, see :func:`load_counter`). The count matches
the engine's own ``prompt_tokens`` (tests/integration/test_prompt_limits.py checks it against the engine).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .metadata import (
    NotGGUF,
    folder_chat_template,
    folder_context_length,
    folder_special_tokens,
    read_gguf,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types whose text stands for one token (special tokens)
# How a byte-level BPE splits text into words before merging, by the family `tokenizer.ggml.pre` names (llama.cpp's
# table): they differ in how digits and spaces go with their neighbours.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE = {
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's tokenizer lives: a GGUF file, or a Hugging Face folder."""

    gguf: Path | None = None
    folder: Path | None = None


class PromptCounter:
    """Counts the tokens of a chat request's prompt, chat template and tools included."""

    def __init__(self, tokenizer: Tokenizer, template: str | None, *, bos: str = "", eos: str = "") -> None:
        self._tokenizer = tokenizer
        self._template = _compile(template) if template else None
        self._bos, self._eos = bos, eos

    def count(self, chat: dict[str, Any]) -> int:
        """Tokens of the prompt the engine builds from an OpenAI chat request (messages, tools)."""
        text = self.render(chat)
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def count_text(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def render(self, chat: dict[str, Any]) -> str:
        messages = [_plain(message) for message in chat.get("messages") or []]
        if self._template is None:
            return "\n".join(str(m.get("content") or "") for m in messages)
        variables: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": True,
            "bos_token": self._bos,
            "eos_token": self._eos,
        }
        if chat.get("tools"):
            variables["tools"] = chat["tools"]
        if chat.get("enable_thinking") is not None:
            variables["enable_thinking"] = chat["enable_thinking"]
        try:
            return str(self._template.render(**variables))
        except Exception:  # a template that raises on this conversation: the engine will say so; count the text
            return "\n".join(json.dumps(m, ensure_ascii=False) for m in messages)


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message as templates see it: text parts joined into one string (images count nothing here)."""
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return {**message, "content": text}
    return message


def _compile(template: str) -> Any:
    """A chat template compiled as Hugging Face compiles them: a sandbox, loop controls, ``raise_exception``,
    ``tojson`` that keeps non-ASCII text, ``strftime_now``."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def load_counter(files: ModelFiles) -> PromptCounter | None:
    """The counter for a model's files; None when its tokenizer is of a kind not counted here (a GGUF with a
    SentencePiece vocabulary, a folder without ``tokenizer.json``) or its files cannot be read."""
    from tokenizers import Tokenizer

    if files.gguf is not None:
        try:
            header = read_gguf(files.gguf, vocabulary=True)
        except (OSError, NotGGUF):
            return None
        built = _gguf_tokenizer(header.metadata)
        if built is None:
            return None
        tokenizer, specials = built
        return PromptCounter(tokenizer, header.chat_template, **specials)
    if files.folder is not None and (files.folder / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(files.folder / "tokenizer.json"))
        except Exception:  # the library raises bare Exceptions for files it cannot parse
            return None
        specials = folder_special_tokens(files.folder)
        return PromptCounter(
            tokenizer,
            folder_chat_template(files.folder),
            bos=specials.get("bos_token", ""),
            eos=specials.get("eos_token", ""),
        )
    return None


def _gguf_tokenizer(metadata: dict[str, Any]) -> tuple[Tokenizer, dict[str, str]] | None:
    """A byte-level BPE tokenizer from a GGUF's vocabulary, as mistral.rs builds it for ``gpt2`` vocabularies."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if metadata.get("tokenizer.ggml.model") != "gpt2":
        return None
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    merges: list[str] = metadata.get("tokenizer.ggml.merges") or []
    kinds: list[int] = metadata.get("tokenizer.ggml.token_type") or []
    if not tokens or not merges:
        return None
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges if " " in merge]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))  # type: ignore[arg-type]
    pattern = _PRE.get(str(metadata.get("tokenizer.ggml.pre")), _GPT2)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, kind in enumerate(kinds) if kind in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in special])

    def named(key: str) -> str:
        index = metadata.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    return tokenizer, {"bos": named("tokenizer.ggml.bos_token_id"), "eos": named("tokenizer.ggml.eos_token_id")}


def context_length(files: ModelFiles) -> int | None:
    """The model's context length as its files state it (GGUF metadata, ``config.json``)."""
    if files.gguf is not None:
        try:
            return read_gguf(files.gguf).context_length
        except (OSError, NotGGUF):
            return None
    if files.folder is not None:
        return folder_context_length(files.folder)
    return None


Loader = Callable[[ModelFiles], PromptCounter | None]
