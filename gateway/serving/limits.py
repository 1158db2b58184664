"""Prompt limits before prefill: a chat request whose prompt cannot fit the model's context is refused at once, and
``max_tokens`` never asks the engine for more than the context has room for.

The context of a model is its ``max_seq_len`` in the models file, else what its files state (the GGUF metadata,
``config.json``); the prompt is counted with the model's own tokenizer and chat template
(gateway/models/prompts.py), in a worker thread. What happens when the prompt fits but ``max_tokens`` does not:

- OpenAI's routes refuse it with 400 ``context_length_exceeded``, with OpenAI's own words ("This model's maximum
  context length is ... However, you requested ..."): OpenAI and vLLM answer so, and clients parse that message;
  a request without ``max_tokens`` gets the room left as its limit (the answer ends with ``length`` there);
- Anthropic's Messages API and Ollama clamp ``max_tokens`` to the room left: Anthropic's API accepts such a request
  and ends the answer with ``model_context_window_exceeded`` (so does the gateway's translation: an answer cut for
  length before ``max_tokens``), and Ollama's ``num_predict`` never runs past the context either. Claude Code asks
  for 32,000 tokens whatever the model, and must still get an answer from a model with a smaller context.

A model whose tokenizer is not one the gateway can read is not counted: its engine decides (mistral.rs refuses a
prompt longer than the context, and stops an answer at the context's end).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ..catalog import Model
from ..chat.plans import Plan
from ..errors import ContextLengthExceeded
from ..models.prompts import Loader, ModelFiles, PromptCounter, context_length, load_counter

Policy = Literal["refuse", "clamp", "none"]  # none: counted by the engine itself (count_tokens)


@dataclass(frozen=True)
class Checked:
    plan: Plan  # as it may go to the engine
    prompt_tokens: int | None  # None: not counted (no counter for the model, or policy none)


_log = logging.getLogger("gateway.serving")


class PromptLimits:
    """Each model's context and prompt counter (loaded once, from its files), and the check of a plan."""

    def __init__(self, model_dir: Path, *, loader: Loader = load_counter) -> None:
        self._model_dir = model_dir
        self._loader = loader
        self._counters: dict[str, asyncio.Future[tuple[int | None, PromptCounter | None]]] = {}

    async def check(self, model: Model, plan: Plan, policy: Policy) -> Checked:
        """``plan`` as it may go to the engine: unchanged, or with ``max_tokens`` set to what the context has room
        for; raises :class:`ContextLengthExceeded` when the prompt (or, with ``refuse``, prompt and ``max_tokens``)
        cannot fit."""
        if policy == "none" or not plan.bodies:
            return Checked(plan, None)
        limit, counter = await self._of(model)
        if counter is None:
            return Checked(plan, None)
        body = plan.bodies[0]
        prompt = await asyncio.to_thread(_count, counter, body, plan.chat)
        if limit is None:
            return Checked(plan, prompt)
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if prompt >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{'messages' if plan.chat else 'prompt'} resulted in {prompt} tokens (counted with the model's chat "
                f"template and tools). Please reduce the length of the {'messages' if plan.chat else 'prompt'}.",
                param="messages" if plan.chat else "prompt",
                prompt_tokens=prompt,
                limit=limit,
            )
        room = limit - prompt
        if asked is not None and asked <= room:
            return Checked(plan, prompt)
        if asked is not None and policy == "refuse":
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested {prompt + asked} "
                f"tokens ({prompt} in the {'messages' if plan.chat else 'prompt'}, {asked} in the completion). "
                "Please reduce the length of the messages or completion.",
                param="max_tokens",
                prompt_tokens=prompt + asked,
                limit=limit,
            )
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        bodies = tuple({**b, key: room} for b in plan.bodies)
        return Checked(replace(plan, bodies=bodies), prompt)

    async def _of(self, model: Model) -> tuple[int | None, PromptCounter | None]:
        loading = self._counters.get(model.id)
        if loading is None:
            files = model_files(model, self._model_dir)
            if files is None:  # not downloaded yet: looked for again at the next request
                return model.entry.options.max_seq_len, None
            loading = self._counters[model.id] = asyncio.ensure_future(asyncio.to_thread(self._load, model, files))
        return await asyncio.shield(loading)

    def _load(self, model: Model, files: ModelFiles) -> tuple[int | None, PromptCounter | None]:
        limit = model.entry.options.max_seq_len or context_length(files)
        counter = self._loader(files)
        if limit is not None and counter is None:
            _log.info(
                "model %s: its tokenizer cannot be read here; prompts are not counted before its engine", model.id
            )
        return limit, counter


def model_files(model: Model, model_dir: Path) -> ModelFiles | None:
    """The model's tokenizer files on this machine, when they are here (a downloaded or local file, a fetched repo)."""
    source = model.source
    if source.local:
        base = Path(source.model_id)
    elif model.entry.prefetch:
        base = model_dir / source.model_id
    else:
        return None
    if source.filename:
        path = base / source.filename
        return ModelFiles(gguf=path) if path.is_file() else None
    return ModelFiles(folder=base) if base.is_dir() else None


def _count(counter: PromptCounter, body: dict[str, Any], chat: bool) -> int:
    if chat:
        return counter.count(body)
    prompt = body.get("prompt")
    return counter.count_text(prompt if isinstance(prompt, str) else "")
