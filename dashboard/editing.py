"""Editing: apply a rewrite with progress, compare before/after on fresh seeds, and manage the edit history."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import streamlit as st
import torch

from dashboard import derived, requests
from dashboard.browse import show_grid
from dashboard.defaults import (
    COLLATERAL_BOUND,
    COLLATERAL_SEEDS,
    DISPLAY_SCALE,
    FRESH_SEEDS,
    GROW_IMAGES,
    MISSED_BUDGET,
    MISSED_IMAGES,
    MISSED_MANY,
    MISSED_MANY_BUDGET,
    MISSED_POOL,
)
from dashboard.imaging import to_uint8
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import STATS_DIR, Workspace, base_model
from dissect import measure
from dissect.errors import DissectError
from dissect.rewrite import Calibration, Edit, Erase, calibrate_strength, read_edits, solve
from dissect.visualize import to_unit

if TYPE_CHECKING:
    import pandas as pd

ERASE, PASTE = "Erase", "Paste"
KINDS = {ERASE: "Erase what the context shows", PASTE: "Paste the copied region (a new rule)"}
FLASH = "flash"  # session_state key: messages from callbacks, shown on the next run


def flash(kind: str, text: str) -> None:
    st.session_state.setdefault(FLASH, []).append((kind, text))


def show_flashes() -> None:
    for kind, text in st.session_state.pop(FLASH, []):
        getattr(st, kind)(text)


def solve_request(ws: Workspace, kind: str, settings: Settings, protect: bool = True) -> Edit:
    """Solve (never apply) the session's current request at its layer (:func:`requests.layer_for`), protecting
    the session's earlier edits unless ``protect`` is False."""
    return solve_calibrated(ws, kind, settings, protect)[0]


def solve_calibrated(ws: Workspace, kind: str, settings: Settings,
                     protect: bool = True) -> tuple[Edit, Calibration | None]:
    """:func:`solve_request`, and what calibrating its strength on the context's images found (None where the
    settings fix the strength)."""
    settings = requests.for_kind(kind, settings)
    target, context = requests.erase(ws, settings) if kind == ERASE else requests.paste(ws, settings)
    memory = ws.memory(requests.layer_for(ws, settings))
    edit = solve(memory, target, context, refine=settings.refine, max_iter=settings.iterations,
                 pointwise=settings.pointwise, budget=settings.budget, protect=ws.rewriter.history if protect else ())
    if settings.strength is None:
        found = calibrate_strength(ws.rewriter, memory, edit)
        return found.edit, found
    return edit.scaled(settings.strength), None


def apply(ws: Workspace, kind: str, settings: Settings,
          progress: Callable[[float, str], None] | None = None) -> Edit:
    """Solve and apply; ``progress(fraction, text)`` hears each step. On any error the model is unchanged."""
    report = progress or (lambda f, t: None)
    report(0.05, "Key statistics of the layer…")
    ws.memory(requests.layer_for(ws, requests.for_kind(kind, settings)))
    report(0.25, "Solving: closed form" + (", then L-BFGS through the layer…" if settings.refine else "…"))
    edit = solve_request(ws, kind, settings)
    report(0.85, "Writing the new weights…")
    ws.rewriter.apply(edit)
    ws.weights_changed()
    report(1.0, f"Applied: rank {edit.rank}, {edit.solver}, strength {edit.strength:g}, {edit.seconds:.2f} s; "
                f"constraint loss {edit.loss_before:.3g} → {edit.loss_after:.3g} (at strength 1).")
    return edit


def preview_paste(ws: Workspace, settings: Settings) -> torch.Tensor:
    """The paste's target image as the edit would make it: solved, tried (weights, history and redo bitwise
    after), rendered."""
    edit = solve_request(ws, PASTE, settings)
    with ws.rewriter.trial([edit]):
        return ws.run([ws.brush.paste[0]])


