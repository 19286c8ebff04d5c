"""Brushing on an image: context regions on several images, a region to copy, and where to paste it.

Masks leave this page as ``(H, W)`` float tensors at image resolution (see :func:`dashboard.imaging.canvas_mask`).
"""

from __future__ import annotations

import streamlit as st
import torch
from PIL import Image

from dashboard import derived
from dashboard.defaults import CANVAS_SCALE, DISPLAY_SCALE
from dashboard.editing import preview_paste
from dashboard.imaging import canvas_mask, to_uint8
from dashboard.requests import Settings
from dashboard.workspace import Brush, Workspace
from dissect.visualize import to_unit

CONTEXT, COPY, PASTE = "Context", "Copy", "Paste"
MODES = (CONTEXT, COPY, PASTE)
STROKES = {CONTEXT: "rgba(255, 210, 0, 0.55)", COPY: "rgba(0, 200, 255, 0.55)", PASTE: "rgba(255, 0, 200, 0.55)"}
HELP = {
    CONTEXT: "Paint where the rule applies, on as many images as you like: each painted image joins the context.",
    COPY: "Paint the region to copy (one image at a time; painting another image replaces it).",
    PASTE: "Click or paint on the target image: the copied region is pasted centred there (with *Paste: only "
           "onto the painted region*, onto what you painted).",
}


def canvas_key(mode: str, seed: int, brush: Brush) -> str:
    """The canvas widget's key: one canvas per mode and image, renewed when that drawing is cleared."""
    return f"canvas-{mode}-{seed}-{brush.generation.get((mode, seed), 0)}"


def record_stroke(brush: Brush, mode: str, seed: int, drawing: dict | None, mask) -> None:
    """Store a canvas's latest drawing as this session's mask for ``mode`` on ``seed`` (``mask`` None: erased)."""
    brush.drawings[(mode, seed)] = drawing or {"objects": []}
    if mode == CONTEXT:
        if mask is None:
            brush.context.pop(seed, None)
        else:
            brush.context[seed] = mask
            brush.cluster = None  # brushing takes the context back from a chosen cluster
    elif mode == COPY:
        if brush.copied is not None and brush.copied[0] != seed:
            clear(brush, COPY, brush.copied[0])
        brush.copied = None if mask is None else (seed, mask)
    else:
        if brush.paste is not None and brush.paste[0] != seed:
            clear(brush, PASTE, brush.paste[0])
        brush.paste = None if mask is None else (seed, mask)
    brush.changed()


def clear(brush: Brush, mode: str, seed: int) -> None:
    """Forget one drawing (a fresh canvas replaces it)."""
    brush.drawings.pop((mode, seed), None)
    brush.generation[(mode, seed)] = brush.generation.get((mode, seed), 0) + 1
    if mode == CONTEXT:
        brush.context.pop(seed, None)
    elif mode == COPY and brush.copied and brush.copied[0] == seed:
        brush.copied = None
    elif mode == PASTE and brush.paste and brush.paste[0] == seed:
        brush.paste = None
    brush.changed()


def clear_all(brush: Brush) -> None:
    for mode, seed in list(brush.drawings):
        clear(brush, mode, seed)
    brush.context.clear()
    brush.copied = brush.paste = None
    brush.cluster = None
    brush.changed()


def stroke_note(brush: Brush, mode: str, seed: int) -> str:
    """What this canvas holds, e.g. "Context on seed 7: 2 strokes, 9% of the image"."""
    strokes = len((brush.drawings.get((mode, seed)) or {}).get("objects", []))
    mask = {CONTEXT: brush.context.get(seed), COPY: brush.copied and brush.copied[0] == seed and brush.copied[1],
            PASTE: brush.paste and brush.paste[0] == seed and brush.paste[1]}[mode]
    share = float(mask.mean()) if isinstance(mask, torch.Tensor) else 0.0
    return f"{mode} on seed {seed}: {strokes} stroke{'s' * (strokes != 1)}, {share:.0%} of the image"


