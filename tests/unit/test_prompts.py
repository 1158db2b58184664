"""Prompts counted before any engine sees them (models/prompts.py), and the limits applied with them
(serving/limits.py). Whether the count is the engine's own is checked against the real engine in
tests/integration/test_tokens.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.catalog import Model, parse_catalog
from gateway.chat.plans import plan_chat, plan_completion
from gateway.errors import ContextLengthExceeded
from gateway.models.prompts import ModelFiles, PromptCounter, context_length, load_counter
from gateway.serving.limits import PromptLimits
from tests.tinymodels import build_tokenizer, make_qwen3_gguf, write_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
HELLO = {"messages": [{"role": "user", "content": "hello there"}]}


def test_a_gguf_counter_renders_the_chat_template_and_counts_special_tokens_as_one(tmp_path: Path) -> None:
    counter = load_counter(ModelFiles(gguf=make_qwen3_gguf(tmp_path / "tiny.gguf", quant="Q8_0")))
    assert counter is not None
    text = counter.render(HELLO)
    assert text.startswith("<|im_start|>user\nhello there<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert counter.count_text("<|im_start|>") == 1
    assert counter.count(HELLO) == counter.count_text(text)
    longer = {"messages": [*HELLO["messages"], {"role": "user", "content": "and again " * 50}]}
    assert counter.count(longer) > counter.count(HELLO) + 50


def test_a_folder_counter_uses_its_tokenizer_json_and_template(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096}')
    files = ModelFiles(folder=tmp_path)
    counter = load_counter(files)
    assert counter is not None and context_length(files) == 4096
    assert counter.count(HELLO) == len(build_tokenizer().encode(counter.render(HELLO), add_special_tokens=False).ids)


def test_what_cannot_be_read_is_not_counted(tmp_path: Path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert load_counter(ModelFiles(gguf=tmp_path / "junk.gguf")) is None
    assert load_counter(ModelFiles(folder=tmp_path)) is None  # no tokenizer.json


def _limits(tmp_path: Path, context: int) -> tuple[PromptLimits, Model]:
    gguf = make_qwen3_gguf(tmp_path / "tiny.gguf", quant="Q8_0")
    toml = f'[[models]]\nid = "tiny"\nkind = "gguf"\npath = "{gguf}"\n[models.options]\nmax_seq_len = {context}\n'
    model = parse_catalog(toml, origin="m.toml", model_dir=tmp_path / "models").models[0]
    return PromptLimits(tmp_path / "models"), model


async def test_a_prompt_that_does_not_fit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    limits, model = _limits(tmp_path, 64)
    plan = plan_chat({"messages": [{"role": "user", "content": "word " * 200}]}, "tiny", takes_images=False)
    with pytest.raises(ContextLengthExceeded) as info:
        await limits.check(model, plan, "clamp")
    error = info.value
    assert error.limit == 64 and error.prompt_tokens > 64 and error.param == "messages" and error.status == 400
    assert "maximum context length is 64 tokens" in error.message


async def test_max_tokens_beyond_the_room_left_is_refused_or_clamped_by_the_dialects_policy(tmp_path: Path) -> None:
    limits, model = _limits(tmp_path, 256)
    plan = plan_chat({**HELLO, "max_tokens": 10_000}, "tiny", takes_images=False)
    with pytest.raises(ContextLengthExceeded) as info:
        await limits.check(model, plan, "refuse")
    assert info.value.param == "max_tokens" and "you requested" in info.value.message
    checked = await limits.check(model, plan, "clamp")
    assert checked.prompt_tokens is not None
    assert checked.plan.bodies[0]["max_tokens"] == 256 - checked.prompt_tokens
    unlimited = await limits.check(model, plan_chat(HELLO, "tiny", takes_images=False), "refuse")
    assert unlimited.plan.bodies[0]["max_tokens"] == 256 - (unlimited.prompt_tokens or 0)  # the room left
    fits = plan_chat({**HELLO, "max_tokens": 5}, "tiny", takes_images=False)
    assert (await limits.check(model, fits, "refuse")).plan is fits
    counted = await limits.check(model, plan, "none")
    assert counted.plan is plan and counted.prompt_tokens is None
    completion = plan_completion({"prompt": "word " * 300, "max_tokens": 1}, "tiny")
    with pytest.raises(ContextLengthExceeded) as info:
        await limits.check(model, completion, "refuse")
    assert info.value.param == "prompt"


async def test_a_model_whose_files_are_not_here_yet_is_not_counted(tmp_path: Path) -> None:
    toml = '[[models]]\nid = "later"\nkind = "gguf"\nurl = "http://x/m.gguf"\nfile = "m.gguf"\n'
    model = parse_catalog(toml, origin="m.toml", model_dir=tmp_path).models[0]
    plan = plan_chat(HELLO, "later", takes_images=False)
    checked = await PromptLimits(tmp_path).check(model, plan, "refuse")
    assert checked.plan is plan and checked.prompt_tokens is None


def test_templates_see_tools(tmp_path: Path) -> None:
    template = "{% if tools %}TOOLS:{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    counter = PromptCounter(build_tokenizer(), template)
    assert counter.render({**HELLO, "tools": TOOLS}).startswith('TOOLS:[{"type": "function"')
