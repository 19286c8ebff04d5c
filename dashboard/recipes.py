"""Guided recipes: "Remove watermark" and "Spire -> tree", each ending with what the segmenter measures."""

from __future__ import annotations

import streamlit as st

from dashboard import derived, editing
from dashboard.defaults import DEFAULT_CLUSTERS, MEASURE_SEEDS
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import Workspace
from dissect.models.segmenter import present
from dissect.models.world import CLASSES

WATERMARK, SPIRE_TREE = "Remove watermark", "Spire -> tree"
RECIPES = (WATERMARK, SPIRE_TREE)
BRUSHED, CLUSTER = "My brushed context", "The watermark key cluster"


def watermark_cluster(ws: Workspace, k: int = DEFAULT_CLUSTERS) -> int:
    """The cluster the segmenter names "watermark" with the best IoU; NeedsInput when there is none."""
    names, ious = derived.cluster_names(ws, k)
    found = [c for c, name in enumerate(names) if name == "watermark"]
    if not found or ious is None:
        raise NeedsInput(f"No key cluster of {ws.layer} is named 'watermark' (or no segmenter is installed): brush "
                         "a few watermarks in Context mode instead, or try another layer.")
    return max(found, key=lambda c: ious[c])


def prevalence(ws: Workspace, name: str) -> tuple[float, float]:
    """Share of fresh samples (:data:`MEASURE_SEEDS`) where the segmenter finds ``name``: original, edited."""
    seeds = list(MEASURE_SEEDS)
    before, after = derived.labels(ws, seeds, edited=False), derived.labels(ws, seeds, edited=True)
    return float(present(before, name).float().mean()), float(present(after, name).float().mean())


def spire_to_tree(ws: Workspace) -> float:
    """Share of the original images' spire pixels that the segmenter labels tree after the edit."""
    seeds = list(MEASURE_SEEDS)
    before, after = derived.labels(ws, seeds, edited=False), derived.labels(ws, seeds, edited=True)
    spire = before == CLASSES.index("spire")
    return float((after[spire] == CLASSES.index("tree")).float().mean()) if spire.any() else 0.0


def _measure(ws: Workspace, name: str) -> None:
    if derived.segmenter() is None:
        st.warning("The segmenter's weights are not installed, so the result cannot be measured.")
        return
    with st.spinner(f"Segmenting {len(MEASURE_SEEDS)} fresh samples…"):
        before, after = prevalence(ws, name)
    st.metric(f"{name} prevalence on {len(MEASURE_SEEDS)} fresh samples", f"{after:.1%}",
              delta=f"{(after - before) * 100:+.1f} points (was {before:.1%})", delta_color="inverse")


def remove_watermark(ws: Workspace, settings: Settings) -> None:
    st.markdown("1. **Find the watermark**: use the key cluster the segmenter names *watermark*, or brush a few "
                "watermarks in *Context* mode on the Images page.\n2. **Erase** it at the chosen layer and rank.\n"
                "3. **Check** how many fresh samples still show one.")
    source = st.radio("Context", [CLUSTER, BRUSHED], key="watermark_source", persist_state="session", horizontal=True,
                      index=1 if ws.brush.context else 0)
    if st.button("Remove the watermark", type="primary", key="run_watermark"):
        try:
            if source == CLUSTER:
                c = watermark_cluster(ws)
                ws.brush.cluster, ws.brush.cluster_k = c, DEFAULT_CLUSTERS
                ws.brush.changed()
            elif ws.brush.cluster is not None:
                ws.brush.cluster = None
                ws.brush.changed()
        except NeedsInput as exc:
            st.warning(str(exc))
        else:
            if editing.apply_with_progress(ws, editing.ERASE, settings):
                st.success("Erased. The grid on the Images page now shows the edited model.")
    if ws.edited:
        _measure(ws, "watermark")


def shown_in(ws: Workspace, seeds: list[int], name: str) -> list[int]:
    """The grid's seeds where the segmenter finds ``name`` in the original image."""
    found = derived.labels(ws, seeds, edited=False)
    return [] if found is None else [s for s, has in zip(seeds, present(found, name).tolist()) if has]


def spire_tree(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    st.markdown("1. **Copy a tree**: on the Images page, brush over a tree in *Copy* mode.\n2. **Paste it on a "
                "spire**: in *Paste* mode, paint over a spire of another image, with *Paste: only onto the painted "
                "region* ticked in the sidebar.\n3. **Context**: brush several spires "
                "in *Context* mode, so the rule reaches every spire.\n4. **Solve** at rank 1 with *Pointwise* "
                "ticked, **apply**, and check how much of the spires the segmenter now calls tree; undo and raise "
                "the *Strength* (the evaluation settles near 2.5) until more stops helping. A second paste onto a "
                "spire that stayed reaches the next kind of spire.")
    trees, spires = shown_in(ws, seeds, "tree"), shown_in(ws, seeds, "spire")
    if derived.segmenter() is not None:
        st.caption(f"In the grid the segmenter sees a tree on seeds {', '.join(map(str, trees)) or 'none'} and a "
                   f"spire on seeds {', '.join(map(str, spires)) or 'none'} (more seeds in the sidebar).")
    if st.button("Make spires trees", type="primary", key="run_spire_tree"):
        if editing.apply_with_progress(ws, editing.PASTE, settings):
            st.success("Applied. The grid on the Images page now shows the edited model.")
    if ws.edited:
        _measure(ws, "spire")
        if derived.segmenter() is not None:
            st.metric("Original spire pixels now labelled tree", f"{spire_to_tree(ws):.1%}")


def render(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    recipe = st.segmented_control("Recipe", RECIPES, key="recipe", persist_state="session", default=WATERMARK,
                                  required=True)
    editing.show_flashes()
    if recipe == WATERMARK:
        remove_watermark(ws, settings)
    else:
        spire_tree(ws, seeds, settings)
