"""Editing: apply a rewrite with progress, compare before/after on fresh seeds, and manage the edit history."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd
import streamlit as st
import torch

from dashboard import requests
from dashboard.browse import show_grid
from dashboard.defaults import DISPLAY_SCALE, FRESH_SEEDS
from dashboard.imaging import to_uint8
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import Workspace
from dissect.rewrite import Edit, Rewriter, read_edits, solve
from dissect.visualize import to_unit

ERASE, PASTE = "Erase", "Paste"
KINDS = {ERASE: "Erase what the context shows", PASTE: "Paste the copied region (a new rule)"}
FLASH = "flash"  # session_state key: messages from callbacks, shown on the next run


def flash(kind: str, text: str) -> None:
    st.session_state.setdefault(FLASH, []).append((kind, text))


def show_flashes() -> None:
    for kind, text in st.session_state.pop(FLASH, []):
        getattr(st, kind)(text)


def solve_request(ws: Workspace, kind: str, settings: Settings) -> Edit:
    """Solve (never apply) the session's current request at the chosen layer."""
    target, context = requests.erase(ws, settings) if kind == ERASE else requests.paste(ws, settings)
    edit = solve(ws.memory(), target, context, refine=settings.refine, max_iter=settings.iterations,
                 pointwise=settings.pointwise)
    return edit.scaled(settings.strength)


def apply(ws: Workspace, kind: str, settings: Settings,
          progress: Callable[[float, str], None] | None = None) -> Edit:
    """Solve and apply; ``progress(fraction, text)`` hears each step. On any error the model is unchanged."""
    report = progress or (lambda f, t: None)
    report(0.05, "Key statistics of the layer…")
    ws.memory()
    report(0.25, "Solving: closed form" + (", then L-BFGS through the layer…" if settings.refine else "…"))
    edit = solve_request(ws, kind, settings)
    report(0.85, "Writing the new weights…")
    ws.rewriter.apply(edit)
    ws.weights_changed()
    report(1.0, f"Applied: rank {edit.rank}, {edit.solver}, strength {edit.strength:g}, {edit.seconds:.2f} s; "
                f"constraint loss {edit.loss_before:.3g} → {edit.loss_after:.3g} (at strength 1).")
    return edit


def preview_paste(ws: Workspace, settings: Settings) -> torch.Tensor:
    """The paste's target image as the edit would make it: solved, applied to a scratch copy, rendered."""
    edit = solve_request(ws, PASTE, settings)
    scratch = copy.deepcopy(ws.model)  # never the session's own model: its redo history must survive
    Rewriter(scratch).apply(edit)
    with torch.no_grad():
        return scratch(ws.inputs([ws.brush.paste[0]]))


def undo(ws: Workspace) -> None:
    _step(ws, ws.rewriter.undo, "Undid")


def redo(ws: Workspace) -> None:
    _step(ws, ws.rewriter.redo, "Redid")


def revert(ws: Workspace) -> None:
    ws.rewriter.revert()
    ws.weights_changed()
    flash("success", "Reverted every edit: the model is the original again.")


def _step(ws: Workspace, action, verb: str) -> None:
    try:
        edit = action()
    except (IndexError, RuntimeError) as exc:
        flash("info", str(exc))
        return
    ws.weights_changed()
    flash("success", f"{verb} the edit of {edit.layer} (rank {edit.rank}).")


def edit_file(ws: Workspace) -> bytes:
    """The session's edits as a dissect edit file (safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edits.safetensors"
        ws.rewriter.save(str(path))
        return path.read_bytes()


def exported_weights(ws: Workspace) -> bytes:
    """The edited model's whole state dict (safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        ws.rewriter.export(str(path))
        return path.read_bytes()