def collateral(ws: Workspace, edit: Edit) -> float | None:
    """How much ``edit`` changes fresh samples (:data:`COLLATERAL_SEEDS`) that no request showed: the median
    perceptual distance between the current and the edited renders, as a share of the distance between two
    different images (``dissect.measure``). None when it cannot be measured (no segmenter, or the model does not
    draw RGB images)."""
    seg = derived.segmenter()
    seeds = list(COLLATERAL_SEEDS)
    before = ws.images(seeds)
    if seg is None or before.dim() != 4 or before.shape[1] != 3:
        return None
    perceptual = measure.Perceptual(seg)
    base, sampler, _ = base_model(ws.spec)
    scale = measure.calibrate(base, sampler, range(64), perceptual, cache_dir=STATS_DIR / "measure")
    with ws.rewriter.trial([edit]):
        after = ws.run(seeds)
    return float(measure.relative(perceptual.distance(before, after).median(), scale))


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
    buffer = io.BytesIO()
    ws.rewriter.save(buffer)
    return buffer.getvalue()


def exported_weights(ws: Workspace) -> bytes:
    """The edited model's whole state dict (safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        ws.rewriter.export(str(path))
        return path.read_bytes()


def load_edit_file(ws: Workspace, data: bytes, name: str = "the uploaded file") -> int:
    """Apply every edit in ``data`` on top of the session's edits, all or none; returns how many.

    Raises :class:`~dissect.errors.DissectError` with what to do for a file that is not an edit file or was made
    for another model; the session's model and its undo/redo are then untouched."""
    upload = io.BytesIO(data)
    upload.name = name
    edits = read_edits(upload)
    ws.rewriter.apply_all(edits)
    if edits:
        ws.weights_changed()
    return len(edits)


def _history_table(history: list[Edit]) -> pd.DataFrame:
    import pandas as pd  # here, not at the top: it costs the first page about 0.3 s, and only this table needs it

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


PENDING = "pending_edit"  # session_state key: a solved edit whose collateral waits for the user's confirmation


def _refused(exc: Exception) -> None:
    if isinstance(exc, NeedsInput):
        st.warning(str(exc))
    else:
        st.error(f"The edit was not applied (the model is unchanged): {exc}")


def apply_with_progress(ws: Workspace, kind: str, settings: Settings) -> bool:
    """:func:`apply` behind a progress bar; a refused edit becomes a message in the page. True when applied."""
    bar = st.progress(0.0, text="Starting…")
    try:
        apply(ws, kind, settings, progress=lambda f, t: bar.progress(f, text=t))
        return True
    except (DissectError, RuntimeError) as exc:
        bar.empty()
        _refused(exc)
    return False


def _describe(edit: Edit, change: float | None) -> str:
    seen = f"changes unrelated fresh samples by {change:.3f} of a different image" if change is not None else \
        "its effect on unrelated samples cannot be measured for this model"
    return (f"rank {edit.rank}, {edit.solver}, strength {edit.strength:g}, {edit.seconds:.1f} s; moves "
            f"{100 * edit.expected_change:.2g}% of the layer's output energy; {seen}")


# After an erase, what the recommended flow does next (benchmarks/eval_user.py): a rule brushed on one kind of mark
# can leave another (the dusk scenes' marks and the day scenes' STOCK), and a second, smaller round on what remains
# clears it while the first edit is kept (dashboard.followup).
SECOND_ROUND = ("Look for what it missed: press *Erase what it missed*. It finds the images of the pool where "
                "the edited model still draws what you erased, brushes it on three of them, adds their best matches "
                "and erases it with a small change. This edit is kept. (Without the segmenter: where the grid still "
                "shows it, *Clear everything*, brush it in *Context* and *Apply edit* again.)")


def _commit(ws: Workspace, edit: Edit, change: float | None) -> None:
    ws.rewriter.apply(edit)
    ws.weights_changed()
    st.session_state.pop(PENDING, None)
    flash("success", f"Applied: {_describe(edit, change)}.")
    if isinstance(edit.request.get("target"), Erase):
        flash("info", SECOND_ROUND)


def _discard() -> None:
    st.session_state.pop(PENDING, None)
    flash("info", "Discarded the edit; the model is unchanged.")


