"""End to end: a real `streamlit run dashboard` driven in Debian's Chromium, strokes drawn with the mouse."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from driver import (
    CANVAS,
    RUN_TIMEOUT_MS,
    brush_box,
    choose,
    download,
    embedded_scenes,
    grid_caption,
    grid_pixels,
    open_entry_point,
    pick_image,
    screenshot,
    tab,
    wait_idle,
)

pytestmark = pytest.mark.browser

TINY = "tiny_model:generator"
GRID = 12


def remove_watermark_with_brushed_context(page) -> None:
    tab(page, "Recipes")
    page.get_by_text("My brushed context").click()
    wait_idle(page)
    page.get_by_role("button", name="Remove the watermark").click()
    page.get_by_text("Erased.").wait_for(timeout=RUN_TIMEOUT_MS)
    wait_idle(page)


def undo(page) -> None:
    tab(page, "Edit")
    page.get_by_role("button", name="Undo", exact=True).click()
    page.get_by_text("Undid the edit").wait_for(timeout=RUN_TIMEOUT_MS)


def grid_shows(page, state: str) -> list[np.ndarray]:
    """The Images page's grid once every caption says ``state`` ("original" or "edited")."""
    tab(page, "Images")
    page.get_by_text(f"seed {page_last_seed(page)} · {state}").wait_for(timeout=RUN_TIMEOUT_MS)
    return grid_pixels(page, GRID)


def page_last_seed(page) -> str:
    return grid_caption(page, GRID - 1).split(" ·")[0].removeprefix("seed ")


def test_an_entry_point_model_opens_and_takes_strokes(page, dashboard_url: str) -> None:
    page.goto(dashboard_url)
    wait_idle(page)
    open_entry_point(page, TINY)
    choose(page, "Layer", "synthesis.b32.conv1")
    before = grid_shows(page, "original")
    brush_box(page, 4, (2, 9, 2, 20))
    after = grid_shows(page, "original")
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b)]
    assert changed == [4]  # the brushed region is tinted on its image, and only there
    page.get_by_text("Context: 1 image(s): seeds 4").wait_for()
    screenshot(page, "entry_point_brushed")

    # The canvas's own controls: undo and redo a stroke; the strokes come back when the image is brushed again.
    page.get_by_role("button", name="Undo stroke").click()
    page.get_by_text("Context on seed 4: 3 strokes").wait_for()
    page.get_by_role("button", name="Redo stroke").click()
    page.get_by_text("Context on seed 4: 4 strokes").wait_for()
    wait_idle(page)
    assert np.array_equal(grid_shows(page, "original")[4], after[4])
    share = painted_share(page)
    pick_image(page, 5)
    assert painted_share(page) == 0  # a fresh canvas for an image not brushed
    pick_image(page, 4)
    assert painted_share(page) == share > 0  # seed 4's strokes, redrawn as they were


def painted_share(page) -> float:
    """The share of the brush canvas's pixels that are painted."""
    return page.locator(CANVAS).first.evaluate(
        "(c) => { const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < a.length; i += 4) n += a[i] > 0; return n / (c.width * c.height); }")


def test_a_stroke_shows_while_it_is_drawn(page, dashboard_url: str) -> None:
    """A newcomer sees the stroke under the pointer before lifting it, in the brush's colour."""
    page.goto(dashboard_url)
    wait_idle(page)
    open_entry_point(page, TINY)
    canvas = page.locator(CANVAS).first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + 200, box["y"] + 20, steps=8)
    assert painted_share(page) > 0.01  # drawn while the button is still down, nothing sent yet
    screenshot(page, "stroke_while_drawing")
    page.mouse.up()
    page.get_by_text("Context on seed 0: 1 stroke,").wait_for()


def test_remove_watermark_on_the_embedded_generator(page, dashboard_url: str, tmp_path: Path) -> None:
    """The issue's flow: choose a layer, brush context on three images, "Remove watermark", the edited grid
    differs, the library measures less watermark on the same seeds, undo gives the original images back."""
    from dashboard.defaults import DEFAULT_LAYER
    from dashboard.imaging import format_seeds
    from dissect.models import loaders
    from dissect.models.segmenter import present
    from dissect.models.world import CLASSES
    from dissect.rewrite import load as load_edits

    sampler, seg, labels = embedded_scenes(60)
    marked = present(labels, "watermark").nonzero()[:, 0].tolist()
    assert len(marked) >= 3, "the generator should draw watermarks on some of seeds 0-59"
    context = marked[:3]
    seeds = sorted(context + [s for s in range(60) if s not in context][: GRID - 3])

    page.goto(dashboard_url)
    wait_idle(page)
    choose(page, "Layer", DEFAULT_LAYER)
    page.get_by_label("Seeds", exact=True).fill(format_seeds(seeds))
    page.get_by_label("Seeds", exact=True).press("Enter")
    wait_idle(page)
    for seed in context:
        ys, xs = (labels[seed] == CLASSES.index("watermark")).nonzero(as_tuple=True)
        brush_box(page, seed, (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())))
    original = grid_shows(page, "original")
    screenshot(page, "watermark_brushed")

    remove_watermark_with_brushed_context(page)
    screenshot(page, "watermark_recipe")
    shown = page.get_by_test_id("stMetric").first.inner_text()  # "… prevalence … 58.0% -21.0 points (was 79.0%)"
    assert float(re.search(r"([-+]\d+\.\d) points", shown)[1]) < 0, shown
    edited = grid_shows(page, "edited")
    assert sum(not np.array_equal(a, b) for a, b in zip(original, edited)) >= 3
    screenshot(page, "watermark_edited")

    # The library, on the same seeds, with the edit file the page offers for download.
    tab(page, "Edit")
    edit_file = download(page, "Download edit file", tmp_path / "edits.safetensors")
    edited_G, _ = loaders.load("spires")
    load_edits(str(edit_file), edited_G)
    with torch.no_grad():
        after = seg.segment(edited_G(sampler(seeds)))
        before = labels[seeds]
    assert present(after, "watermark").sum() < present(before, "watermark").sum()
    watermark = CLASSES.index("watermark")
    assert (after == watermark).sum() < (before == watermark).sum()

    undo(page)
    assert all(np.array_equal(a, b) for a, b in zip(original, grid_shows(page, "original")))
    screenshot(page, "watermark_undone")
