from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

from tests import browser as browsers
from tests import realmodel, routers
from tests.helpers import Gateway, start_gateway
from tests.inprocess import InProcessGateway, gateway_env


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start installing LiteLLM's proxy now if a test of this run needs it: the install overlaps the tests before."""
    wanted = any("litellm" in item.nodeid for item in session.items)
    if wanted and os.environ.get("MISTRAL_GATEWAY_TEST_LITELLM") != "0":
        routers.install_in_background("venv-litellm", routers.LITELLM, "litellm")


def models_toml(root: Path) -> str:
    """Models of every kind, their local folders made so the config checks pass."""
    for name in ("chat", "embed"):
        (root / name).mkdir(parents=True, exist_ok=True)
    gguf = root / "gguf" / "tiny-q8.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(b"GGUF")
    return f"""
default_model = "tiny-chat"

[[models]]
id = "tiny-chat"
kind = "plain"
path = "{root / "chat"}"
aliases = ["gpt-4o-mini"]
[models.options]
arch = "qwen3"

[[models]]
id = "tiny-gguf"
kind = "gguf"
path = "{gguf}"
tokenizer = "Qwen/Qwen3-0.6B"

[[models]]
id = "tiny-embed"
kind = "embedding"
path = "{root / "embed"}"
[models.options]
arch = "qwen3embedding"

[[models]]
id = "tiny-flux"
kind = "diffusion"
repo = "black-forest-labs/FLUX.1-schnell"
prefetch = false  # the fake engine "loads" it; the hub is not reachable from tests
[models.options]
arch = "flux"

[[models]]
id = "tiny-speech"
kind = "speech"
repo = "nari-labs/Dia-1.6B"
prefetch = false
[models.options]
arch = "dia"
"""


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateways in this process, with the fake engine in this process too (tests/inprocess.py); every one is
    stopped at the end. For what needs processes (signals, a gateway killed, engines that block their process), use
    ``gateway_processes``."""
    started: list[Gateway] = []

    def start(toml: str | None = "default", **kwargs: Any) -> Gateway:
        text = models_toml(tmp_path / "models") if toml == "default" else toml
        engine = kwargs.pop("engine", "mistralrs-server")
        work = tmp_path / f"gw{len(started)}"
        gateway = InProcessGateway(work, gateway_env(work, models_toml=text, **kwargs), engine=engine)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway_processes(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateway processes with fake engine processes; every one is stopped at the end."""
    started: list[Gateway] = []

    def start(toml: str | None = "default", **kwargs: Any) -> Gateway:
        text = models_toml(tmp_path / "models") if toml == "default" else toml
        gateway = start_gateway(tmp_path, text, name=f"gw{len(started)}", **kwargs)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real model in the fast recipe (tests/realmodel.py), for the bundled engine; or the test is skipped saying
    what is missing."""
    pytest.importorskip("mistralrs", reason="the engine extra is not installed")
    try:
        return realmodel.smollm2()
    except realmodel.Unavailable as exc:
        pytest.skip(f"the real model could not be fetched: {exc}")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium (tests/browser.py), or the test is skipped saying what is missing."""
    missing = browsers.available()
    if missing:
        pytest.skip(missing)
    driver = browsers.chromium()
    try:
        yield driver
    finally:
        driver.quit()
