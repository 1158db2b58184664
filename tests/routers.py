"""The routers of the scale-out tests, each installed from PyPI into a venv of its own under the test cache
(tests/realmodel.py ``cache_dir()``), once: vllm-router is a 24 MB wheel with a few small dependencies; LiteLLM's
proxy pins about a hundred packages (80 s on a fresh machine), so its install starts in the background as soon as
the tests that need it are collected (tests/conftest.py) and overlaps the tests before them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import venv
from pathlib import Path

from filelock import FileLock

from tests.realmodel import cache_dir

INSTALL_TIMEOUT = 900  # seconds: a slow mirror, a cold pip cache
VLLM_ROUTER = "vllm-router==0.1.17"
LITELLM = "litellm[proxy]==1.108.0"  # 1.110's proxy extra needs litellm-proxy, which is not published on PyPI


def install_in_background(name: str, requirement: str, program: str) -> threading.Thread:
    """:func:`installed` in a daemon thread; a later call waits for it on the venv's file lock."""
    thread = threading.Thread(target=installed, args=(name, requirement, program), daemon=True)
    thread.start()
    return thread


def installed(name: str, requirement: str, program: str) -> Path | str:
    """The path of ``program`` in the venv ``name`` holding ``requirement`` (created and installed the first time),
    or why it could not be installed."""
    folder = cache_dir() / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    marker = folder / f".installed-{requirement}"
    executable = folder / "bin" / program
    with FileLock(str(folder) + ".lock"):  # two test runs at once install it once
        if marker.exists() and executable.exists():
            return executable
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(folder)
            done = subprocess.run(
                [str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement],
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"could not install {requirement} into {folder}: {exc}"
        if done.returncode != 0 or not executable.exists():
            return f"could not install {requirement} into {folder}: {done.stderr.strip()[-600:]}"
        marker.write_text(sys.version)
        return executable


def litellm_env() -> dict[str, str]:
    """The proxy's environment: none of the gateway's settings or fake-engine knobs, nothing fetched from the
    internet at start, errors only in its log, and no proxy of this machine between it and the nodes."""
    offline = ("MODEL_COST_MAP", "ANTHROPIC_BETA_HEADERS", "BLOG_POSTS", "POLICY_TEMPLATES", "AUTOROUTER_PRESETS")
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FAKE_ENGINE_"))},
        **{f"LITELLM_LOCAL_{name}": "True" for name in offline},
        "LITELLM_LOG": "ERROR",
        "NO_PROXY": "*",
    }


def counter_sum(text: str, name: str) -> float:
    """The sum of a counter's series in Prometheus text (0 when it has none yet)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            total += float(line.rsplit(" ", 1)[1])
    return total
