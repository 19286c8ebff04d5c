"""End to end: a real `streamlit run dashboard` driven in Debian's Chromium, strokes drawn with the mouse."""

from __future__ import annotations

import numpy as np
import pytest

from driver import RUN_TIMEOUT_MS, choose, drag_on_canvas, grid_pixels, open_entry_point, screenshot, tab, wait_idle

pytestmark = pytest.mark.browser

TINY = "tiny_model:generator"
GRID = 12
CANVAS_SCALE = 4  # dashboard.defaults.CANVAS_SCALE: a 64-pixel image is brushed on a 256-pixel canvas


def brush_context(page, seed: int, box: tuple[int, int, int, int]) -> None:
    """Choose image ``seed`` and paint over ``box`` (y0, y1, x0, x1 in image pixels) with two mouse strokes."""
    choose(page, "Image", f"seed {seed}")
    y0, y1, x0, x1 = (v * CANVAS_SCALE for v in box)
    for n, y in enumerate((y0 + (y1 - y0) / 3, y0 + 2 * (y1 - y0) / 3), start=1):
        drag_on_canvas(page, [(x0, y), ((x0 + x1) / 2, y), (x1, y)])
        page.get_by_text(f"Context on seed {seed}: {n} stroke").wait_for(timeout=RUN_TIMEOUT_MS)


def remove_watermark_with_brushed_context(page) -> None:
    tab(page, "Recipes")
    page.get_by_text("My brushed context").click()
    wait_idle(page)
    page.get_by_role("button", name="Remove the watermark").click()
    page.get_by_text("Erased.").wait_for(timeout=RUN_TIMEOUT_MS)
    wait_idle(page)


def undo(page) -> None:
    tab(page, "Edit")
    page.get_by_role("button", name="Undo").click()
    wait_idle(page)
    page.get_by_text("Undid the edit").wait_for()


def test_brush_erase_undo_on_an_entry_point_model(page, dashboard_url: str) -> None:
    page.goto(dashboard_url)
    wait_idle(page)
    open_entry_point(page, TINY)
    choose(page, "Layer", "synthesis.b16.conv1")
    for seed in (1, 4, 7):
        brush_context(page, seed, (8, 40, 8, 40))
    screenshot(page, "tiny_brushed")
    original = grid_pixels(page, GRID)  # with the brushed regions tinted
    remove_watermark_with_brushed_context(page)
    tab(page, "Images")
    page.get_by_text(f"seed {GRID - 1} · edited").wait_for()
    edited = grid_pixels(page, GRID)
    assert any(not np.array_equal(a, b) for a, b in zip(original, edited))
    screenshot(page, "tiny_edited")
    undo(page)
    tab(page, "Images")
    page.get_by_text(f"seed {GRID - 1} · original").wait_for()
    assert all(np.array_equal(a, b) for a, b in zip(original, grid_pixels(page, GRID)))
    screenshot(page, "tiny_undone")