def solve_and_check(ws: Workspace, kind: str, settings: Settings) -> None:
    """The *Apply edit* button: solve, measure the collateral on fresh samples, and apply (:func:`checked`)."""
    def steps(bar: Any) -> tuple[Edit, Calibration | None]:
        chosen = requests.for_kind(kind, settings)
        ws.memory(requests.layer_for(ws, chosen))
        by_look = kind == PASTE and chosen.appearance
        bar.progress(0.25, text="Finding the value that makes the pasted regions look like the copy (seconds), then "
                                "solving…" if by_look else "Solving and calibrating the strength…")
        return solve_calibrated(ws, kind, settings)

    checked(ws, "Key statistics of the layer…", steps)


def checked(ws: Workspace, first: str, steps: Callable[[Any], tuple[Edit, Calibration | None]]) -> None:
    """Behind a progress bar (``first`` its first text): ``steps(bar)`` solves an edit, its collateral is measured
    on fresh samples, and :func:`check_and_commit` applies or holds it; a refused request becomes a message."""
    bar = st.progress(0.05, text=first)
    try:
        edit, found = steps(bar)
        bar.progress(0.75, text=f"Trying it on {len(COLLATERAL_SEEDS)} fresh samples…")
        change = collateral(ws, edit)
    except (DissectError, RuntimeError) as exc:
        bar.empty()
        _refused(exc)
        return
    bar.empty()
    check_and_commit(ws, edit, change, found)


def check_and_commit(ws: Workspace, edit: Edit, change: float | None, found: Calibration | None = None) -> None:
    """Apply a solved edit whose collateral is ``change``; one above :data:`COLLATERAL_BOUND`, or a rule that does
    not carry to the context's other images (``found``, its strength calibration), waits for *Apply anyway* (kept
    in the session as pending, with the reason)."""
    reasons = []
    if found is not None and not found.carries:
        reasons.append(f"the rule does not carry to the context's other images: at every strength from "
                       f"{min(found.losses):g} to {max(found.losses):g}, their renders end farther from the request "
                       f"made on them than with no edit, so it changes the model without generalising. Try another "
                       f"layer, a copy that covers the whole object, or other context images")
    if change is not None and change > COLLATERAL_BOUND:
        reasons.append(f"it changes unrelated fresh samples by more than {COLLATERAL_BOUND:.2f} of a different "
                       f"image: try a smaller *Change budget* or rank under *Advanced*, a tighter brush, or more "
                       f"context images")
    if reasons:
        st.session_state[PENDING] = (edit, change, reasons)
    else:
        _commit(ws, edit, change)


def render_pending(ws: Workspace) -> None:
    """A solved edit held back: say why, show it on fresh samples, and let the user decide."""
    edit, change, reasons = st.session_state[PENDING]
    st.warning(f"This edit ({_describe(edit, change)}) is not applied yet: " + "; and ".join(reasons) + ".")
    seeds = list(COLLATERAL_SEEDS)[:6]
    with ws.rewriter.trial([edit]):
        after = ws.run(seeds)
    pics = torch.cat([to_unit(ws.images(seeds)), to_unit(after)])
    show_grid(to_uint8(pics, DISPLAY_SCALE), [f"seed {s} · now" for s in seeds] + [f"seed {s} · with the edit"
                                                                                     for s in seeds])
    c1, c2 = st.columns(2)
    c1.button("Apply anyway", on_click=_commit, args=(ws, edit, change), key="apply_anyway", width="stretch")
    c2.button("Discard", on_click=_discard, key="discard", width="stretch")


def add_matches(ws: Workspace, kind: str, settings: Settings) -> int:
    """*Add the best matches to the context*: the pool images that match the brushed context best join it, each
    stamped where it matches (shown like brushed ones, and cleared the same way). Returns how many joined."""
    from dashboard import brushing  # brushing imports this module for its previews

    chosen = requests.for_kind(kind, settings)
    ctx = requests.grown_context(ws, chosen.rank, layer=requests.layer_for(ws, chosen))
    added = [(s, m) for s, m in zip(ctx.seeds or [], ctx.masks) if s not in ws.brush.context]
    for seed, mask in added:
        brushing.stamp(ws.brush, brushing.CONTEXT, seed, mask)
    return len(added)


