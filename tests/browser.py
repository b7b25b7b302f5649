"""Debian's Chromium driven by selenium, for the tests that look at a page as a person does (the serve page, the
docs site). `.ci/run` installs Chromium; where it is missing those tests skip, saying so."""

from __future__ import annotations

import shutil

import pytest


def chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or None where either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


needs_chromium = pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium and chromium-driver (apt "
                                    "install chromium chromium-driver; .ci/run installs them)")


def headless_chrome(width: int, height: int):  # noqa: ANN201 - selenium's WebDriver, imported here
    """A headless Chromium window of this size; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium()  # type: ignore[misc]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))
