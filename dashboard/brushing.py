"""Brushing on an image: a region to copy, where to paste it, and context regions on several images.

Masks leave this page as ``(H, W)`` float tensors at image resolution (see :func:`dashboard.imaging.canvas_mask`).
A mask is the union of the canvas's strokes and, if brushed at once, a segmenter class on that image.
"""

from __future__ import annotations

import streamlit as st
import torch

from dashboard import canvas, derived
from dashboard.browse import BRUSH_COLORS, swatch
from dashboard.defaults import DISPLAY_SCALE
from dashboard.editing import flash, preview_paste
from dashboard.imaging import canvas_mask, canvas_scale, tint, to_uint8
from dashboard.requests import Settings
from dashboard.workspace import Brush, Workspace
from dissect.models.world import CLASSES
from dissect.visualize import to_unit

COPY, PASTE, CONTEXT = "Copy", "Paste", "Context"
MODES = (COPY, PASTE, CONTEXT)  # the paper's order: copy an object, paste it, say where the rule applies
KIND = {COPY: "copy", PASTE: "paste", CONTEXT: "context"}  # keys of browse.BRUSH_COLORS
STROKES = {m: "rgba({}, {}, {}, 0.55)".format(*(round(255 * c) for c in BRUSH_COLORS[KIND[m]])) for m in MODES}
LEGEND = {COPY: "what to copy (a tree)", PASTE: "where it goes (onto a spire)",
          CONTEXT: "where the rule applies, or what to erase"}
HELP = {
    CONTEXT: "Paint where the rule applies, on as many images as you like: each painted image joins the context.",
    COPY: "Paint the region to copy (one image at a time; painting another image replaces it).",
    PASTE: "Click or paint on the target image: the copied region is pasted centred there (with *Paste: only "
           "onto the painted region*, onto what you painted).",
}
STAMP_DEFAULT = {COPY: "tree", PASTE: "spire", CONTEXT: "watermark"}

def canvas_key(mode: str, seed: int, brush: Brush) -> str:
    """The canvas widget's key: one canvas per mode and image, renewed when that drawing is cleared."""
    return f"canvas-{mode}-{seed}-{brush.generation.get((mode, seed), 0)}"


def _set(brush: Brush, mode: str, seed: int) -> None:
    """The brushed mask of ``mode`` on ``seed``: the union of its strokes and its stamped class."""
    parts = [m for m in (brush.stroked.get((mode, seed)), brush.stamps.get((mode, seed))) if m is not None]
    mask = torch.stack(parts).amax(0) if parts else None
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


def record_stroke(brush: Brush, mode: str, seed: int, drawing: dict | None, mask: torch.Tensor | None) -> None:
    """Store a canvas's latest drawing and its mask for ``mode`` on ``seed`` (``mask`` None: nothing painted)."""
    brush.drawings[(mode, seed)] = drawing or {"objects": []}
    if mask is None:
        brush.stroked.pop((mode, seed), None)
    else:
        brush.stroked[(mode, seed)] = mask
    _set(brush, mode, seed)


def stamp(brush: Brush, mode: str, seed: int, mask: torch.Tensor) -> None:
    """Brush ``mask`` (a segmenter class, say) on ``seed`` in ``mode`` at once, added to its strokes."""
    brush.stamps[(mode, seed)] = mask
    _set(brush, mode, seed)


def stamp_class(ws: Workspace, mode: str, seed: int, edited: bool, name: str) -> None:
    """"Brush this class here": where the segmenter sees ``name`` on the brushed image becomes the mask."""
    mask = derived.class_mask(ws, seed, edited, name)
    if mask is None:
        flash("warning", "The segmenter's weights are not installed: brush the region by hand.")
    elif not mask.any():
        flash("warning", f"The segmenter sees no {name} on seed {seed}: choose another image or class.")
    else:
        stamp(ws.brush, mode, seed, mask)


def clear(brush: Brush, mode: str, seed: int) -> None:
    """Forget one drawing and its stamped class (a fresh canvas replaces it)."""
    brush.drawings.pop((mode, seed), None)
    brush.stroked.pop((mode, seed), None)
    brush.stamps.pop((mode, seed), None)
    brush.generation[(mode, seed)] = brush.generation.get((mode, seed), 0) + 1
    if mode == CONTEXT:
        brush.context.pop(seed, None)
    elif mode == COPY and brush.copied and brush.copied[0] == seed:
        brush.copied = None
    elif mode == PASTE and brush.paste and brush.paste[0] == seed:
        brush.paste = None
    brush.changed()


def clear_all(brush: Brush) -> None:
    for mode, seed in list(brush.drawings) + list(brush.stamps):
        clear(brush, mode, seed)
    brush.context.clear()
    brush.copied = brush.paste = None
    brush.cluster = brush.cluster_layer = None
    brush.changed()


