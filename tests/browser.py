"""Headless Debian chromium driven by selenium through Debian's chromedriver (nothing is downloaded).

``scripts/setup.sh`` installs ``chromium`` and ``chromium-driver``; a machine without them fails the
browser tests rather than skipping them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def chromium_driver(width: int = 1280, height: int = 900, extra_flags: tuple[str, ...] = ()):
    """A fresh headless chromium (its own throwaway profile) under selenium. Call ``.quit()`` when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        assert os.path.exists(path), (
            f"{path} is missing: run scripts/setup.sh (it installs the Debian package {package})"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never fetch a driver or browser of its own
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*FLAGS, *extra_flags, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    original_quit = driver.quit

    def quit_and_clean() -> None:
        try:
            original_quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    message: Callable[[], str] = lambda: "timed out",
    interval: float = 0.25,
) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes (AssertionError).

    Exceptions from a page that is still changing (an element not there yet, or replaced) count as "not yet".
    """
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while True:
        try:
            value = condition()
            if value:
                return value
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        if time.time() > deadline:
            raise AssertionError(message())
        time.sleep(interval)
