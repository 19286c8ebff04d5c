"""End to end: the real dashboard in a real Chromium."""

from __future__ import annotations

import pytest

from conftest import screenshot

pytestmark = pytest.mark.browser

TINY = "tiny_model:generator"


def wait_idle(page) -> None:
    """Streamlit shows a 'running' status widget while a script runs; wait until it is gone."""
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000)


def test_opens_on_the_embedded_model_or_says_why(page, dashboard_url: str) -> None:
    page.goto(dashboard_url)
    page.get_by_text("dissect").first.wait_for()
    wait_idle(page)
    screenshot(page, "dashboard_start")


def open_entry_point(page, spec: str) -> None:
    page.get_by_text("Your model (entry point)").click()
    box = page.get_by_label("Entry point", exact=True)
    box.fill(spec)
    box.press("Enter")
    wait_idle(page)


def test_entry_point_shows_the_grid(page, dashboard_url: str) -> None:
    page.goto(dashboard_url)
    wait_idle(page)
    open_entry_point(page, TINY)
    page.get_by_text("seed 11").wait_for()
    assert page.locator("[data-testid='stImage']").count() >= 12
    screenshot(page, "dashboard_grid")
