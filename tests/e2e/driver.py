"""Driving the dashboard in Chromium the way a person does: clicks, typing, and mouse drags on the canvas."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the dashboard package, for its canvas geometry
from dashboard.imaging import canvas_scale  # noqa: E402

ARTIFACTS = ROOT / "artifacts"
RUN_TIMEOUT_MS = 240_000  # one script run: an edit solves and renders on 2 busy cores
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright's own browser downloads are never used
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
    "--no-first-run", "--disable-dev-shm-usage",
]
STARTUP_TIMEOUT_S = 90
CANVAS_SCALE = canvas_scale(64)  # the embedded 64-pixel images, as the dashboard enlarges them for brushing
CANVAS = "canvas.strokes"  # the brush canvas's drawing layer (dashboard.canvas)
BRUSH = 14  # the brush slider's default width, in canvas pixels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """Run `streamlit run dashboard` as users do on a free localhost port; yields its URL once healthy, always
    stops it (its whole process group). RuntimeError, with the log's tail, when it does not come up."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "streamlit", "run", "dashboard", "--server.headless", "true",
        "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
    ]
    with open(log, "wb") as out:
        # A new session, so the whole process group (the server and anything it spawned) can be stopped.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit was not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def server_env(cache: Path) -> dict[str, str]:
    """The server's environment: the tiny test model importable as an entry point, and a fresh statistics cache
    under ``cache``, as on a new machine."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, XDG_CACHE_HOME=str(cache))


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


def stroke_on_canvas(page, points: list[tuple[float, float]]) -> float:
    """A mouse drag on the brush canvas through ``points`` in its own pixels (x, y); returns ``time.perf_counter()``
    just before the mouse-up, when the canvas sends the stroke."""
    canvas = page.locator(CANVAS).first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    size = canvas.evaluate("(c) => [c.width, c.height]")  # canvas pixels per CSS pixel, whatever the layout
    at = [(box["x"] + x * box["width"] / size[0], box["y"] + y * box["height"] / size[1]) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=4)
    start = time.perf_counter()
    page.mouse.up()
    return start


def drag_on_canvas(page, points: list[tuple[float, float]]) -> None:
    """A brush stroke through ``points`` given in the canvas's own pixels (x, y), and its script run."""
    stroke_on_canvas(page, points)
    wait_idle(page)


def pick_image(page, seed: int) -> None:
    """Click the grid's picture of ``seed``, which makes it the image being brushed."""
    page.locator(f"figure[data-seed='{seed}']").click()
    wait_idle(page)
    page.get_by_text(f" on seed {seed}: ").wait_for(timeout=RUN_TIMEOUT_MS)


def grid_pixels(page, count: int) -> list[np.ndarray]:
    """The first ``count`` grid pictures exactly as the browser shows them (RGB arrays): the grid sends them
    inline as PNG data URLs."""
    images = page.locator("img.dissect-thumb")
    images.nth(count - 1).wait_for()
    urls = images.evaluate_all("(imgs) => imgs.map((i) => i.src)")[:count]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB")) for u in urls]


def grid_caption(page, index: int) -> str:
    """The caption of the grid's picture ``index``, e.g. "seed 7 · original"."""
    return page.locator("img.dissect-thumb").nth(index).get_attribute("alt")


def brush_mode(page, mode: str) -> None:
    """Choose the brush: "Copy", "Paste" or "Context"."""
    page.get_by_test_id("stButtonGroup").get_by_text(mode, exact=True).click()
    wait_idle(page)


def brush_box(page, seed: int, box: tuple[int, int, int, int], mode: str = "Context") -> None:
    """Click image ``seed`` in the grid and paint over ``box`` (y0, y1, x0, x1 in image pixels, inclusive) row by
    row in the current brush ``mode``, each stroke a mouse drag."""
    pick_image(page, seed)
    y0, y1, x0, x1 = (v * CANVAS_SCALE for v in box)
    y1, x1 = y1 + CANVAS_SCALE, x1 + CANVAS_SCALE
    rows = max(1, math.ceil((y1 - y0) / BRUSH))
    for n in range(1, rows + 1):
        y = y0 + (n - 0.5) * (y1 - y0) / rows
        drag_on_canvas(page, [(x0, y), ((x0 + x1) / 2, y), (x1, y)])
        page.get_by_text(f"{mode} on seed {seed}: {n} stroke").wait_for(timeout=RUN_TIMEOUT_MS)


def embedded_scenes(n: int = 60):
    """The embedded generator's sampler, the segmenter, and its labels ``(n, H, W)`` of seeds ``0 .. n-1``: what
    the browser tests brush and then measure with. Skips the test where the shipped weights are not installed."""
    import pytest
    import torch

    from dissect.models import loaders
    from dissect.models.segmenter import load_segmenter

    if not (loaders.WEIGHTS_DIR / "spires-generator.safetensors").exists():
        pytest.skip("the embedded generator's weights are not installed")
    G, sampler = loaders.load("spires")
    seg = load_segmenter()
    with torch.no_grad():
        return sampler, seg, seg.segment(G(sampler(list(range(n)))))


def download(page, button: str, path: Path) -> Path:
    """Click the download ``button`` and save what the page sends to ``path``."""
    with page.expect_download() as sent:
        page.get_by_role("button", name=button).click()
    sent.value.save_as(path)
    return path


def exception_boxes(page) -> list[str]:
    """The text of every exception box on the page (Streamlit's red traceback boxes)."""
    return page.get_by_test_id("stException").all_inner_texts()
