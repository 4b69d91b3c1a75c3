"""Debian's Chromium driven by Playwright: no browser download, a fresh profile per test."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# The machine's network is closed: without the background-networking flags Chromium keeps
# trying to reach Google's services at every start.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Skips without Chromium, except in CI, which must install it (.ci/run)."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must install Debian's chromium ({CHROMIUM} is missing; see .ci/run)")
    pytest.skip(f"needs {CHROMIUM}: apt-get install chromium chromium-driver")


@dataclass
class Browser:
    context: Any  # playwright.async_api.BrowserContext
    console_errors: list[str] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)  # every response a page received


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        browser = Browser(context)

        def watch(page: Any) -> None:
            page.on("console", lambda m: m.type == "error" and browser.console_errors.append(m.text))
            page.on("pageerror", lambda e: browser.console_errors.append(f"uncaught: {e}"))
            page.on("response", lambda r: browser.responses.append(r))

        context.on("page", watch)
        for page in context.pages:
            watch(page)
        try:
            yield browser
        finally:
            await context.close()
