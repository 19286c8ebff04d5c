"""Driving the dashboard in Chromium the way a person does: clicks, typing, and mouse drags on the canvas."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
RUN_TIMEOUT_MS = 240_000  # one script run: an edit solves and renders on 2 busy cores


def wait_idle(page) -> None:
    """Wait until no script run is under way or requested (Streamlit marks its state on the app's root)."""
    idle = ("() => document.querySelector('[data-test-script-state]')"
            "?.getAttribute('data-test-script-state') === 'notRunning'")
    for _ in range(2):  # twice, apart: an event sent just before (a mouse-up) may start its rerun a moment later
        page.wait_for_timeout(400)
        page.wait_for_function(idle, timeout=RUN_TIMEOUT_MS)


def screenshot(page, name: str) -> Path:
    """A full-page screenshot under artifacts/ (a CI artifact)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def open_entry_point(page, spec: str) -> None:
    page.get_by_text("Your model (entry point)").click()
    box = page.get_by_label("Entry point", exact=True)
    box.fill(spec)
    box.press("Enter")
    wait_idle(page)


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``label`` (type to filter, then Enter)."""
    page.get_by_label(label, exact=True).click()
    page.keyboard.type(option)
    page.get_by_role("option", name=option).first.click()
    wait_idle(page)


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    wait_idle(page)


def drag_on_canvas(page, points: list[tuple[float, float]]) -> None:
    """A brush stroke through ``points`` given in the canvas's own pixels (x, y)."""
    canvas = page.locator("canvas.upper-canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x0, y0 = points[0]
    page.mouse.move(box["x"] + x0, box["y"] + y0)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=4)
    page.mouse.up()
    wait_idle(page)


# Reads the pixels the browser decoded (a same-origin image, so the canvas is not tainted) as a PNG data URL.
_PIXELS_JS = """(imgs) => imgs.map((img) => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    c.getContext('2d').drawImage(img, 0, 0);
    return c.toDataURL('image/png');
})"""


def grid_pixels(page, count: int) -> list[np.ndarray]:
    """The first ``count`` grid images exactly as the browser shows them (RGB arrays)."""
    images = page.locator("[data-testid='stImage'] img")
    images.nth(count - 1).wait_for()
    page.wait_for_function("(n) => [...document.querySelectorAll(\"[data-testid='stImage'] img\")].slice(0, n)"
                           ".every((i) => i.complete && i.naturalWidth > 0)", arg=count)
    urls = images.evaluate_all(_PIXELS_JS)[:count]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB")) for u in urls]
