"""dissect dashboard: `streamlit run dashboard` (from the repository root)."""

import gc
import importlib
import sys
from pathlib import Path
from typing import Any

# `streamlit run dashboard` puts dashboard/ itself on sys.path; the page modules import as `dashboard.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st  # noqa: E402

from dashboard import sidebar  # noqa: E402

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

# (tab name, module, call): one line per page; call(module, ws, seeds, settings) draws it. Only the open tab runs
# (on_change="rerun"), so a page's computations never slow the others down, and a page's module is imported when
# it is first opened (the first page waits for the Images page alone). The pages' widgets keep their values while
# hidden (persist_state="session").
def _page(module: Any, ws: Any, seeds: list[int], settings: Any) -> None:
    module.render(ws, seeds, settings)


PAGES = [
    ("Images", "images_page", _page),
    ("Inspect", "inspect_page", _page),
    ("Edit", "editing", lambda module, ws, seeds, settings: module.render(ws, settings)),
    ("Recipes", "recipes", _page),
    ("Dissect", "dissect_page", _page),
    ("Visualise", "visualise_page", _page),
    ("Style", "style_page", _page),
]
tabs = st.tabs([name for name, _, _ in PAGES], key="page", on_change="rerun")
for (name, module, call), tab in zip(PAGES, tabs):
    if tab.open:
        with tab:
            call(importlib.import_module(f"dashboard.{module}"), ws, seeds, settings)
if not gc.get_freeze_count():
    # Once per server, after the first page: its imports, the model and the caches live as long as the server, and
    # a full collection walking them took about 190 ms, during most brush strokes' reruns.
    gc.freeze()
