"""Which weight types the engine is fast with on this machine, and what to serve instead of a slow one.

The same model decodes 3.3x faster and prefills 4-5x faster on mistral.rs when its weights are in a type the
engine has vectorized kernels for. Measured with mistral.rs 0.9.5 on x86-64 with AVX-512 (docs/performance.md,
../shared/PERF.md), SmolLM2-135M, every variant against llama.cpp on the same weights:

    Q4_1 GGUF   0.23x decode, ~0.1x prefill      Q8_0 GGUF   0.75x decode, 0.43x prefill
    BF16        0.08x decode                     Q4_0 GGUF   0.77x decode, 0.39x prefill
    F32         0.28x decode (fastest prefill)   ISQ Q8_0    0.77x decode, 0.53x prefill

and read in the kernels mistral.rs 0.9 uses (candle's quantized matmuls): on x86, Q8_0, Q4_0 and the K-quants
have AVX2 or AVX-512 dot products (Q4_K, Q6_K and Q8_0 repacked tiles where rows are multiples of 256, with VNNI),
while Q4_1, Q5_0, Q5_1 and Q8_1 only have scalar code. On a GPU every type has kernels: files are served as they
are. Embedding models only prefill, where F32 is the fastest type: they are left as they are too.

:func:`plan` says, for one model file, whether it is fast here and, when not, which type to serve instead; the
gateway converts a slow GGUF once (gateway/models/convert.py) unless the models file says ``quant = "as-is"``.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# GGUF weight types by how the engine runs them on a CPU.
FAST_CPU = frozenset({"Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"})
SLOW_CPU: Mapping[str, str] = {
    "Q4_1": "about 0.23x llama.cpp's decode: the engine has only scalar kernels for it",
    "Q5_0": "scalar kernels only",
    "Q5_1": "scalar kernels only",
    "Q8_1": "scalar kernels only",
    "BF16": "about 0.08x llama.cpp's decode on a CPU",
    "F16": "no fast F16 matmul on a CPU",
}
CONVERTIBLE = frozenset({"Q8_0", "Q4_0"})  # what gateway/models/convert.py can write (the gguf package's quantizers)
# ISQ types that quantize every layer as asked only when its input width is a multiple of 256; otherwise the
# engine silently uses another type for that layer (Q4K becomes Q4_1, among the slowest).
K_ISQ = {"Q2K": "Q4_0", "Q3K": "Q4_0", "Q4K": "Q4_1", "Q5K": "Q5_0", "Q6K": "Q5_1", "Q8K": "Q8_1"}


@dataclass(frozen=True)
class Machine:
    """What decides the engine's kernels: the CPU's architecture and features, and whether a GPU will run it."""

    arch: str
    flags: frozenset[str]
    gpu: bool

    @classmethod
    def detect(cls, *, cpuinfo: Path = Path("/proc/cpuinfo"), cpu_only: bool = False) -> Machine:
        flags: set[str] = set()
        try:
            with cpuinfo.open(encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    key, _, value = line.partition(":")
                    if key.strip() in ("flags", "Features"):  # x86, arm64: every core lists the same set
                        flags.update(value.split())
                        break
        except OSError:
            pass
        gpu = not cpu_only and shutil.which("nvidia-smi") is not None
        return cls(platform.machine().lower(), frozenset(flags), gpu)

    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "amd64")

    def describe(self) -> str:
        if self.gpu:
            return "a machine with an NVIDIA GPU"
        if self.x86:
            tier = (
                "AVX-512 with VNNI"
                if {"avx512f", "avx512_vnni"} <= self.flags
                else "AVX2"
                if "avx2" in self.flags
                else "no AVX2"
            )
            return f"this x86-64 CPU ({tier})"
        return f"this {self.arch} CPU"


def engine_on_cpu(*, engine: str, binary: str | None, cpu_flag: bool) -> bool:
    """Whether the engine will run on the CPU whatever the machine has: the bundled engine (the PyPI package is a CPU
    build), `[engine] cpu = true`, or no binary to run (then the bundled engine is the one found)."""
    if cpu_flag or engine == "bundled":
        return True
    if engine == "auto" and not binary:
        return shutil.which("mistralrs") is None and shutil.which("mistralrs-server") is None
    return False


@dataclass(frozen=True)
class Verdict:
    """What to serve for one model file on this machine."""

    current: str | None  # the file's weight type, None when unknown
    fast: bool
    serve_as: str | None  # the type to convert to (None: serve the file as it is)
    why: str  # one sentence for the log and `mistral-gateway check`


def plan(weight_type: str | None, machine: Machine, *, wanted: str = "auto", embedding: bool = False) -> Verdict:
    """The verdict for a GGUF whose weights are mostly ``weight_type``; ``wanted`` is the model's ``quant`` option:
    ``auto`` (the fast type for this machine), ``as-is``, or a type to convert to."""
    if wanted not in ("auto", "as-is"):
        if weight_type == wanted:
            return Verdict(weight_type, True, None, f"its weights are {wanted}, as the models file asks")
        return Verdict(weight_type, wanted not in SLOW_CPU, wanted, f"the models file asks for {wanted}")
    if weight_type is None:
        return Verdict(None, True, None, "its weight type is unknown: served as it is")
    if machine.gpu or embedding or weight_type not in SLOW_CPU:
        return Verdict(weight_type, True, None, f"{weight_type} is fast on {machine.describe()}")
    slow = f"{weight_type} is slow on {machine.describe()} ({SLOW_CPU[weight_type]})"
    if wanted == "as-is":
        return Verdict(weight_type, False, None, f'{slow}; served as it is (quant = "as-is")')
    return Verdict(weight_type, False, "Q8_0", f"{slow}: Q8_0 is served instead")


def isq_choice(requested: str, widths: list[int], machine: Machine) -> tuple[str, str | None]:
    """The in-situ quantization type to use for ``requested`` (``auto`` or a type), and a warning when it is not
    what was asked. ``widths``: the input widths of the model's linear layers (hidden and intermediate sizes)."""
    fast = "Q4K" if machine.gpu else "Q8_0"
    if requested.lower() == "auto":
        return fast, None
    fallback = K_ISQ.get(requested.upper())
    odd = [w for w in widths if w % 256]
    if fallback is not None and odd and not machine.gpu:
        return requested, (
            f"isq = {requested!r}: layers of width {odd[0]} are not a multiple of 256, so the engine quantizes them "
            f"to {fallback} instead{', one of its slowest types on a CPU' if fallback in SLOW_CPU else ''}. "
            'Use isq = "Q8_0" (or "auto").'
        )
    return requested, None
