"""The Images page: one workflow on one screen. Brush on the left (mode, legend, canvas), the grid on the right,
original or edited, with what the segmenter sees, the key matches or the key clusters over it."""

from __future__ import annotations

import streamlit as st

from dashboard import browse, brushing, editing
from dashboard.requests import Settings
from dashboard.workspace import Workspace


def render(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    workflow(ws, seeds, settings)


@st.fragment
def workflow(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    """A fragment: a stroke, a click on a thumbnail or a switch of the overlay reruns this page alone, not the
    sidebar and the header (their inputs, the arguments, change only in a full run, which reruns this too)."""
    # A fragment's rerun may not write to the page's status slot (made outside it): this page has its own, atop it.
    ws.status = st.empty()
    editing.show_flashes()
    inputs, grid = st.columns([5, 7], gap="medium")
    with grid:  # the switches first: the canvas shows the model they choose
        edited, overlay = browse.controls(ws)
    with inputs:
        seed = brushing.render(ws, seeds, edited, settings)
    with grid:  # drawn after the canvas, so a new stroke shows in the grid in the same run
        browse.render(ws, seeds, edited, overlay, settings, on_pick=brushing.pick, selected=seed)
        st.caption("Click a picture to brush it.")
