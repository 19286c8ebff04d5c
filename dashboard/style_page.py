"""Style controls and attribute vectors beside a grid: truncation ψ, style mixing with a second seed, noise per
layer, α per attribute, and interpolation between two seeds.

Everything renders this session's model through :mod:`dissect.style`, so an applied edit stays in effect under every
control. The attribute vectors are fitted once per model on the shared, unedited model (segmenter labels of
:data:`FIT_SEEDS`, or the seeds a user labels) and move the session's model's samples.
"""

from __future__ import annotations

import streamlit as st
import torch

from dashboard import derived
from dashboard.browse import show_grid
from dashboard.defaults import DISPLAY_SCALE
from dashboard.imaging import parse_seeds, to_uint8
from dashboard.requests import Settings
from dashboard.workspace import Workspace, base_model
from dissect.attributes import (
    ALPHA_RANGE,
    METHODS,
    MIN_PER_CLASS,
    SEGMENTER_ATTRIBUTES,
    AttributeVector,
    clamp_alpha,
    segmenter_labels,
)
from dissect.errors import DissectError
from dissect.measure import render as measure_render
from dissect.style import (
    GROUPS,
    NOISE_MODES,
    TRUNCATION_RANGE,
    Shift,
    Style,
    interpolate,
    layer_groups,
    noise_layers,
    synthesize,
)
from dissect.style import render as style_render
from dissect.visualize import to_unit

FIT_SEEDS = range(600_000, 600_300)  # samples the segmenter labels for the attribute vectors (fitted once per model)
GROUP_NOTE = {"coarse": "layout and pose", "middle": "shapes: which buildings, trees", "fine": "colour, texture, detail"}
AS_GROUP = "as its group"


