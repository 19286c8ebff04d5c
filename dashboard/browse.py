"""The image browser: a grid of generated images by seed, original or edited, with optional overlays."""

from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from dashboard import derived, requests
from dashboard.defaults import DEFAULT_CLUSTERS, DISPLAY_SCALE, GRID_COLUMNS
from dashboard.imaging import tint, to_uint8
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import Brush, Workspace
from dissect.visualize import Legend, cluster_overlay, match_overlay, to_unit

PLAIN, MATCHES, CLUSTERS = "Brushed regions", "Key matches", "Key clusters"
OVERLAYS = (PLAIN, MATCHES, CLUSTERS)
BRUSH_COLORS = {"context": (1.0, 0.82, 0.0), "copy": (0.0, 0.78, 1.0), "paste": (1.0, 0.0, 0.78)}


def show_grid(pictures: np.ndarray, captions: list[str]) -> None:
    """``pictures (N, h, w, 3)`` uint8 in rows of :data:`GRID_COLUMNS`."""
    for start in range(0, len(captions), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, pic, cap in zip(cols, pictures[start : start + GRID_COLUMNS], captions[start : start + GRID_COLUMNS]):
            col.image(pic, caption=cap, width="stretch")


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


def matched(ws: Workspace, images: torch.Tensor, seeds: list[int], settings: Settings) -> torch.Tensor:
    """Key matches of the context (or the copied region): matching regions kept, the rest dimmed; a quantile of
    scores over pool images decides what matches."""
    ctx = requests.selection(ws, settings.rank)
    scores = ws.memory().match(derived.directions(ws, ctx), ws.inputs(seeds))
    return match_overlay(images, scores, derived.threshold(ws, ctx))


def clustered(ws: Workspace, images: torch.Tensor, seeds: list[int], k: int) -> tuple[torch.Tensor, Legend]:
    names, ious = derived.cluster_names(ws, k)
    maps = derived.clusters(ws, k).predict(ws.inputs(seeds))
    return cluster_overlay(images, maps, names, ious)


def grid_pictures(ws: Workspace, seeds: list[int], edited: bool, overlay: str, settings: Settings,
                  k: int = DEFAULT_CLUSTERS) -> tuple[torch.Tensor, Legend | None]:
    """The grid as pictures ``(N, 3, H, W)`` in [0, 1] with the chosen overlay, and the clusters' legend."""
    images = ws.images(seeds, edited=edited)
    if overlay == MATCHES:
        return matched(ws, images, seeds, settings), None
    if overlay == CLUSTERS:
        return clustered(ws, images, seeds, k)
    return brushed(to_unit(images), seeds, ws.brush), None


def controls(ws: Workspace) -> tuple[bool, str]:
    """The grid's switches: edited or original images, and the overlay."""
    left, right = st.columns([1, 2])
    edited = left.toggle("Show edited images", key="show_edited", persist_state="session", value=True,
                         disabled=not ws.edited, help="Off: the original model's images for the same seeds.")
    overlay = right.segmented_control("Overlay", OVERLAYS, key="overlay", persist_state="session", default=PLAIN,
                                      required=True)
    return edited and ws.edited, overlay


def render(ws: Workspace, seeds: list[int], edited: bool, overlay: str, settings: Settings) -> None:
    legend = None
    try:
        k = st.session_state.get("cluster_k", DEFAULT_CLUSTERS)
        pictures, legend = grid_pictures(ws, seeds, edited, overlay, settings, k)
    except NeedsInput as exc:
        st.info(str(exc))
        pictures = to_unit(ws.images(seeds, edited=edited))
    except (ValueError, RuntimeError) as exc:  # e.g. a rank larger than the context: the library says why
        st.warning(f"No overlay: {exc}")
        pictures = to_unit(ws.images(seeds, edited=edited))
    state = "edited" if edited else "original"
    grid, side = st.columns([5, 1]) if legend is not None else (st.container(), None)
    with grid:
        show_grid(to_uint8(pictures, DISPLAY_SCALE), [f"seed {s} · {state}" for s in seeds])
    if side is not None:
        side.image(to_uint8(legend.image[None])[0], caption="Cluster: segmenter class, IoU")
