"""Guided recipes: "Remove watermark" and "Spire -> tree", each ending with what the segmenter measures."""

from __future__ import annotations

import streamlit as st

from dashboard import brushing, derived, editing, followup
from dashboard.defaults import MEASURE_SEEDS
from dashboard.requests import RECOMMENDED, NeedsInput, Settings
from dashboard.workspace import Workspace
from dissect import measure
from dissect.memory import bounding_boxes
from dissect.models.segmenter import present
from dissect.models.world import CLASSES

WATERMARK, SPIRE_TREE = "Remove watermark", "Spire -> tree"
RECIPES = (WATERMARK, SPIRE_TREE)
BROWSED = 48  # the segmented context looks this far beyond the grid: the first four pages of seeds
BRUSHED, SEGMENTED = "My brushed context", "Watermarks the segmenter finds in the grid"


def segmented_context(ws: Workspace, seeds: list[int], name: str, n: int = 3) -> list[int]:
    """Start a context from what the segmenter sees: the bounding boxes of ``name`` on the first ``n`` images that
    show it, among ``seeds`` and then the first :data:`BROWSED` seeds, as if brushed (NeedsInput when too few)."""
    seeds = list(dict.fromkeys([*seeds, *range(BROWSED)]))
    labels = derived.labels(ws, seeds, edited=ws.edited)
    if labels is None:
        raise NeedsInput("The segmenter's weights are not installed: brush the context yourself in Context mode.")
    found = [i for i, has in enumerate(present(labels, name).tolist()) if has][:n]
    if len(found) < n:
        raise NeedsInput(f"Only {len(found)} of {len(seeds)} images show a {name}; brush the context yourself.")
    boxes = bounding_boxes((labels[found] == CLASSES.index(name)).float())
    for i, box in zip(found, boxes):
        brushing.record_stroke(ws.brush, brushing.CONTEXT, seeds[i], None, box)
    return [seeds[i] for i in found]


def prevalence(ws: Workspace, name: str) -> tuple[float, float]:
    """Share of fresh samples (:data:`MEASURE_SEEDS`) where the segmenter finds ``name``: original, edited."""
    seeds = list(MEASURE_SEEDS)
    before, after = derived.labels(ws, seeds, edited=False), derived.labels(ws, seeds, edited=True)
    return measure.prevalence(before, name), measure.prevalence(after, name)


def spire_to_tree(ws: Workspace) -> float:
    """Share of the original images' spire pixels that the segmenter labels tree after the edit."""
    seeds = list(MEASURE_SEEDS)
    before, after = derived.labels(ws, seeds, edited=False), derived.labels(ws, seeds, edited=True)
    spire = before == CLASSES.index("spire")
    return measure.share(after[spire] == CLASSES.index("tree")) if spire.any() else 0.0


def _measure(ws: Workspace, name: str) -> None:
    if derived.segmenter() is None:
        st.warning("The segmenter's weights are not installed, so the result cannot be measured.")
        return
    with st.spinner(f"Segmenting {len(MEASURE_SEEDS)} fresh samples…"):
        before, after = prevalence(ws, name)
    st.metric(f"{name} prevalence on {len(MEASURE_SEEDS)} fresh samples", f"{after:.1%}",
              delta=f"{(after - before) * 100:+.1f} points (was {before:.1%})", delta_color="inverse")


def _result(ws: Workspace, name: str) -> None:
    """Before/after of fresh samples that showed ``name``, and the measured prevalence."""
    shown = shown_in(ws, list(MEASURE_SEEDS)[:48], name)[:6]
    if shown:
        st.caption(f"Fresh samples that showed a {name} before the edit (original above, edited below):")
        editing.before_after(ws, shown)
    _measure(ws, name)


