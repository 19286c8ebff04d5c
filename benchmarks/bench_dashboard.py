"""Speed of the dashboard on the default model, through its real script (streamlit's AppTest, no browser).

    python benchmarks/bench_dashboard.py [--model spires] [--repeats 7] [--threads 2]

* ``grid_redraw_ms``: a brush stroke arrives from the canvas (as the browser sends it) and the Images page
  reruns: the stroke becomes a mask, and the 12-image grid is drawn again with the brushed regions. Target
  <= 300 ms on 2 cores. The same with the *Key matches* overlay (context directions, matches over the grid,
  a threshold over the pool) is printed too.
* ``edit_apply_s``: "Apply edit" on the Edit page, erasing a context brushed on three images (the watermarks the
  segmenter finds on the first three seeds that show one, over their bounding boxes, as a user would brush them;
  fixed boxes without a segmenter), with the sidebar's default rank and solver, until the page shows the edited
  before/after pairs and the history. Target <= 3 s. Each apply is undone (untimed) before the next. The same
  with the closed form only is printed too.

The layer's key statistics are collected (or read from the disk cache) before timing; their first-use cost
is printed separately. Medians over ``--repeats`` runs resist other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard import browse, derived, workspace  # noqa: E402
from dashboard.defaults import CANVAS_SCALE, DEFAULT_MODEL  # noqa: E402
from dashboard.imaging import format_seeds  # noqa: E402
from dissect.models.segmenter import present  # noqa: E402
from dissect.models.world import CLASSES  # noqa: E402

APP = str(ROOT / "dashboard" / "streamlit_app.py")


def watermarked(ws: workspace.Workspace) -> list[tuple[int, tuple[int, int, int, int]]]:
    """Three seeds of 0-59 showing a watermark and its bounding box (image pixels, end exclusive); fixed boxes on
    seeds 1, 4, 7 without a segmenter or watermarks."""
    seg = derived.segmenter()
    if seg is not None:
        with torch.no_grad():
            labels = seg.segment(ws.images(list(range(60))))
        found = present(labels, "watermark").nonzero()[:, 0].tolist()[:3]
        if len(found) == 3:
            boxes = []
            for seed in found:
                ys, xs = (labels[seed] == CLASSES.index("watermark")).nonzero(as_tuple=True)
                boxes.append((seed, (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)))
            return boxes
    return [(seed, (5, 20, 5, 30)) for seed in (1, 4, 7)]


def stroke(at: AppTest, seed: int, box: tuple[int, int, int, int], stroke_id: int) -> float:
    """Send what the canvas sends for one painted box (image pixels) on ``seed``; seconds of the rerun it causes."""
    ws = at.session_state[workspace.KEY]
    key = f"canvas-Context-{seed}-{ws.brush.generation.get(('Context', seed), 0)}"
    size = int(ws.images([seed])[0].shape[-1]) * CANVAS_SCALE
    rgba = np.zeros((size, size, 4), np.uint8)
    y0, y1, x0, x1 = (v * CANVAS_SCALE for v in box)
    rgba[y0:y1, x0:x1] = (255, 210, 0, 140)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    at.session_state[key] = {"drawing": {"raw": {"objects": [{"type": "path", "id": stroke_id}]}, "data": url}}
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(at.exception)
    return seconds


def select_seed(at: AppTest, seed: int) -> None:
    at.selectbox(key="brush_seed").set_value(seed).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name or entry point 'pkg.mod:fn'")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    at = AppTest.from_file(APP, default_timeout=900)
    if args.model != DEFAULT_MODEL:
        at.session_state["model_source"] = "Your model (entry point)"
        at.session_state["entry_point"] = args.model
    at.run()
    ws = at.session_state[workspace.KEY] if workspace.KEY in at.session_state else None
    if ws is None or at.exception:
        sys.exit(f"Could not open {args.model!r}: {[e.value for e in at.error]} {at.exception}")
    with tempfile.TemporaryDirectory() as tmp:
        workspace.STATS_DIR = Path(tmp)  # first use measured from scratch, never from an earlier run's cache
        start = time.perf_counter()
        ws.memory()
        print(f"model={args.model} layer={ws.layer} threads={args.threads} "
              f"stats_first_use_s={time.perf_counter() - start:.2f}")

        context = watermarked(ws)
        at.text_input(key="seeds").set_value(format_seeds(sorted({s for s, _ in context} | set(range(12))))).run()
        for i, (seed, box) in enumerate(context):
            select_seed(at, seed)
            stroke(at, seed, box, i)
        redraw: dict[str, list[float]] = {browse.PLAIN: [], browse.MATCHES: []}
        n = len(context)
        last = context[-1][0]
        for overlay, times in redraw.items():
            at.segmented_control(key="overlay").set_value(overlay).run()
            select_seed(at, last)
            stroke(at, last, (0, 3, 0, 3), n)  # warm-up: caches of this overlay
            for r in range(args.repeats):
                n += 1
                y = 40 + 2 * (r % 10)  # each stroke changes the mask, so nothing derived from it is reused
                times.append(stroke(at, last, (y, y + 3, 10, 50), n))
            print(f"grid_redraw overlay={overlay!r}: median_ms={1000 * statistics.median(times):.0f} "
                  f"best_ms={1000 * min(times):.0f}")
        at.segmented_control(key="overlay").set_value(browse.PLAIN).run()
        stroke(at, last, context[-1][1], n + 1)  # that canvas back to its watermark alone
        at.session_state["page"] = "Edit"
        at.run()
        apply_s: dict[bool, float] = {}
        for refine in (True, False):
            at.radio(key="refine").set_value(refine).run()
            times, solves = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                at.button(key="apply").click().run()
                times.append(time.perf_counter() - start)
                if at.exception or len(ws.rewriter.history) != 1:
                    sys.exit(f"The edit was not applied: {[e.value for e in [*at.error, *at.warning]]} {at.exception}")
                edit = ws.rewriter.history[-1]
                solves.append(edit.seconds)
                at.button(key="undo").click().run()
            apply_s[refine] = statistics.median(times)
            print(f"edit_apply (rank={edit.rank}, solver={edit.solver}): median_s={apply_s[refine]:.2f} "
                  f"best_s={min(times):.2f} (of which solving: median_s={statistics.median(solves):.2f})")
    print(f"bench_dashboard: grid_redraw_ms={1000 * statistics.median(redraw[browse.PLAIN]):.0f} "
          f"edit_apply_s={apply_s[True]:.2f}")


if __name__ == "__main__":
    main()