@st.cache_resource(show_spinner="Labelling samples for the attribute vectors (once per model)…", max_entries=4)
def fit_set(spec: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latents of :data:`FIT_SEEDS` and each segmenter attribute's labels (1 / 0 / -1) on the unedited model."""
    model, sampler, _ = base_model(spec)
    seeds = list(FIT_SEEDS)
    rendered = measure_render(model, sampler, seeds, derived.segmenter())
    return sampler(seeds), {a: segmenter_labels(rendered.images, rendered.labels, a) for a in SEGMENTER_ATTRIBUTES}


@st.cache_resource(show_spinner="Fitting an attribute vector…", max_entries=64)
def segmenter_vector(spec: str, attribute: str, space: str, method: str) -> AttributeVector:
    """A segmenter attribute's vector on the unedited model; a DissectError (not cached) says why there is none."""
    z, labels = fit_set(spec)
    return AttributeVector(base_model(spec)[0], space, method, name=attribute).fit(z, labels[attribute])


def user_vector(ws: Workspace, positives: list[int], negatives: list[int], space: str, method: str) -> AttributeVector:
    def fit() -> AttributeVector:
        labels = [1] * len(positives) + [0] * len(negatives)
        vec = AttributeVector(base_model(ws.spec)[0], space, method, name="your attribute")
        return vec.fit(ws.inputs(positives + negatives), labels)

    return derived.cached(ws, ("user_vector", tuple(positives), tuple(negatives), space, method), fit)


def style_controls(ws: Workspace) -> Style:
    """Truncation, mixing and noise widgets -> the :class:`Style` they ask for."""
    groups = layer_groups(ws.model)
    lo, hi = TRUNCATION_RANGE
    psi = st.slider("Truncation ψ", lo, hi, 1.0, 0.05, key="style_psi", persist_state="session",
                    help="1 samples as trained; towards 0 every sample moves to the average image (less variety, "
                         "fewer odd samples); above 1 exaggerates.")

    def describe(g: str) -> str:
        blocks = sorted({name.split(".")[1] for name in groups[g]}, key=lambda b: int(b[1:]))
        return f"{g}: {', '.join(blocks)} ({GROUP_NOTE[g]})"

    mix = st.multiselect("Styles from a second seed", GROUPS, key="style_mix", persist_state="session",
                         format_func=describe, help="These groups of layers take their w from the second seed.")
    mix_seed = int(st.number_input("Second seed", 0, 2**31 - 1, 1, key="style_mix_seed", persist_state="session"))
    st.caption("Noise adds per-pixel detail: *const* the model's fixed maps, *off* none, *resample* fresh noise per seed.")
    cols = st.columns(len(GROUPS))
    noise = {g: col.selectbox(g, NOISE_MODES, key=f"style_noise_{g}", persist_state="session")
             for g, col in zip(GROUPS, cols)}
    with st.expander("Noise per layer"):
        for layer in noise_layers(ws.model):
            mode = st.selectbox(layer, (AS_GROUP, *NOISE_MODES), key=f"style_noise_{layer}", persist_state="session")
            if mode != AS_GROUP:
                noise[layer] = mode
        noise_seed = int(st.number_input("Resampled noise seed", 0, 2**31 - 1, 0, key="style_noise_seed",
                                         persist_state="session"))
    return Style(truncation=psi, mix_seed=mix_seed if mix else None, mix=tuple(mix), noise=noise, noise_seed=noise_seed)


def _seeds(text: str) -> list[int]:
    """Seeds typed as in the sidebar; none for a blank box (a fit then says how many it needs)."""
    return parse_seeds(text, limit=10_000) if text.strip() else []


def _space_choices(ws: Workspace) -> list[str]:
    return ["w", "z", *[info.name for info in ws.layers]]


def attribute_controls(ws: Workspace) -> list[Shift]:
    """The vector settings and one α slider per attribute -> the shifts to render with (problems shown inline)."""
    c1, c2 = st.columns(2)
    space = c1.selectbox("Move in", _space_choices(ws), key="attr_space", persist_state="session",
                         help="w: the style space; z: the input latent; a layer: its activations, added during the "
                              "forward.")
    method = c2.selectbox("Direction", METHODS, key="attr_method", persist_state="session",
                          format_func=lambda m: {"mean": "mean difference", "probe": "logistic probe"}[m])
    lo, hi = ALPHA_RANGE
    st.caption(f"α = 1 moves a sample by the gap between the two classes' means along the direction; "
               f"α = −1 removes as much. Vectors are fitted on {len(FIT_SEEDS)} samples the segmenter labels.")
    shifts: list[Shift] = []
    wanted: list[tuple[str, float, object]] = []  # (name, α, how to fit) for the sliders not at 0
    if derived.segmenter() is not None:
        for attribute in SEGMENTER_ATTRIBUTES:
            alpha = st.slider(f"α {attribute}", lo, hi, 0.0, 0.25, key=f"alpha_{attribute}", persist_state="session")
            wanted.append((attribute, alpha, lambda a=attribute: segmenter_vector(ws.spec, a, space, method)))
    else:
        st.info("The segmenter's weights are not installed: label seeds yourself below.")
    with st.expander("Your attribute (label seeds yourself)"):
        pos_text = st.text_input("Seeds that show it", key="attr_pos", persist_state="session", placeholder="e.g. 3, 8, 20-29")
        neg_text = st.text_input("Seeds that do not", key="attr_neg", persist_state="session", placeholder="e.g. 0-2, 4-7")
        alpha = st.slider("α your attribute", lo, hi, 0.0, 0.25, key="alpha_user", persist_state="session")
        st.caption(f"Each side needs at least {MIN_PER_CLASS} seeds.")
        if pos_text.strip() or neg_text.strip():
            try:
                pos, neg = _seeds(pos_text), _seeds(neg_text)
            except ValueError as exc:
                st.warning(str(exc))
            else:
                wanted.append(("your attribute", alpha, lambda: user_vector(ws, pos, neg, space, method)))
    for name, alpha, fit in wanted:
        if alpha == 0:
            continue
        alpha, note = clamp_alpha(alpha)
        if note:
            st.caption(f"{name}: {note}")
        try:
            shifts.append(fit().shift(alpha))
        except DissectError as exc:
            st.warning(f"No vector for {name}: {exc}")
    return shifts


def render_interpolation(ws: Workspace, style: Style) -> None:
    with st.expander("Interpolate between two seeds"):
        c1, c2, c3, c4 = st.columns(4)
        a = int(c1.number_input("From seed", 0, 2**31 - 1, 0, key="interp_a", persist_state="session"))
        b = int(c2.number_input("To seed", 0, 2**31 - 1, 1, key="interp_b", persist_state="session"))
        steps = int(c3.number_input("Steps", 2, 12, 6, key="interp_steps", persist_state="session"))
        space = c4.radio("In", ("w", "z"), key="interp_space", persist_state="session", horizontal=True,
                         help="z: spherical, through the input latent; w: a straight line in the style space.")
        st.caption("With ψ and the noise settings above (the noise of the first seed along the path).")
        path = interpolate(ws.model, ws.inputs([a]), ws.inputs([b]), steps, space, style.truncation)
        with torch.no_grad():
            images = synthesize(ws.model, path, [a] * steps, Style(noise=style.noise, noise_seed=style.noise_seed))
        show_grid(to_uint8(to_unit(images), DISPLAY_SCALE), [f"{i}/{steps - 1}" for i in range(steps)], columns=steps,
                  key="style_interpolation")


def render(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    st.subheader("Style and attribute vectors")
    try:
        layer_groups(ws.model)
    except DissectError as exc:
        st.info(str(exc))
        return
    controls, grid = st.columns([1, 2])
    with controls:
        try:
            style = style_controls(ws)
        except DissectError as exc:
            st.warning(str(exc))
            style = Style()
        shifts = attribute_controls(ws)
    with grid:
        edits = len(ws.rewriter.history)
        st.caption(f"Seeds {seeds[0]}…{seeds[-1]}" + (f", with the {edits} applied edit(s)" if edits else ", unedited")
                   + f"; {len(shifts)} attribute move(s).")
        try:
            images = style_render(ws.model, ws.sampler, seeds, style, shifts)
        except DissectError as exc:
            st.warning(f"Cannot render: {exc}")
            return
        show_grid(to_uint8(to_unit(images), DISPLAY_SCALE), [f"seed {s}" for s in seeds], key="style_grid")
    render_interpolation(ws, style)
