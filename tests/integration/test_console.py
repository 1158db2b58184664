"""The console (`/ui`) in a real browser: headless Chromium from the distribution, driven by Selenium.

The page must load whole on an offline machine (nothing requested from anywhere but the gateway) with nothing
written to the browser's console; reflect an engine's new state within two seconds of the gateway knowing it;
stream a playground reply from a real engine on a tiny model; cancel a request in flight; and with an admin key
set, show nothing until the key is given.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests import browser as browsers
from tests.fileserver import FileServer
from tests.helpers import Gateway, wait_for
from tests.tinymodels import make_qwen3_gguf

Start = Callable[..., Gateway]
TWO_SECONDS = 2.0  # the console's promise: an engine's new state shows within this long


def text_of(driver: WebDriver, css: str) -> str:
    elements = driver.find_elements(By.CSS_SELECTOR, css)
    return elements[0].text.strip() if elements else ""


def until(driver: WebDriver, condition: Callable[[], Any], timeout: float, what: str) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: condition(), message=what)


def page_errors(driver: WebDriver) -> list[dict[str, Any]]:
    return [entry for entry in browsers.console_messages(driver) if entry["level"] in ("SEVERE", "WARNING")]


def test_the_page_loads_whole_offline_with_a_clean_console(gateways: Start, browser: WebDriver) -> None:
    gw = gateways()
    browser.get(gw.url + "/")  # redirected to /ui
    until(
        browser,
        lambda: browser.find_elements(By.CSS_SELECTOR, '#engines tr[data-engine="tiny-chat"]'),
        30,
        "the engines table",
    )
    until(
        browser,
        lambda: browser.find_elements(By.CSS_SELECTOR, '#models tr[data-model="tiny-embed"]'),
        30,
        "the models table",
    )
    assert browser.current_url == gw.url + "/ui"
    assert text_of(browser, '#engines tr[data-engine="tiny-chat"] [data-field="state"]') == "stopped"
    until(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#pg-model option"), 30, "the playground's models")
    time.sleep(1.5)  # let the page's periodic refreshes and live streams run a while: none may log anything
    assert page_errors(browser) == []
    urls = browsers.requested_urls(browser)
    assert urls and all(url.startswith(gw.url + "/") or url.startswith("data:") for url in urls), urls


def test_loading_a_model_from_the_page_shows_its_state_within_two_seconds(gateways: Start, browser: WebDriver) -> None:
    gw = gateways()
    browser.get(gw.url + "/ui")
    cell = '#engines tr[data-engine="tiny-chat"] [data-field="state"]'
    until(browser, lambda: text_of(browser, cell) == "stopped", 30, "the engine shown stopped")
    browser.find_element(By.CSS_SELECTOR, '#engines button[data-action="load"][data-model="tiny-chat"]').click()
    wait_for(lambda: gw.engine("tiny-chat")["state"] == "ready", 60, "the engine to be ready")
    ready_at = time.monotonic()  # the gateway knows: the page has two seconds to show it
    until(browser, lambda: text_of(browser, cell) == "ready", TWO_SECONDS, "the page to show the engine ready")
    assert time.monotonic() - ready_at <= TWO_SECONDS
    assert text_of(browser, '#engines tr[data-engine="tiny-chat"] [data-field="pid"]') == str(gw.engine()["pid"])
    until(
        browser,
        lambda: "$ " in text_of(browser, "#log-lines") and "--model-id" in text_of(browser, "#log-lines"),
        10,
        "the engine's command line in the log pane",
    )
    browser.find_element(By.CSS_SELECTOR, '#engines button[data-action="unload"][data-model="tiny-chat"]').click()
    wait_for(lambda: gw.engine("tiny-chat")["state"] == "stopped", 60, "the engine to stop")
    stopped_at = time.monotonic()
    until(browser, lambda: text_of(browser, cell) == "stopped", TWO_SECONDS, "the page to show the engine stopped")
    assert time.monotonic() - stopped_at <= TWO_SECONDS
    assert page_errors(browser) == []


def test_the_playground_streams_a_reply_from_a_tiny_model(gateways: Start, browser: WebDriver, tmp_path: Path) -> None:
    pytest.importorskip("mistralrs", reason="the engine extra is not installed")
    make_qwen3_gguf(tmp_path / "q8" / "tiny-Q8_0.gguf", quant="Q8_0")
    toml = f'[[models]]\nid = "tiny"\nkind = "gguf"\npath = "{tmp_path / "q8" / "tiny-Q8_0.gguf"}"\n'
    gw = gateways(toml, env={"GATEWAY_ENGINE": "bundled", "GATEWAY_ENGINE_BINARY": "", "RUST_LOG": "error"})
    browser.get(gw.url + "/ui")
    until(
        browser,
        lambda: browser.find_elements(By.CSS_SELECTOR, '#pg-model option[value="tiny"]'),
        30,
        "the model in the playground",
    )
    Select(browser.find_element(By.ID, "pg-model")).select_by_value("tiny")
    browser.find_element(By.ID, "pg-input").send_keys("Say hello")
    browser.find_element(By.ID, "pg-send").click()
    until(browser, lambda: "tok/s" in text_of(browser, "#pg-stats"), 120, "the reply's statistics")
    reply = browser.find_element(By.ID, "pg-output").text
    assert reply.strip(), "no text was streamed"
    # The request is listed once its answer is complete on the gateway's side, a moment after the page saw it end.
    record = wait_for(
        lambda: httpx.get(gw.url + "/admin/requests", timeout=10).json()["recent"], 10, "the request to be listed"
    )[0]
    assert record["stream"] and record["model"] == "tiny" and record["status"] == 200 and record["tokens_out"]
    # The page counts chunks while it streams and shows the engine's own count once the usage arrives: wait for it.
    until(
        browser,
        lambda: f"{record['tokens_out']} tokens" in text_of(browser, "#pg-stats"),
        30,
        "the page's statistics to show the engine's own token count",
    )
    assert page_errors(browser) == []


def test_a_cancel_from_the_page_ends_a_request_in_flight(gateways: Start, browser: WebDriver) -> None:
    gw = gateways()
    lines: list[str] = []

    def stream() -> None:
        body = {"model": "tiny-chat", "stream": True, "messages": [{"role": "user", "content": "slow:60"}]}
        with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, timeout=120) as response:
            lines.extend(line for line in response.iter_lines() if line)

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    wait_for(
        lambda: [r for r in httpx.get(gw.url + "/admin/requests", timeout=10).json()["in_flight"] if r["ttft_ms"]],
        60,
        "the engine to be generating",
    )
    browser.get(gw.url + "/ui")
    button = until(
        browser,
        lambda: browser.find_elements(By.CSS_SELECTOR, '#in-flight button[data-action="cancel"]'),
        30,
        "the request in flight on the page",
    )[0]
    button.click()
    client.join(30)
    assert not client.is_alive(), "the stream did not end"
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "request_cancelled"
    until(
        browser,
        lambda: not browser.find_elements(By.CSS_SELECTOR, "#in-flight tr[data-request]"),
        10,
        "the request to leave the in-flight table",
    )
    wait_for(gw.abandoned_streams, 10, "the engine to stop generating")
    assert page_errors(browser) == []


def test_with_an_admin_key_the_page_works_only_once_it_is_given(gateways: Start, browser: WebDriver) -> None:
    gw = gateways(env={"GATEWAY_ADMIN_KEY": "s3cret"})
    browser.get(gw.url + "/ui")
    form = until(
        browser, lambda: [f for f in browser.find_elements(By.ID, "key-form") if f.is_displayed()], 30, "the key form"
    )[0]
    assert not browser.find_elements(By.CSS_SELECTOR, "#engines tr[data-engine]")
    browser.find_element(By.ID, "admin-key").send_keys("wrong")
    browser.find_element(By.ID, "key-submit").click()
    until(browser, lambda: "wrong key" in text_of(browser, "#notice").lower(), 10, "the page to say the key is wrong")
    until(browser, lambda: form.is_displayed(), 10, "the form again")
    assert not browser.find_elements(By.CSS_SELECTOR, "#engines tr[data-engine]")
    field = browser.find_element(By.ID, "admin-key")
    field.clear()
    field.send_keys("s3cret")
    browser.find_element(By.ID, "key-submit").click()
    until(
        browser,
        lambda: browser.find_elements(By.CSS_SELECTOR, '#engines tr[data-engine="tiny-chat"]'),
        10,
        "the engines once the key is given",
    )
    assert browser.execute_script("return sessionStorage.getItem('mg-admin-key')") == "s3cret"
    assert browser.execute_script("return localStorage.length") == 0 and browser.get_cookies() == []
    # The only messages are the browser's own notes of the 401s that made the page ask for the key.
    unexpected = [e for e in page_errors(browser) if not (e.get("source") == "network" and " 401 " in e["message"])]
    assert unexpected == []


def test_a_download_shows_its_progress(gateways: Start, browser: WebDriver) -> None:
    with FileServer(b"\0" * (4 << 20), path="/files/tiny-Q8_0.gguf") as server:
        server.chunk_delay = 0.05  # about 3 s for the whole file: long enough to be seen
        toml = (
            f'[[models]]\nid = "tiny-chat"\nkind = "gguf"\nurl = "{server.url}"\nfile = "tiny/tiny-Q8_0.gguf"\n'
            f'sha256 = "{server.sha256}"\n'
        )
        gw = gateways(toml)
        browser.get(gw.url + "/ui")
        until(
            browser,
            lambda: browser.find_elements(By.CSS_SELECTOR, '#engines tr[data-engine="tiny-chat"]'),
            30,
            "the page",
        )
        pull = threading.Thread(
            target=lambda: httpx.post(gw.url + "/api/pull", json={"model": "tiny-chat"}, timeout=120), daemon=True
        )
        pull.start()
        entry = '#downloads [data-file="tiny/tiny-Q8_0.gguf"]'
        bar = until(
            browser, lambda: browser.find_elements(By.CSS_SELECTOR, entry + " progress"), 30, "the download on the page"
        )[0]
        until(
            browser,
            lambda: 0 < float(bar.get_attribute("value") or 0) < float(bar.get_attribute("max") or 1),
            30,
            "a bar part way",
        )
        pull.join(60)
        until(browser, lambda: "done" in text_of(browser, entry).lower(), 10, "the download shown done")
    assert page_errors(browser) == []
