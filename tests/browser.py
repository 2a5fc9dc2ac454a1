"""Debian's chromium driven by Playwright, for the browser tests.

``CHROMIUM`` is the binary (``PUSHSVC_TEST_CHROMIUM`` or ``chromium`` on PATH; None
when missing, and the browser tests are skipped). ``.ci/run`` installs Debian's
``chromium`` package, so CI runs them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

CHROMIUM = os.environ.get("PUSHSVC_TEST_CHROMIUM") or shutil.which("chromium")

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@asynccontextmanager
async def launch() -> AsyncIterator[Any]:
    """A headless chromium (a Playwright ``Browser``), closed on exit."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            await b.close()