def _add_matches(ws: Workspace, kind: str, settings: Settings) -> None:
    try:
        n = add_matches(ws, kind, settings)
    except (DissectError, RuntimeError) as exc:
        flash("warning", str(exc))
        return
    flash("success" if n else "info", f"Added {n} matching image(s) to the context (seeds from the pool)." if n else
          "No pool image matches the context above the threshold; brush more examples instead.")


def followup_button(ws: Workspace, settings: Settings) -> bool:
    """*Erase what it missed*, shown after an erase; True when pressed."""
    from dashboard import followup  # it builds on this module

    if followup.last_erase(ws) is None:
        return False
    pressed = st.button("Erase what it missed", key="erase_missed", width="stretch",
                        help=f"Finds the images among the pool's first {MISSED_POOL} where the edited model still "
                             f"draws what the last erase removed (by the segmenter), brushes it on the "
                             f"{MISSED_IMAGES} that show the most, adds their best matches and erases it at a budget "
                             f"of at most {MISSED_BUDGET:g} ({MISSED_MANY_BUDGET:g} where {MISSED_MANY} images or "
                             f"more still show it): what is left, the first erase already weakened. Replaces the "
                             f"context.")
    if pressed:
        erase_missed(ws, settings)
    return pressed


def erase_missed(ws: Workspace, settings: Settings) -> None:
    """The second round of an erase (:mod:`dashboard.followup`), then the *Apply edit* button's checks."""
    from dashboard import followup

    def steps(bar: Any) -> tuple[Edit, None]:
        missed = followup.find(ws)
        bar.progress(0.3, text=f"Brushing the {missed.name} left on {len(missed.found)} image(s), adding matches…")
        stamped = followup.brush(ws, missed, settings)
        bar.progress(0.45, text="Solving…")
        edit = followup.solve(ws, missed, settings)
        flash("info", f"The edited model still drew a {missed.name} on {len(missed.found)} of the pool's first "
                      f"{MISSED_POOL} images. The context is now where seeds {', '.join(map(str, stamped))} show "
                      f"it, and their best matches; the erase of it was solved at a budget of at most "
                      f"{followup.missed_budget(missed):g}.")
        return edit, None

    checked(ws, f"Segmenting the pool's first {MISSED_POOL} images as the edited model draws them…", steps)


def _load_upload(ws: Workspace) -> None:
    """The uploader's callback: runs before the page is drawn, so the history below already shows the loaded
    edits."""
    upload = st.session_state.get("upload")
    if upload is None or upload.file_id in ws.loaded_uploads:
        return
    ws.loaded_uploads.add(upload.file_id)  # a kept upload must not be applied again on every rerun
    try:
        n = load_edit_file(ws, upload.getvalue(), upload.name)
        flash("success", f"Loaded {n} edit(s) from {upload.name}.")
    except (DissectError, RuntimeError) as exc:
        flash("error", f"{upload.name} was not loaded; the model is unchanged. {exc}")


def render(ws: Workspace, settings: Settings) -> None:
    show_flashes()
    st.subheader("Rewrite the layer")
    kind = st.radio("Request", list(KINDS), key="edit_kind", persist_state="session", format_func=KINDS.__getitem__,
                    horizontal=True)
    layer = requests.layer_for(ws, requests.for_kind(kind, settings))
    if layer != ws.layer:
        st.caption(f"Solved at **{layer}**, the layer recommended for this request (the sidebar's is {ws.layer}: untick "
                   f"*Recommended settings* under *Advanced* to solve there).")
    c1, c2 = st.columns([1, 2])
    if c1.button("Apply edit", type="primary", key="apply", width="stretch"):
        solve_and_check(ws, kind, settings)
        show_flashes()
    c2.button("Add the best matches to the context", key="add_matches", on_click=_add_matches,
              args=(ws, kind, settings), width="stretch",
              help=f"Thickens a context brushed on a few images with the {GROW_IMAGES} images of the pool whose keys "
                   f"match it best, each where it matches (as the key-match view outlines). A rule then reaches "
                   f"more of its kind.")
    if followup_button(ws, settings):
        show_flashes()
    if PENDING in st.session_state:
        render_pending(ws)

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
    st.file_uploader("Load an edit file", type=["safetensors"], key="upload", on_change=_load_upload, args=(ws,),
                     help="Applies the file's edits on top of this session's, if made for this model.")