def remove_watermark(ws: Workspace, seeds: list[int]) -> None:
    st.markdown("1. **Find the watermark**: the segmenter's watermark boxes on three images, thickened by their best "
                "matches (or your own brushed context).\n2. **Erase** it with the recommended settings (under "
                "*Advanced*).\n3. **Check** the fresh samples below, and how many still show one. Then the button becomes "
                "*Erase what it missed*: it finds the pool images where the edited model still draws one and "
                "erases what is left with a small change, keeping the first edit.")
    source = st.radio("Context", [SEGMENTED, BRUSHED], key="watermark_source", persist_state="session",
                      horizontal=True, index=1 if ws.brush.context else 0)
    editing.show_flashes()
    again = followup.last_erase(ws) is not None
    if st.button("Erase what it missed" if again else "Remove the watermark", type="primary", key="run_watermark"):
        if again:
            editing.erase_missed(ws, RECOMMENDED[editing.ERASE])
            editing.show_flashes()
        else:
            _first_round(ws, seeds, source)
    if editing.PENDING in st.session_state:
        editing.render_pending(ws)
    if ws.edited:
        _result(ws, "watermark")


def _first_round(ws: Workspace, seeds: list[int], source: str) -> None:
    try:
        if source == SEGMENTED:
            brushing.clear_all(ws.brush)
            used = segmented_context(ws, seeds, "watermark")
            added = editing.add_matches(ws, editing.ERASE, RECOMMENDED[editing.ERASE])
            editing.flash("info", f"Context: the watermarks of seeds {', '.join(map(str, used))}, and the {added} "
                                  f"pool images that match them best.")
        elif ws.brush.cluster is not None:  # the brushed context was chosen, not a cluster picked earlier
            ws.brush.cluster = None
            ws.brush.changed()
    except NeedsInput as exc:
        st.warning(str(exc))
        return
    if editing.apply_with_progress(ws, editing.ERASE, RECOMMENDED[editing.ERASE]):
        editing.flash("success", "Erased. The grid on the Images page now shows the edited model.")
        st.rerun()  # the button above becomes the second round
    editing.show_flashes()


def shown_in(ws: Workspace, seeds: list[int], name: str) -> list[int]:
    """The grid's seeds where the segmenter finds ``name`` in the original image."""
    found = derived.labels(ws, seeds, edited=False)
    return [] if found is None else [s for s, has in zip(seeds, present(found, name).tolist()) if has]


def spire_tree(ws: Workspace, seeds: list[int]) -> None:
    st.markdown("1. **Copy a tree**: on the Images page, brush over one tree in *Copy* mode.\n2. **Paste it on a "
                "spire**: in *Paste* mode, paint over a spire of another image.\n3. **Context**: brush three or more "
                "other spires in *Context* mode, so the rule reaches every spire.\n4. **Apply** here: the paste finds "
                "the value that makes the painted spire and up to seven context spires (brushed ones first, then any "
                "best matches added) look like the copied tree to the segmenter, and stores it for every spire "
                "(rank 4, at the recommended strength); check the fresh samples below.")
    trees, spires = shown_in(ws, seeds, "tree"), shown_in(ws, seeds, "spire")
    if derived.segmenter() is not None:
        st.caption(f"In the grid the segmenter sees a tree on seeds {', '.join(map(str, trees)) or 'none'} and a "
                   f"spire on seeds {', '.join(map(str, spires)) or 'none'} (more seeds in the sidebar).")
    if st.button("Make spires trees", type="primary", key="run_spire_tree"):
        if editing.apply_with_progress(ws, editing.PASTE, RECOMMENDED[editing.PASTE]):
            st.success("Applied. The grid on the Images page now shows the edited model.")
    if ws.edited:
        _result(ws, "spire")
        if derived.segmenter() is not None:
            st.metric("Original spire pixels now labelled tree", f"{spire_to_tree(ws):.1%}")


def render(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    """The recipes set their own (recommended) settings; ``settings`` is the sidebar's, unused here."""
    recipe = st.segmented_control("Recipe", RECIPES, key="recipe", persist_state="session", default=WATERMARK,
                                  required=True)
    editing.show_flashes()
    if recipe == WATERMARK:
        remove_watermark(ws, seeds)
    else:
        spire_tree(ws, seeds)