def stroke_note(brush: Brush, mode: str, seed: int) -> str:
    """What this canvas holds, e.g. "Context on seed 7: 2 strokes, 9% of the image"."""
    strokes = len((brush.drawings.get((mode, seed)) or {}).get("objects", []))
    mask = {CONTEXT: brush.context.get(seed), COPY: brush.copied and brush.copied[0] == seed and brush.copied[1],
            PASTE: brush.paste and brush.paste[0] == seed and brush.paste[1]}[mode]
    share = float(mask.mean()) if isinstance(mask, torch.Tensor) else 0.0
    stamped = " + a segmenter class" if (mode, seed) in brush.stamps else ""
    return f"{mode} on seed {seed}: {strokes} stroke{'s' * (strokes != 1)}{stamped}, {share:.0%} of the image"


def cluster_label(ws: Workspace) -> str:
    """The cluster context as "cluster 0: dome @ synthesis.b16.conv1" (its name once the clusters are named)."""
    brush = ws.brush
    names = ws.cache.get(("cluster_names", brush.cluster_layer, brush.cluster_k), ([], None))[0]
    name = f": {names[brush.cluster]}" if brush.cluster < len(names) else f" of {brush.cluster_k}"
    return f"cluster {brush.cluster}{name} @ {brush.cluster_layer or ws.layer}"


def summary(ws: Workspace) -> str:
    brush = ws.brush
    if brush.cluster is not None:
        ctx = cluster_label(ws)
    elif brush.context:
        ctx = f"{len(brush.context)} image(s): seeds {', '.join(map(str, brush.context_seeds()))}"
    else:
        ctx = "empty"
    copied = f"seed {brush.copied[0]}" if brush.copied else "nothing"
    pasted = f"seed {brush.paste[0]}" if brush.paste else "not placed"
    return f"**Copied:** {copied} · **Paste:** {pasted} · **Context:** {ctx}"


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


def pick(seed: int) -> None:
    """A click on a thumbnail: brush that image next."""
    st.session_state.brush_seed = seed


def render(ws: Workspace, seeds: list[int], edited: bool, settings: Settings) -> int:
    """The brush controls and the canvas; returns the seed being brushed."""
    brush = ws.brush
    mode = st.segmented_control("Brush", MODES, key="brush_mode", persist_state="session", default=CONTEXT,
                                required=True, help=" ".join(f"{m}: {LEGEND[m]}." for m in MODES))
    st.markdown("Brush colours: " + " &nbsp; ".join(
        swatch(tuple(round(255 * c) for c in BRUSH_COLORS[KIND[m]]), f"<span title='{LEGEND[m]}'>{m}</span>")
        for m in MODES), unsafe_allow_html=True)
    if st.session_state.get("brush_seed") not in seeds:
        st.session_state.brush_seed = seeds[0]
    c1, c2 = st.columns([3, 2])
    seed = c1.selectbox("Image", seeds, key="brush_seed", format_func=lambda s: f"seed {s}",
                        help="Or click a picture in the grid.")
    width = c2.slider("Brush size", 3, 40, 14, key="brush_size", persist_state="session")

    picture = to_unit(ws.images(seeds, edited=edited)[seeds.index(seed)][None])  # one batch with the grid's
    stamped = brush.stamps.get((mode, seed))
    if stamped is not None:  # a stamped class shows under the strokes, in the brush's colour
        picture = tint(picture, stamped[None], BRUSH_COLORS[KIND[mode]])
    picture = to_uint8(picture)[0]
    # The canvas redraws the stored strokes when it mounts (a new image, mode or clearing), and owns them after.
    sent = canvas.draw(picture, canvas_scale(picture.shape[1]), width, STROKES[mode], brush.drawings.get((mode, seed)),
                       key=canvas_key(mode, seed, brush))
    if sent is not None:  # a stroke, an undo or a redo
        record_stroke(brush, mode, seed, sent[0], canvas_mask(sent[1], picture.shape[:2]))
    model = f"the **edited** model ({len(ws.rewriter.history)} edit(s))" if edited else "the **original** model"
    st.markdown(f"{stroke_note(brush, mode, seed)}, as drawn by {model}.")

    c1, c2 = st.columns([3, 2], vertical_alignment="bottom")
    name = c1.selectbox("Segmenter class", CLASSES, index=CLASSES.index(STAMP_DEFAULT[mode]), key=f"stamp_{mode}",
                        help="Brush, on this image, exactly where the segmenter sees this class.")
    c2.button("Brush it here", key="stamp", on_click=stamp_class, args=(ws, mode, seed, edited, name),
              width="stretch")
    c1, c2 = st.columns(2)
    c1.button("Clear this image", key="clear", on_click=clear, args=(brush, mode, seed), width="stretch",
              help=f"Forget the {mode.lower()} strokes and class on seed {seed}.")
    c2.button("Clear everything", key="clear_all", on_click=clear_all, args=(brush,), width="stretch",
              help="Forget every brushed region and a chosen key cluster.")
    st.markdown(summary(ws))
    if mode == PASTE:
        render_paste_preview(ws, settings)
    return seed
