"""The image browser: a grid of generated images by seed, original or edited, with optional overlays.

The grid is one component holding its pictures inline (PNG data URLs): a rerun that starts while the browser
still loads the previous grid can never leave broken images behind (Streamlit's media files of an interrupted
run are deleted), and a click on a thumbnail reports its seed.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from typing import Callable

import numpy as np
import streamlit as st
import torch
from PIL import Image

from dashboard import derived, requests
from dashboard.defaults import DEFAULT_CLUSTERS, GRID_COLUMNS, MATCH_QUANTILE
from dashboard.imaging import tint, to_uint8
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import Brush, Workspace
from dissect.models.world import CLASSES
from dissect.visualize import Legend, cluster_overlay, match_overlay, to_unit

PLAIN, SEGMENTS, MATCHES, CLUSTERS = "Brushed regions", "Segmenter classes", "Key matches", "Key clusters"
OVERLAYS = (PLAIN, SEGMENTS, MATCHES, CLUSTERS)
SHOWN_CLASSES = ("spire", "tree", "watermark")  # the classes the segmenter overlay starts with
BRUSH_COLORS = {"context": (1.0, 0.82, 0.0), "copy": (0.0, 0.78, 1.0), "paste": (1.0, 0.0, 0.78)}
PAGE_COLUMNS = 4  # the Images page's grid, beside the canvas
COMPONENT = "dissect_grid"

_JS = """
export default function(component) {
  const { parentElement, setTriggerValue } = component;
  const [data] = component.data;  // wrapped in a list (component_data)
  const root = parentElement.querySelector('.grid');
  root.style.gridTemplateColumns = `repeat(${data.columns}, minmax(0, 1fr))`;
  root.classList.toggle('pickable', data.pickable);
  // Update the pictures in place: an unchanged picture keeps its decoded image, so a redraw after one stroke
  // decodes and repaints only the pictures that changed.
  data.items.forEach((item, i) => {
    let fig = root.children[i];
    if (!fig) {
      fig = document.createElement('figure');
      const img = document.createElement('img');
      img.className = 'dissect-thumb';
      fig.append(img, document.createElement('figcaption'));
      root.append(fig);
    }
    const [img, cap] = fig.children;
    fig.className = item.selected ? 'selected' : '';
    fig.dataset.seed = item.seed;
    if (img.getAttribute('src') !== item.src) img.src = item.src;
    img.alt = item.caption;
    cap.textContent = item.caption;
    fig.onclick = data.pickable ? () => setTriggerValue('picked', item.seed) : null;
  });
  while (root.children.length > data.items.length) root.lastElementChild.remove();
}
"""
_CSS = """
.grid { display: grid; gap: 6px; }
figure { margin: 0; border: 2px solid transparent; border-radius: 4px; }
figure.selected { border-color: var(--st-primary-color); }
.pickable figure { cursor: pointer; }
.pickable figure:hover { border-color: var(--st-secondary-background-color); }
img { width: 100%; display: block; image-rendering: pixelated; }
figcaption { font-size: 0.75rem; text-align: center; opacity: 0.75; font-family: var(--st-font); }
"""
_grid = st.components.v2.component(COMPONENT, html='<div class="grid"></div>', js=_JS, css=_CSS)


def component_data(data: dict) -> list[dict]:
    """A component's data wrapped in a list: streamlit looks for dataframes in the values of a dict, or in any data
    but a list or bytes, and importing pandas to do so cost 0.3-0.6 s of the first page."""
    return [data]


def data_url(picture: np.ndarray) -> str:
    """An ``(h, w, 3)`` uint8 picture as a PNG data URL (lossless: tests and users compare pixels)."""
    return _png_url(np.ascontiguousarray(picture).tobytes(), picture.shape)


@functools.lru_cache(maxsize=1024)
def _png_url(pixels: bytes, shape: tuple[int, ...]) -> str:
    """Encoded once per distinct picture (shared by sessions: the URL depends on the pixels alone), so a redraw
    encodes only the pictures that changed."""
    buf = io.BytesIO()
    Image.fromarray(np.frombuffer(pixels, np.uint8).reshape(shape)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def show_grid(pictures: np.ndarray, captions: list[str], columns: int = GRID_COLUMNS, key: str | None = None,
              seeds: list[int] | None = None, on_pick: Callable[[int], None] | None = None,
              selected: int | None = None) -> None:
    """``pictures (N, h, w, 3)`` uint8 in rows of ``columns``, each with its caption (shown enlarged, unblurred).

    With ``seeds`` and ``on_pick``, clicking picture i calls ``on_pick(seeds[i])`` (before the next run);
    ``selected`` outlines that seed's picture.
    """
    seeds = list(seeds) if seeds is not None else list(range(len(captions)))
    items = [{"src": data_url(pic), "caption": cap, "seed": s, "selected": s == selected}
             for pic, cap, s in zip(pictures, captions, seeds)]

    def picked() -> None:
        seed = (st.session_state.get(key) or {}).get("picked")
        if seed is not None and on_pick is not None:
            on_pick(int(seed))

    _grid(data=component_data({"items": items, "columns": columns, "pickable": on_pick is not None}), key=key,
          on_picked_change=picked if on_pick is not None else None)


def grid_items(element_json: str) -> list[dict]:
    """The pictures a grid component was drawn with (its element's JSON), for tests: src, caption, seed, selected."""
    return json.loads(element_json)[0]["items"]


def grid_captions(element_json: str) -> list[str]:
    """The captions a grid component was drawn with (its element's JSON), for tests."""
    return [item["caption"] for item in grid_items(element_json)]


def brushed(pictures: torch.Tensor, seeds: list[int], brush: Brush) -> torch.Tensor:
    """Tint what was brushed on each image: context, copied region, paste target."""
    out = pictures.clone()
    marks = [("context", brush.context)]
    marks += [("copy", dict([brush.copied]))] if brush.copied else []
    marks += [("paste", dict([brush.paste]))] if brush.paste else []
    for kind, masks in marks:
        for i, s in enumerate(seeds):
            if s in masks:
                out[i : i + 1] = tint(out[i : i + 1], masks[s][None], BRUSH_COLORS[kind])
    return out


def matched(ws: Workspace, images: torch.Tensor, seeds: list[int], settings: Settings,
            quantile: float = MATCH_QUANTILE) -> torch.Tensor:
    """Key matches of the context (or the copied region): matching regions kept, the rest dimmed; the
    ``quantile`` of scores over pool images decides what matches. The grid's keys are reused between redraws."""
    ctx = requests.selection(ws, settings.rank)
    return match_overlay(images, derived.scores(ws, ctx, seeds), derived.threshold(ws, ctx, quantile))


def clustered(ws: Workspace, images: torch.Tensor, seeds: list[int], k: int) -> tuple[torch.Tensor, Legend]:
    names, ious = derived.cluster_names(ws, k)
    return cluster_overlay(images, derived.cluster_maps(ws, k, seeds), names, ious)


def segmented(ws: Workspace, images: torch.Tensor, seeds: list[int], edited: bool,
              shown: list[str]) -> tuple[torch.Tensor, Legend]:
    """Where the segmenter sees each of the ``shown`` classes, coloured, on the pictures it labels."""
    labels = derived.labels(ws, seeds, edited)
    if labels is None:
        raise NeedsInput("The segmenter's weights are not installed, so its classes cannot be shown.")
    maps = torch.full_like(labels, -1)
    for i, name in enumerate(shown):
        maps[labels == CLASSES.index(name)] = i
    return cluster_overlay(images, maps, shown)


def grid_pictures(ws: Workspace, seeds: list[int], edited: bool, overlay: str, settings: Settings,
                  k: int = DEFAULT_CLUSTERS, quantile: float = MATCH_QUANTILE,
                  shown: list[str] | None = None) -> tuple[torch.Tensor, Legend | None]:
    """The grid as pictures ``(N, 3, H, W)`` in [0, 1] with the chosen overlay, and its legend."""
    images = ws.images(seeds, edited=edited)
    if overlay == MATCHES:
        return matched(ws, images, seeds, settings, quantile), None
    if overlay == CLUSTERS:
        return clustered(ws, images, seeds, k)
    if overlay == SEGMENTS and shown:
        return segmented(ws, images, seeds, edited, shown)
    return brushed(to_unit(images), seeds, ws.brush), None


def controls(ws: Workspace) -> tuple[bool, str]:
    """The grid's switches: edited or original images, the overlay, and the overlay's own setting."""
    overlay = st.segmented_control("Show on the images", OVERLAYS, key="overlay", persist_state="session",
                                   default=PLAIN, required=True)
    edited = st.toggle("The edited model's images", key="show_edited", persist_state="session", value=True,
                       disabled=not ws.edited, help="Off: the original model's images for the same seeds.")
    if overlay == SEGMENTS:
        st.pills("Classes", CLASSES, selection_mode="multi", key="shown_classes", persist_state="session",
                 default=list(SHOWN_CLASSES), help="Where the shipped segmenter sees each class.")
    elif overlay == MATCHES:
        threshold_slider()
    return edited and ws.edited, overlay


def threshold_slider() -> None:
    """The key-match threshold (one value for the Images and Inspect pages; read it with :func:`match_quantile`)."""
    st.slider("Match threshold: the top % of locations", 0.1, 10.0, round(100 * (1 - MATCH_QUANTILE), 1), 0.1,
              key="match_top", persist_state="session", format="%.1f%%",
              help="A location matches when its score is among this share of the scores over 16 pool images.")


def swatch(color: tuple[int, int, int], label: str) -> str:
    """A colour square and its label, as inline HTML."""
    box = (f"display:inline-block;width:0.9em;height:0.9em;vertical-align:-0.1em;border:1px solid #0005;"
           f"background:rgb{tuple(color)}")
    return f'<span style="white-space:nowrap"><span style="{box}"></span>&nbsp;{label}</span>'


def show_legend(legend: Legend, numbered: bool) -> None:
    """An overlay's colours on one line (clusters: number, segmenter class, IoU), most pixels first."""
    labels = [(f"{e.cluster}: {e.name}" if numbered else e.name) + (f" ({e.iou:.2f})" if e.iou is not None else "")
              for e in legend.entries]
    st.markdown(" &nbsp; ".join(swatch(e.color, t) for e, t in zip(legend.entries, labels)), unsafe_allow_html=True)


def match_quantile() -> float:
    """The threshold slider's quantile (shared by the Images and Inspect pages)."""
    return 1 - st.session_state.get("match_top", round(100 * (1 - MATCH_QUANTILE), 1)) / 100


def render(ws: Workspace, seeds: list[int], edited: bool, overlay: str, settings: Settings,
           on_pick: Callable[[int], None] | None = None, selected: int | None = None) -> None:
    legend = None
    try:
        k = st.session_state.get("cluster_k", DEFAULT_CLUSTERS)
        shown = list(st.session_state.get("shown_classes", SHOWN_CLASSES))
        pictures, legend = grid_pictures(ws, seeds, edited, overlay, settings, k, match_quantile(), shown)
    except NeedsInput as exc:
        st.info(str(exc))
        pictures = to_unit(ws.images(seeds, edited=edited))
    except (ValueError, RuntimeError) as exc:  # e.g. a rank larger than the context: the library says why
        st.warning(f"No overlay: {exc}")
        pictures = to_unit(ws.images(seeds, edited=edited))
    state = "edited" if edited else "original"
    if legend is not None:
        show_legend(legend, numbered=overlay == CLUSTERS)
    show_grid(to_uint8(pictures), [f"seed {s} · {state}" for s in seeds], columns=PAGE_COLUMNS, key="grid",
              seeds=seeds, on_pick=on_pick, selected=selected)