def load_edit_file(ws: Workspace, data: bytes) -> int:
    """Apply every edit in ``data`` on top of the session's edits, all or none; returns how many.

    Raises ValueError with what to do for a file that is not an edit file or was made for another model.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.safetensors"
        path.write_bytes(data)
        try:
            edits = read_edits(str(path))
        except Exception as exc:  # a foreign file fails in the safetensors parser or in the format check
            raise ValueError(f"That file is not a dissect edit file ({type(exc).__name__}: {exc}). Upload a file "
                             "saved with *Download edit file*.") from exc
    # Trial run on a scratch copy first, so a refusal leaves the session's model and its undo/redo untouched.
    trial = Rewriter(copy.deepcopy(ws.model))
    for edit in edits:
        trial.apply(edit)
    for edit in edits:
        ws.rewriter.apply(edit)
    if edits:
        ws.weights_changed()
    return len(edits)


def _history_table(history: list[Edit]) -> pd.DataFrame:
    return pd.DataFrame([
        {"#": i + 1, "request": type(e.request.get("target")).__name__ if e.request else "loaded", "layer": e.layer,
         "rank": e.rank, "solver": e.solver + (", pointwise" if e.pointwise else ""), "strength": e.strength,
         "loss before": e.loss_before, "loss after": e.loss_after,
         "seconds": round(e.seconds, 2)}
        for i, e in enumerate(history)
    ])


def before_after(ws: Workspace, seeds: list[int]) -> None:
    """Fresh seeds, original above and edited below."""
    pics = torch.cat([to_unit(ws.images(seeds, edited=False)), to_unit(ws.images(seeds, edited=True))])
    show_grid(to_uint8(pics, DISPLAY_SCALE), [f"seed {s} · original" for s in seeds] +
              [f"seed {s} · edited" for s in seeds])


def _fresh_seeds() -> list[int]:
    offset = st.session_state.get("fresh_offset", 0)
    return [s + offset for s in FRESH_SEEDS]


def _next_fresh() -> None:
    st.session_state.fresh_offset = st.session_state.get("fresh_offset", 0) + len(FRESH_SEEDS)


def apply_with_progress(ws: Workspace, kind: str, settings: Settings) -> bool:
    """:func:`apply` behind a progress bar; a refused edit becomes a message in the page. True when applied."""
    bar = st.progress(0.0, text="Starting…")
    try:
        apply(ws, kind, settings, progress=lambda f, t: bar.progress(f, text=t))
        return True
    except NeedsInput as exc:
        bar.empty()
        st.warning(str(exc))
    except (ValueError, RuntimeError, TypeError, FloatingPointError, NotImplementedError) as exc:
        bar.empty()
        st.error(f"The edit was not applied (the model is unchanged): {exc}")
    return False


def render(ws: Workspace, settings: Settings) -> None:
    show_flashes()
    st.subheader("Rewrite the layer")
    kind = st.radio("Request", list(KINDS), key="edit_kind", persist_state="session", format_func=KINDS.__getitem__,
                    horizontal=True)
    if st.button("Apply edit", type="primary", key="apply"):
        apply_with_progress(ws, kind, settings)

    if ws.edited:
        st.subheader("Before / after on fresh seeds")
        before_after(ws, _fresh_seeds())
        st.button("Other fresh seeds", on_click=_next_fresh)

    st.subheader("History")
    history = ws.rewriter.history
    if history:
        st.dataframe(_history_table(history), hide_index=True)
    else:
        st.caption("No edits yet: the model is the original.")
    c1, c2, c3 = st.columns(3)
    c1.button("Undo", on_click=undo, args=(ws,), key="undo", disabled=not history, width="stretch")
    c2.button("Redo", on_click=redo, args=(ws,), key="redo", disabled=not ws.rewriter.redoable, width="stretch")
    c3.button("Revert all", on_click=revert, args=(ws,), key="revert", disabled=not history, width="stretch")

    st.subheader("Files")
    d1, d2 = st.columns(2)
    d1.download_button("Download edit file", data=lambda: edit_file(ws), file_name="edits.safetensors",
                       mime="application/octet-stream", on_click="ignore", disabled=not history, width="stretch")
    d2.download_button("Export edited weights", data=lambda: exported_weights(ws),
                       file_name="edited-weights.safetensors", mime="application/octet-stream", on_click="ignore",
                       disabled=not history, width="stretch")
    upload = st.file_uploader("Load an edit file", type=["safetensors"], key="upload",
                              help="Applies the file's edits on top of this session's, if made for this model.")
    if upload is not None and upload.file_id not in ws.loaded_uploads:
        ws.loaded_uploads.add(upload.file_id)  # a kept upload must not be applied again on every rerun
        try:
            n = load_edit_file(ws, upload.getvalue())
            st.success(f"Loaded {n} edit(s) from {upload.name}.")
        except (ValueError, RuntimeError) as exc:
            st.error(f"{upload.name} was not loaded; the model is unchanged. {exc}")
