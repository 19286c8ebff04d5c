"""dissect dashboard: `streamlit run dashboard` (from the repository root)."""

import sys
from pathlib import Path

# `streamlit run dashboard` puts dashboard/ itself on sys.path; the page modules import as `dashboard.*`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st  # noqa: E402

from dashboard import browse, sidebar  # noqa: E402

st.set_page_config(page_title="dissect · rewrite a generator", layout="wide")

ws, seeds = sidebar.render()
if ws is None:
    st.header("dissect")
    st.write("No model is open: see the message in the sidebar, or choose one there.")
    st.stop()

browse.render(ws, seeds)
