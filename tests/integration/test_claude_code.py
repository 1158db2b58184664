"""Claude Code itself (npm `@anthropic-ai/claude-code`, headless `-p`) against the gateway and the real model.

Claude Code's request is about 77 KB (its system prompt and two dozen tools); what the model reads of it is what its
chat template renders: SmolLM2-135M's template has no place for tools, so about 3,000 of its 8,192 tokens. With the
prompt trimmed (`--bare --tools ""`, the README's recipe for a small model) and its output limit set to what a small
model can write (CLAUDE_CODE_MAX_OUTPUT_TOKENS; it asks for 32,000 otherwise), a session answers. Its full prompt is
served too, every request answered, though a 135M model lost in it does not stop writing before that limit. Where
the model cannot hold the prompt (here: its context cut to 2,048 with `max_seq_len`), the gateway refuses it at once,
in Anthropic's words, which Claude Code shows its user. The program is installed from npm once into the test cache
(``$MISTRAL_GATEWAY_TEST_CACHE``, as the real model is); the tests are skipped, saying why, where npm cannot install
it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from tests import realmodel
from tests.helpers import Gateway

pytest.importorskip("mistralrs", reason="the engine extra is not installed")

Start = Callable[..., Gateway]
# The newest release whose package declares node 18 or newer (2.1.198 and later want node 22; this machine has 20).
VERSION = "2.1.197"
BUNDLED = {"GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": "", "RUST_LOG": "error"}


@pytest.fixture(scope="module")
def claude() -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: Claude Code cannot be")
    folder = realmodel.cache_dir() / f"claude-code-{VERSION}"
    program = folder / "node_modules" / ".bin" / "claude"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # two test runs at once install it once
        if program.exists():
            return program
        done = subprocess.run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(folder),
                f"@anthropic-ai/claude-code@{VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0 or not program.exists():
            pytest.skip(f"npm could not install Claude Code {VERSION}: {done.stderr.strip()[-400:]}")
    return program


def run(
    claude: Path, gw: Gateway, home: Path, *args: str, output_tokens: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`claude -p` as the README says to run it: the gateway as its base URL, no traffic to anywhere else."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HOME": str(home),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": gw.url,
        "ANTHROPIC_API_KEY": "unused",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
    }
    if output_tokens is not None:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(output_tokens)
    command = [str(claude), "-p", "Say hi in three words.", "--model", "smollm2", "--output-format", "json", *args]
    return subprocess.run(
        command, env=env, cwd=home, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )


def _gguf(path: Path, max_seq_len: int | None = None) -> str:
    options = f"[models.options]\nmax_seq_len = {max_seq_len}\n" if max_seq_len else ""
    return f'[[models]]\nid = "smollm2"\nkind = "gguf"\npath = "{path}"\n{options}'


def test_a_prompt_the_model_cannot_hold_is_refused_at_once_and_claude_code_says_so(
    claude: Path, smollm2: Path, gateways: Start, tmp_path: Path
) -> None:
    gw = gateways(_gguf(smollm2, max_seq_len=2048), env=BUNDLED)
    done = run(claude, gw, tmp_path / "home")
    assert done.returncode != 0
    assert "too long" in (done.stdout + done.stderr).lower(), done.stdout[-2000:] + done.stderr[-2000:]
    assert gw.engine()["starts"] == 0  # refused before any engine started, let alone prefilled it
    refused = [r for r in _requests(gw) if r["path"] == "/v1/messages"]
    assert refused and all(r["status"] == 400 for r in refused)


def test_claude_codes_full_prompt_with_its_tools_is_served(
    claude: Path, smollm2: Path, gateways: Start, tmp_path: Path
) -> None:
    gw = gateways(_gguf(smollm2), env=BUNDLED)
    done = run(claude, gw, tmp_path / "home", output_tokens=16)
    result = json.loads(done.stdout)
    assert result["type"] == "result" and result["api_error_status"] is None, done.stdout[-2000:]
    served = [r for r in _requests(gw) if r["path"] == "/v1/messages"]
    assert served and all(r["status"] == 200 and r["stream"] for r in served)


def test_a_claude_code_session_with_a_prompt_the_model_can_hold_answers(
    claude: Path, smollm2: Path, gateways: Start, tmp_path: Path
) -> None:
    gw = gateways(_gguf(smollm2), env=BUNDLED)
    done = run(
        claude, gw, tmp_path / "home", "--bare", "--tools", "", "--system-prompt", "Be brief.", output_tokens=256
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["type"] == "result" and not result["is_error"] and result["result"].strip()
    recent = [r for r in _requests(gw) if r["path"] == "/v1/messages"]
    assert recent and all(r["status"] == 200 for r in recent)


def _requests(gw: Gateway) -> list[dict[str, object]]:
    import httpx

    data: list[dict[str, object]] = httpx.get(gw.url + "/admin/requests", timeout=10).json()["recent"]
    return data
