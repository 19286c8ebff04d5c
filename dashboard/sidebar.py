"""The sidebar: which model, which layer, which seeds, and the solver settings."""

from __future__ import annotations

import dataclasses

import streamlit as st

from dashboard import workspace
from dashboard.defaults import DEFAULT_ITERATIONS, DEFAULT_MODEL, DEFAULT_RANK, DEFAULT_SEEDS, DEFAULT_UNITS
from dashboard.imaging import format_seeds, parse_seeds
from dashboard.requests import RECOMMENDED, Settings
from dashboard.workspace import ModelLoadError, Workspace, spatial_layers
from dissect.hooks import LayerInfo
from dissect.rewrite import DEFAULT_BUDGET

EMBEDDED, ENTRY_POINT = "Embedded generator", "Your model (entry point)"


def _layer_label(info: LayerInfo) -> str:
    """The full name first (the picker is narrow), then resolution and channels; the recommended layer (the
    evaluation's) starred in front."""
    size = "×".join(map(str, info.output_size)) if info.output_size else "–"
    star, best = ("★ ", " (recommended)") if info.name == workspace.DEFAULT_LAYER else ("", "")  # ★ first: a narrow
    return f"{star}{info.name}{best} · {size} · {info.in_channels}→{info.out_channels} {info.type}"  # picker cuts the end


def _model_spec() -> str:
    source = st.radio("Model", [EMBEDDED, ENTRY_POINT], key="model_source", horizontal=True)
    if source == EMBEDDED:
        return DEFAULT_MODEL
    spec = st.text_input(
        "Entry point", key="entry_point", placeholder="package.module:function",
        help="A function returning (model, sampler); sampler(seeds) gives the model's inputs.",
    )
    return spec.strip()


def _more_seeds() -> None:
    try:
        seeds = parse_seeds(st.session_state.seeds)
    except ValueError:
        return
    nxt = max(seeds) + 1
    st.session_state.seeds = format_seeds(sorted(seeds + list(range(nxt, nxt + len(seeds)))))


def _settings(ws: Workspace) -> Settings:
    """The *Advanced* solver settings, or (``recommended=True``) each request kind's recommended ones."""
    channels = ws.memory_channels()
    with st.expander("Advanced: solver settings"):
        if st.checkbox("Recommended settings for each request", value=True, key="recommended",
                       help="The settings that did best on simulated newcomer requests (benchmarks/eval_user.py), "
                            "per request kind; untick to set your own."):
            st.caption(" · ".join(f"**{kind}**: {_describe(s)}" for kind, s in RECOMMENDED.items()))
            return dataclasses.replace(RECOMMENDED["Erase"], recommended=True)
        rank = st.number_input("Rank", 1, channels, min(DEFAULT_RANK, channels), key="rank",
                               help="Dimensions of the context subspace D an edit may change; higher generalises "
                                    "wider.")
        budget = st.select_slider("Change budget", BUDGETS, DEFAULT_BUDGET, key="budget",
                                  format_func=lambda b: f"{b:.0%}" if b >= 0.01 else f"{b:.1%}",
                                  help="The most an edit may change the layer's output, averaged over the data (the "
                                       "paper's smoothness term): larger fits the request more closely and changes "
                                       "more of everything else.")
        refine = st.radio("Solve", [True, False], key="refine", format_func=lambda r: REFINE[r],
                          help="The closed form is exact for the layer's linear part; L-BFGS then fits the real "
                               "layer (demodulation, bias, activation) while staying inside span(D).")
        iterations = st.number_input("L-BFGS iterations", 1, 500, DEFAULT_ITERATIONS, key="iterations",
                                     disabled=not refine, help="More fit the layer better and take longer.")
        units = st.number_input("Erase: units zeroed", 1, channels, min(DEFAULT_UNITS, channels), key="units",
                                help="Key channels most aligned with the context that an erase switches off in its "
                                     "target values.")
        onto = st.checkbox("Paste: only onto the painted region", key="onto_region",
                           help="The copy must appear only where you painted in Paste mode (over a spire, say); the "
                                "rest of its box may keep its own look: a smaller, more specific edit.")
        look = st.checkbox("Paste: by appearance", key="appearance",
                           help="Store the value that makes the pasted region and the context's first regions look "
                                "like the copy to the segmenter (its features, colours and classes), instead of "
                                "copying the copy's own values, which can draw something else in new surroundings.")
        pointwise = st.checkbox("Pointwise (kernel centre only)", key="pointwise",
                                help="Each location's value changes by its own key alone, not its neighbours'. A "
                                     "paste onto a small object (a spire) then reaches the other objects of its kind.")
        calibrate = st.checkbox("Calibrate the strength on the context images", value=True, key="calibrate",
                                help="Tries strengths from 0.5 to 6 and keeps the one whose renders of the context's "
                                     "images come closest to the request made on each of them.")
        strength = st.slider("Strength", 0.25, 5.0, 1.0, 0.25, key="strength", disabled=calibrate,
                             help="Scales the solved change. The solve fits the request's own keys; other keys of "
                                  "the context change less where they match less.")
    return Settings(int(rank), bool(refine), int(iterations), int(units), bool(onto), bool(pointwise),
                    None if calibrate else float(strength), float(budget), bool(look))


def _describe(s: Settings) -> str:
    parts = ([f"at {s.layer}"] if s.layer else []) + [f"rank {s.rank}", f"budget {s.budget:.0%}"]
    parts += ["pointwise"] * s.pointwise + ["onto the painted region"] * s.onto_region + ["by appearance"] * s.appearance
    strength = ["strength calibrated on the context"] if s.strength is None else (
        [f"strength {s.strength:g}"] if s.strength != 1 else [])
    return ", ".join(parts + strength)


BUDGETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
REFINE = {True: "Closed form + L-BFGS", False: "Closed form only"}


def render() -> tuple[Workspace | None, list[int], Settings | None]:
    """Draw the sidebar: this session's workspace (None when no model could be opened), seeds and settings."""
    with st.sidebar:
        st.title("dissect")
        spec = _model_spec()
        ws = workspace.current()
        if spec and (ws is None or ws.spec != spec):
            try:
                ws = workspace.switch(spec)
            except ModelLoadError as exc:
                st.error(str(exc))
                if ws is not None:
                    st.info(f"Still working on {ws.spec!r}; its edits are unchanged.")
        elif not spec:
            st.info("Type an entry point such as `mypackage.models:build`.")
        if ws is None:
            return None, [], None

        choices = spatial_layers(ws.layers) or ws.layers
        names = [info.name for info in choices]
        labels = {info.name: _layer_label(info) for info in choices}
        if st.session_state.get("layer") not in names:
            st.session_state.layer = ws.layer
        ws.layer = st.selectbox("Layer", names, key="layer", format_func=labels.__getitem__,
                                help="The layer whose weights an edit rewrites (name · type in→out · resolution).")

        if "seeds" not in st.session_state:
            st.session_state.seeds = DEFAULT_SEEDS
        st.text_input("Seeds", key="seeds", help="Which images to show: '0-11', or '3, 7, 20-25'.")
        st.button("More images", on_click=_more_seeds)
        try:
            seeds = parse_seeds(st.session_state.seeds)
        except ValueError as exc:
            st.error(str(exc))
            seeds = parse_seeds(DEFAULT_SEEDS)
        settings = _settings(ws)
    return ws, seeds, settings
