"""dissect dashboard: `streamlit run dashboard` (from the repository root)."""

import sys
from pathlib import Path

# `streamlit run dashboard` puts dashboard/ itself on sys.path; the page modules import as `dashboard.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st  # noqa: E402

from dashboard import dissect_page, editing, images_page, inspect_page, recipes, sidebar, style_page, visualise_page  # noqa: E402

st.set_page_config(page_title="dissect · rewrite a generator", layout="wide")

HEADER = (
    "**Three steps:** **1 · Copy** an object (brush a tree) → **2 · Paste** it where it should go (brush onto a "
    "spire) → **3 · Context**: brush other places the rule should reach (more spires) → **Apply** on the *Edit* "
    "tab. To remove something (a watermark), brush it in *Context* and apply *Erase*."
)

ws, seeds, settings = sidebar.render()
st.markdown("#### dissect · rewrite a generator's rules")
if ws is None:
    st.write("No model is open: see the message in the sidebar, or choose one there.")
    st.stop()
st.markdown(HEADER)
ws.status = st.empty()  # progress of a statistics collection shows here, above the page it does not hide
if note := ws.brush.follow_layer(ws.layer):
    st.info(note)

# (tab name, render(workspace, seeds, settings)): one line per page. Only the open tab runs
# (on_change="rerun"), so a page's computations never slow the others down; the pages' widgets keep their
# values while hidden (persist_state="session").
PAGES = [
    ("Images", images_page.render),
    ("Inspect", inspect_page.render),
    ("Edit", lambda ws, seeds, settings: editing.render(ws, settings)),
    ("Recipes", recipes.render),
    ("Dissect", dissect_page.render),
    ("Visualise", visualise_page.render),
    ("Style", style_page.render),
]
tabs = st.tabs([name for name, _ in PAGES], key="page", on_change="rerun")
for (name, render), tab in zip(PAGES, tabs):
    if tab.open:
        with tab:
            render(ws, seeds, settings)
