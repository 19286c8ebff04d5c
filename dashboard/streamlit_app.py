"""dissect dashboard: `streamlit run dashboard` (from the repository root)."""

import sys
from pathlib import Path

# `streamlit run dashboard` puts dashboard/ itself on sys.path; the page modules import as `dashboard.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st  # noqa: E402

from dashboard import browse, brushing, editing, inspect_page, recipes, sidebar  # noqa: E402

st.set_page_config(page_title="dissect · rewrite a generator", layout="wide")

ws, seeds, settings = sidebar.render()
if ws is None:
    st.header("dissect")
    st.write("No model is open: see the message in the sidebar, or choose one there.")
    st.stop()

PAGES = ("Images", "Inspect", "Edit", "Recipes")
# Only the open tab runs (on_change="rerun"), so a page's computations never slow the others down; the pages'
# widgets keep their values while hidden (persist_state="session").
tabs = dict(zip(PAGES, st.tabs(PAGES, key="page", on_change="rerun")))
if tabs["Images"].open:
    with tabs["Images"]:
        editing.show_flashes()
        edited, overlay = browse.controls(ws)
        grid = st.container()
        brushing.render(ws, seeds, edited, settings)
        with grid:  # drawn after the canvas, so a new stroke shows in the grid in the same run
            browse.render(ws, seeds, edited, overlay, settings)
if tabs["Inspect"].open:
    with tabs["Inspect"]:
        inspect_page.render(ws, seeds, settings)
if tabs["Edit"].open:
    with tabs["Edit"]:
        editing.render(ws, settings)
if tabs["Recipes"].open:
    with tabs["Recipes"]:
        recipes.render(ws, seeds, settings)
