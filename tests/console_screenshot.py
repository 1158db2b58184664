"""The picture of the console in docs/operations.md (not a test): a gateway with the bundled engine on the real model
(SmolLM2-135M) and a tiny embedding model, some traffic, a playground reply, then a screenshot of /ui.

Run: ``.venv/bin/python -m tests.console_screenshot docs/console.png`` (needs Chromium and chromedriver).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests import browser, realmodel
from tests.helpers import start_gateway
from tests.tinymodels import make_qwen3_embedding


def main(out: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="console-shot-"))
    make_qwen3_embedding(root / "embed", hidden=64)
    gguf = realmodel.smollm2()
    toml = (
        f'[[models]]\nid = "smollm2"\nkind = "gguf"\npath = "{gguf}"\naliases = ["claude-haiku-4-5"]\n'
        f'[[models]]\nid = "embed"\nkind = "embedding"\npath = "{root / "embed"}"\n'
    )
    gw = start_gateway(
        root,
        toml,
        env={
            "GATEWAY_ENGINE": "bundled",
            "GATEWAY_ENGINE_BINARY": "",
            "RUST_LOG": "info",
            "GATEWAY_MEMORY_BUDGET_MB": "2048",
        },
    )
    driver = browser.chromium(width=1400, height=1700)
    try:
        chat = {"model": "smollm2", "max_tokens": 24, "messages": [{"role": "user", "content": "Name a colour."}]}
        httpx.post(gw.v1 + "/chat/completions", json=chat, timeout=300)
        for _ in range(2):
            httpx.post(gw.v1 + "/embeddings", json={"model": "embed", "input": ["a", "b", "c"]}, timeout=300)
        httpx.post(gw.url + "/api/chat", json={**chat, "stream": False}, timeout=300)
        driver.get(gw.url + "/ui")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#pg-model option[value="smollm2"]'))
        Select(driver.find_element(By.ID, "pg-model")).select_by_value("smollm2")
        driver.find_element(By.ID, "pg-input").send_keys("Write one sentence about the sea.")
        driver.find_element(By.ID, "pg-send").click()
        wait.until(lambda d: "tok/s" in d.find_element(By.ID, "pg-stats").text)
        time.sleep(2)  # the requests table and the log pane catch up
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"wrote {out}")
    finally:
        driver.quit()
        gw.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console.png"))