def summary(brush: Brush) -> str:
    if brush.cluster is not None:
        ctx = f"key cluster {brush.cluster}"
    elif brush.context:
        ctx = f"{len(brush.context)} image(s): seeds {', '.join(map(str, brush.context_seeds()))}"
    else:
        ctx = "empty"
    copied = f"seed {brush.copied[0]}" if brush.copied else "nothing"
    pasted = f"seed {brush.paste[0]}" if brush.paste else "not placed"
    return f"**Context:** {ctx} · **Copied:** {copied} · **Paste:** {pasted}"


def render_paste_preview(ws: Workspace, settings: Settings) -> None:
    """The paste as the edit would make it, next to the target as it is now."""
    if ws.brush.copied is None or ws.brush.paste is None:
        return
    key = ("paste_preview", ws.layer, ws.brush.revision, settings)
    try:
        with st.spinner("Solving the paste for a preview…"):
            preview = derived.cached(ws, key, lambda: preview_paste(ws, settings))
    except (ValueError, RuntimeError) as exc:
        st.warning(f"No preview: {exc}")
        return
    seed = ws.brush.paste[0]
    pics = torch.cat([to_unit(ws.images([seed])), to_unit(preview)])
    c1, c2 = st.columns(2)
    c1.image(to_uint8(pics[:1], DISPLAY_SCALE)[0], caption=f"seed {seed} now")
    c2.image(to_uint8(pics[1:], DISPLAY_SCALE)[0], caption=f"seed {seed} with the paste (preview)")


def render(ws: Workspace, seeds: list[int], edited: bool, settings: Settings) -> None:
    # Imported here: the canvas component registers itself only inside a running app, and the stroke logic above
    # also serves scripts (benchmarks/eval_user.py).
    from streamlit_drawable_canvas import st_canvas

    brush = ws.brush
    left, right = st.columns([1, 2])
    with left:
        mode = st.segmented_control("Brush", MODES, key="brush_mode", persist_state="session", default=CONTEXT,
                                    required=True,
                                    help="Context: where a rule applies. Copy: what to take. Paste: where it goes.")
        seed = st.selectbox("Image", seeds, key="brush_seed", persist_state="session",
                            format_func=lambda s: f"seed {s}")
        width = st.slider("Brush size", 3, 40, 14, key="brush_size", persist_state="session")
        st.caption(HELP[mode])
        c1, c2 = st.columns(2)
        c1.button("Clear this drawing", on_click=clear, args=(brush, mode, seed), width="stretch")
        c2.button("Clear all", on_click=clear_all, args=(brush,), width="stretch")
    with right:
        picture = to_uint8(to_unit(ws.images([seed], edited=edited)), CANVAS_SCALE)[0]
        h, w = picture.shape[:2]
        key = canvas_key(mode, seed, brush)
        if key not in st.session_state:
            # Mounting: redraw what was stored. While mounted the canvas owns its drawing, and initial_drawing
            # must stay fixed: a changed one makes the canvas reload it, dropping a stroke drawn meanwhile.
            brush.mounted[key] = brush.drawings.get((mode, seed))
        result = st_canvas(
            stroke_width=width, stroke_color=STROKES[mode], background_image=Image.fromarray(picture),
            height=h, width=w, drawing_mode="freedraw", initial_drawing=brush.mounted.get(key),
            return_image_data=True, key=key,
        )
        # A freshly mounted canvas reports no pixels: keep what was stored, update only on a real drawing.
        rgba = result.image_data
        if rgba is not None:
            size = (h // CANVAS_SCALE, w // CANVAS_SCALE)
            mask = canvas_mask(rgba, size)
            if result.json_data != brush.drawings.get((mode, seed)):
                record_stroke(brush, mode, seed, result.json_data, mask)
        st.caption(stroke_note(brush, mode, seed))
    st.markdown(summary(brush))
    if mode == PASTE:
        render_paste_preview(ws, settings)
