"""The brush canvas: freehand strokes over a picture, reported to the script the moment a stroke ends.

Our own component (streamlit-drawable-canvas waits a fixed 200 ms after each stroke before it reports, which is
most of the 300 ms a redraw may take). It draws a picture, freehand strokes of a width and colour (mouse, pen or
touch), undo and redo of strokes, and at mount the strokes of an earlier drawing. On pointer-up it sends the
drawing (``{"objects": [{"type": "path", "width", "color", "points"}]}``, what :func:`draw` takes back as
``initial``) and the strokes' layer as an RGBA PNG, which :func:`dashboard.imaging.canvas_mask` turns into a mask.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import streamlit as st
from PIL import Image

from dashboard.browse import component_data, data_url

COMPONENT = "dissect_brush"

_HTML = """
<div class="brush">
  <div class="tools">
    <button class="undo" type="button" title="Take back the last stroke">&#8630; Undo stroke</button>
    <button class="redo" type="button" title="Draw again the stroke taken back">&#8631; Redo stroke</button>
  </div>
  <div class="sheet"><img class="picture" alt=""><canvas class="strokes"></canvas><div class="tip"></div></div>
</div>
"""

_JS = """
function stroke(ctx, s) {
  ctx.strokeStyle = ctx.fillStyle = s.color;
  ctx.lineWidth = s.width;
  ctx.beginPath();
  if (s.points.length === 1) {  // a click paints a dot
    ctx.arc(s.points[0][0], s.points[0][1], s.width / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.moveTo(...s.points[0]);
  s.points.slice(1).forEach((p) => ctx.lineTo(...p));
  ctx.stroke();
}

function mount(root) {
  const canvas = root.querySelector('canvas.strokes');
  const ctx = canvas.getContext('2d');
  const tip = root.querySelector('.tip');
  const [undo, redo] = root.querySelectorAll('.tools button');
  const s = { strokes: [], undone: [], current: null, data: null, send: null };
  const paint = () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.lineCap = ctx.lineJoin = 'round';
    s.strokes.forEach((x) => stroke(ctx, x));
    if (s.current) stroke(ctx, s.current);
    undo.disabled = !s.strokes.length;
    redo.disabled = !s.undone.length;
  };
  // Sent at once, no debounce: the grid shows a stroke in one round trip after the pointer is lifted.
  const report = () => s.send('drawing', { objects: s.strokes, mask: canvas.toDataURL('image/png') });
  const at = (e) => {  // canvas pixels, whatever size the page lays the canvas out at
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  const follow = (e) => {  // a ring of the brush's size under the pointer
    const r = canvas.getBoundingClientRect();
    const d = s.data.strokeWidth * r.width / canvas.width;
    Object.assign(tip.style, { display: 'block', width: `${d}px`, height: `${d}px`,
      left: `${e.clientX - r.left - d / 2}px`, top: `${e.clientY - r.top - d / 2}px` });
  };
  canvas.addEventListener('pointerdown', (e) => {
    if (e.button !== 0) return;
    canvas.setPointerCapture(e.pointerId);
    s.current = { type: 'path', width: s.data.strokeWidth, color: s.data.color, points: [at(e)] };
    paint();
  });
  canvas.addEventListener('pointermove', (e) => {
    follow(e);
    if (!s.current) return;
    s.current.points.push(...(e.getCoalescedEvents?.() || [e]).map(at));
    paint();
  });
  const end = () => {
    if (!s.current) return;
    s.strokes.push(s.current);
    s.current = null;
    s.undone = [];
    paint();
    report();
  };
  canvas.addEventListener('pointerup', end);
  canvas.addEventListener('pointercancel', end);
  canvas.addEventListener('pointerleave', () => { tip.style.display = 'none'; });
  undo.onclick = () => { s.undone.push(s.strokes.pop()); paint(); report(); };
  redo.onclick = () => { s.strokes.push(s.undone.pop()); paint(); report(); };
  s.paint = paint;
  return s;
}

export default function (component) {
  const { parentElement, setStateValue } = component;
  const [data] = component.data;  // wrapped in a list (browse.component_data)
  const root = parentElement.querySelector('.brush');
  const canvas = root.querySelector('canvas.strokes');
  let s = root.dissectBrush;
  if (!s) {  // mounting: the drawing stored for this canvas comes back; later data never replaces strokes
    s = root.dissectBrush = mount(root);
    canvas.width = data.width;
    canvas.height = data.height;
    s.strokes = (data.initial?.objects || []).filter((x) => x.type === 'path' && x.points?.length);
  }
  s.data = data;
  s.send = setStateValue;
  const picture = root.querySelector('img.picture');
  if (picture.getAttribute('src') !== data.picture) picture.src = data.picture;
  Object.assign(root.querySelector('.sheet').style, { width: `${data.width}px`,
    aspectRatio: `${data.width} / ${data.height}` });
  s.paint();
}
"""

_CSS = """
.brush { font-family: var(--st-font); }
.tools { display: flex; gap: 6px; margin-bottom: 6px; }
.tools button {
  font: inherit; font-size: 0.85rem; padding: 2px 10px; cursor: pointer; border-radius: 6px;
  color: var(--st-text-color); background: var(--st-background-color); border: 1px solid #8886;
}
.tools button:disabled { opacity: 0.4; cursor: default; }
.sheet { position: relative; max-width: 100%; line-height: 0; }
.picture, .strokes { width: 100%; height: 100%; display: block; }
.picture { image-rendering: pixelated; }
.strokes { position: absolute; inset: 0; cursor: none; touch-action: none; }
.tip {
  display: none; position: absolute; pointer-events: none; border-radius: 50%;
  border: 1px solid #fff; box-shadow: 0 0 0 1px #000;
}
"""

_brush = st.components.v2.component(COMPONENT, html=_HTML, js=_JS, css=_CSS)


def draw(picture: np.ndarray, scale: int, stroke_width: int, color: str, initial: dict | None,
         key: str) -> tuple[dict, np.ndarray] | None:
    """The canvas over ``picture (h, w, 3)`` uint8, shown ``scale`` times enlarged (unblurred); strokes of
    ``stroke_width`` canvas pixels in the CSS ``color``. ``initial`` is drawn when the canvas mounts (later values
    are ignored: while mounted the canvas owns its drawing; a new ``key`` gives a fresh canvas).

    Returns the drawing last sent (after a stroke, an undo or a redo) and its strokes' RGBA pixels
    ``(h * scale, w * scale, 4)`` when it differs from ``initial`` (pass the drawing stored so far), else None:
    the pixels are decoded only for a new drawing, not on every rerun.
    """
    h, w = picture.shape[:2]
    data = {"picture": data_url(picture), "width": w * scale, "height": h * scale, "strokeWidth": stroke_width,
            "color": color, "initial": initial}
    sent = _brush(data=component_data(data), key=key, default={"drawing": None}, on_drawing_change=lambda: None,
                  width="content")
    drawing = sent.get("drawing") if sent is not None else None
    if not drawing or {"objects": drawing["objects"]} == initial:
        return None
    _, encoded = drawing["mask"].split(",", 1)
    rgba = np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGBA"))
    return {"objects": drawing["objects"]}, rgba


def message(drawing: dict, rgba: np.ndarray) -> dict:
    """What the browser sends for ``drawing`` and its strokes' pixels ``rgba (h, w, 4)`` uint8: the component's
    state, for tests and benchmarks that stroke without a browser (``session_state[key] = message(...)``)."""
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return {"drawing": {**drawing, "mask": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
