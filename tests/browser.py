"""Headless Chromium for the console's tests, driven by Selenium with the distribution's chromedriver.

Selenium Manager would download a driver from the internet when it finds none; this machine is offline, so the
browser and its driver are the Debian packages (`apt-get install chromium chromium-driver`, done by `.ci/run`).
The browser's console and network logs are kept, so a test can assert that the page logged no error and loaded
nothing from anywhere but the gateway.
"""

from __future__ import annotations

import shutil
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def available() -> str | None:
    """Why no browser can run here (None: one can)."""
    if not any(shutil.which(name) for name in BROWSERS):
        return "no Chromium on PATH (apt-get install chromium chromium-driver)"
    if not any(shutil.which(name) for name in DRIVERS):
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def chromium(width: int = 1400, height: int = 1000) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    binary = next(path for name in BROWSERS if (path := shutil.which(name)))
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = next(path for name in DRIVERS if (path := shutil.which(name)))
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    browser.set_page_load_timeout(60)
    return browser


def console_messages(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    """What the page wrote to the browser's console (and the browser's own errors about the page) since the last
    call: entries with ``level`` and ``message``."""
    entries: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    return entries


def requested_urls(browser: webdriver.Chrome) -> list[str]:
    """Every URL the page asked the network for since the last call (from the DevTools performance log)."""
    import json

    urls = []
    for entry in browser.get_log("performance"):  # type: ignore[no-untyped-call]
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
