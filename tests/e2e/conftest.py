"""A real `streamlit run dashboard` on a free localhost port, and a headless Debian Chromium driven by Playwright."""

from __future__ import annotations

from typing import Iterator

import pytest
from driver import CHROMIUM, CHROMIUM_ARGS, RUN_TIMEOUT_MS, serve, server_env


@pytest.fixture(scope="module")
def dashboard_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start the dashboard exactly as users do (`streamlit run dashboard`), wait for health, always stop it."""
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    try:
        with serve(server_env(tmp_path_factory.mktemp("cache")), log) as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); "
                    "CI does, and Playwright's own browser downloads are never used.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, dashboard_url: str) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(RUN_TIMEOUT_MS)
    try:
        yield page
    finally:
        context.close()
