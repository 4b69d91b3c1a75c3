"""A headless Debian Chromium per test, with a fresh profile under the test's tmp folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.browser import Browser, chromium, require_chromium


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    require_chromium()
    async with chromium(tmp_path / "chromium-profile") as found:
        yield found
