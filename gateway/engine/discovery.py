"""Finding the engine program to run, and which command-line dialect it speaks."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import EngineNotInstalled

Dialect = Literal["legacy", "serve"]

INSTALL_HINT = (
    "Install an engine: `pip install 'mistral-gateway[engine]'` (the CPU engine from PyPI), or put "
    "`mistralrs` (mistral.rs 0.7+, e.g. `cargo install mistralrs-cli`) or `mistralrs-server` on PATH, "
    "or set GATEWAY_ENGINE_BINARY to its path, or GATEWAY_ENGINE_URL to an engine that is already running."
)


@dataclass(frozen=True)
class EngineProgram:
    """How to invoke an engine: the program (and any fixed leading arguments) and its dialect.

    ``legacy`` is ``mistralrs-server [GLOBAL FLAGS] <subcommand> ...``; ``serve`` is the newer
    ``mistralrs serve ...`` / ``mistralrs from-config -f FILE``.
    """

    argv: tuple[str, ...]
    dialect: Dialect
    name: str
    version: tuple[int, int, int] | None = None


def probe_version(argv: tuple[str, ...]) -> tuple[int, int, int] | None:
    """The engine's version from ``--version``; None when it does not say (then the newest is assumed).

    Spellings changed between releases (``vision-plain`` became ``multimodal-plain`` in 0.8, GGUF ids
    changed in 0.9.1), so the command line depends on it.
    """
    try:
        done = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", done.stdout) if done.returncode == 0 else None
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))) if match else None


def dialect_of(binary: str) -> Dialect:
    """Tell the dialect from the program's name, the only thing both releases reliably differ in."""
    stem = Path(binary).name
    if stem.startswith("mistralrs-server"):
        return "legacy"
    return "serve"


def bundled_available() -> bool:
    """Whether the `mistralrs` package (the engine from PyPI) can be imported here."""
    return importlib.util.find_spec("mistralrs") is not None


BUNDLED = EngineProgram((sys.executable, "-m", "gateway.engine.bundled"), "legacy", "bundled")


def find_engine(
    *,
    choice: str,
    binary: str | None,
    which: Callable[[str], str | None] = shutil.which,
    has_bundled: Callable[[], bool] = bundled_available,
) -> EngineProgram:
    """Pick the engine: GATEWAY_ENGINE_BINARY, then `mistralrs`, then `mistralrs-server` on PATH, then the
    bundled engine server (the `mistralrs` package from PyPI driven by gateway.engine.bundled).

    ``choice`` (GATEWAY_ENGINE) forces one kind. Raises :class:`EngineNotInstalled` with what to
    install when nothing fits.
    """
    if choice == "bundled":
        if has_bundled():
            return BUNDLED
        raise EngineNotInstalled(
            f"GATEWAY_ENGINE=bundled, but the `mistralrs` package is not installed. {INSTALL_HINT}"
        )
    if binary and choice in ("auto", "mistralrs", "mistralrs-server"):
        found = which(binary) or (binary if Path(binary).is_file() else None)
        if found is None:
            raise EngineNotInstalled(f"GATEWAY_ENGINE_BINARY={binary!r} is not an executable program. {INSTALL_HINT}")
        dialect: Dialect = (
            "legacy" if choice == "mistralrs-server" else "serve" if choice == "mistralrs" else dialect_of(found)
        )
        return EngineProgram((found,), dialect, Path(found).name, probe_version((found,)))
    candidates: list[tuple[str, Dialect]] = []
    if choice in ("auto", "mistralrs"):
        candidates.append(("mistralrs", "serve"))
    if choice in ("auto", "mistralrs-server"):
        candidates.append(("mistralrs-server", "legacy"))
    for name, dialect in candidates:
        found = which(name)
        if found:
            return EngineProgram((found,), dialect, name, probe_version((found,)))
    if choice == "auto" and has_bundled():
        return BUNDLED
    raise EngineNotInstalled(f"No mistral.rs engine found. {INSTALL_HINT}")
