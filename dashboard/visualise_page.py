"""Visualising what a unit, a key cluster or the context direction responds to (``dissect.featurevis``).

For the open model the objective lives at the chosen layer's keys, where rewrites act: a generator's latent w is
optimised (a model taking images gets an optimised image instead). The segmenter, and the training run's
discriminator when a checkpoint is found, take images: their units are visualised through a decorrelated Fourier
image under random transformations. A run shows its progress; *Stop* ends it and keeps the images reached so far.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import streamlit as st
import torch
from torch import nn

from dashboard import derived, requests
from dashboard.browse import show_grid
from dashboard.defaults import DEFAULT_CLUSTERS, DISPLAY_SCALE
from dashboard.imaging import to_uint8
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import Workspace
from dissect.errors import DissectError
from dissect.featurevis import (
    CPPNImage,
    FourierImage,
    LatentParam,
    Objective,
    PixelImage,
    channel,
    context_direction,
    key_cluster,
    standard_transforms,
    visualise,
    world_colour_correlation,
)
from dissect.hooks import layers
from dissect.visualize import to_unit

RESULT = "featurevis_result"  # session key: the last run's images, kept when a run is stopped
UNIT, CLUSTER, DIRECTION = "Unit", "Key cluster", "Context direction"
PARAMETERISATIONS = ("Fourier + decorrelated colour", "Fourier", "Pixels", "CPPN")
PREVIEW_EVERY = 8  # steps between the previews a stopped run keeps


@dataclass
class Target:
    """A model the page can visualise: its label, the module, and whether its own keys hold the context."""

    label: str
    model: nn.Module
    workspace: bool  # the open model (units, clusters and the context at the chosen layer)
    image_shape: tuple[int, int, int] | None  # (C, H, W) when the model takes images, else None (a latent)


@st.cache_resource(show_spinner="Loading the discriminator…")
def discriminator() -> nn.Module | None:
    """The training run's discriminator (``python -m dissect.models.train``'s checkpoint), or None without one."""
    from dissect.models.stylegan import Discriminator
    from dissect.models.train import DEFAULT_OUT, checkpoint_path

    path = checkpoint_path(DEFAULT_OUT)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["D"]
        # Feature convolutions' output channels, finest first: resolution 64 -> 32 -> ... -> 4.
        outs = [v.shape[0] for k, v in state.items() if k.startswith("features.") and k.endswith("weight.original")]
        resolution = 4 * 2 ** (len(outs) - 1)
        D = Discriminator(resolution, {resolution >> i: c for i, c in enumerate(outs)})
        D.load_state_dict(state)
    except Exception:  # a checkpoint of another shape or version: the page offers the other models
        return None
    return D.eval().requires_grad_(False)


def targets(ws: Workspace) -> list[Target]:
    example = ws.inputs([0])
    takes_images = isinstance(example, torch.Tensor) and example.dim() == 4
    own = f"{ws.spec}: " + ("optimise an image" if takes_images else "optimise the latent")
    found = [Target(own, ws.model, True, tuple(example.shape[1:]) if takes_images else None)]
    # Shared read-only models get a copy per session: another session's hooks on the same modules would record
    # this session's forwards.
    for label, shared in (("Segmenter", derived.segmenter()), ("Discriminator (training checkpoint)", discriminator())):
        if shared is not None:
            own_copy = derived.cached(ws, ("featurevis_model", label), lambda m=shared: copy.deepcopy(m))
            found.append(Target(label, own_copy, False, (3, 64, 64)))
    return found


def workspace_objective(ws: Workspace, what: str, settings: Settings) -> tuple[Objective, str]:
    """The objective at the chosen layer's keys, and a caption. Raises NeedsInput when the context is empty."""
    if what == UNIT:
        index = st.number_input("Unit (key channel)", 0, ws.memory_channels() - 1, 0, key="featurevis_unit",
                                persist_state="session")
        return channel(ws.layer, int(index), where="keys"), f"unit {index} of {ws.layer}"
    if what == CLUSTER:
        k = int(st.session_state.get("cluster_k", DEFAULT_CLUSTERS))
        chosen = ws.brush.cluster if ws.brush.cluster is not None and ws.brush.cluster_k == k else 0
        index = st.selectbox(f"Cluster (of the {k} under *Inspect*)", range(k), index=chosen, key="featurevis_cluster")
        with st.spinner("Clustering the layer's keys…"):
            fitted = derived.clusters(ws, k)
        return key_cluster(fitted, int(index)), f"key cluster {index} of {k} at {ws.layer}"
    ctx = requests.selection(ws, settings.rank)
    return context_direction(ws.memory(), derived.directions(ws, ctx)), f"the context direction (rank {ctx.rank})"


def unit_objective(target: Target) -> tuple[Objective, str]:
    """A unit of one of an image model's convolutions, chosen by the user."""
    c, h, w = target.image_shape
    found = [info for info in layers(target.model, torch.zeros(1, c, h, w)) if info.output_size]
    names = [info.name for info in found]
    layer = st.selectbox("Layer", names, index=len(names) // 2, key=f"featurevis_layer_{target.label}")
    channels = next(info.out_channels for info in found if info.name == layer)
    index = st.number_input("Unit (channel)", 0, channels - 1, 0, key=f"featurevis_channel_{target.label}")
    return channel(layer, int(index)), f"unit {index} of {target.label.lower()} {layer}"


def image_param(kind: str, n: int, shape: tuple[int, int, int], seed: int) -> nn.Module:
    c, h, w = shape
    corr = world_colour_correlation() if c == 3 else None
    if kind == PARAMETERISATIONS[0]:
        return FourierImage(n, c, (h, w), decorrelate=corr, seed=seed)
    if kind == "Fourier":
        return FourierImage(n, c, (h, w), seed=seed)
    if kind == "Pixels":
        return PixelImage(n, c, (h, w), seed=seed)
    return CPPNImage(n, c, (h, w), seed=seed)


def run(target: Target, ws: Workspace, objective: Objective, caption: str, n: int, steps: int, seed: int,
        kind: str, transformed: bool) -> None:
    """Optimise with a progress bar, keeping a preview in the session so that *Stop* leaves the images so far."""
    if target.image_shape is None:
        param: Any = LatentParam(target.model, ws.inputs(list(range(seed, seed + n))), space="w")
        lr, transforms = 0.01, None
    else:
        param = image_param(kind, n, target.image_shape, seed)
        lr = 0.005 if kind == "CPPN" else 0.05
        transforms = standard_transforms(target.image_shape[1:]) if transformed else None
    st.button("Stop", key="featurevis_stop", help="Ends the optimisation; the images reached so far stay.")
    bar = st.progress(0.0, text="Starting…")
    record = {"caption": caption, "images": None, "history": [], "steps": steps, "done": 0, "stopped": True}
    st.session_state[RESULT] = record

    def report(step: int, value: float, inputs: torch.Tensor) -> None:
        record["history"].append(value)
        record["done"] = step + 1
        if step % PREVIEW_EVERY == 0 or step + 1 == steps:
            with torch.no_grad():
                record["images"] = inputs if target.image_shape is not None else param.run(target.model, inputs)
        bar.progress((step + 1) / steps, text=f"Step {step + 1} of {steps}: objective {value:.3f}")

    result = visualise(target.model, objective, param, steps=steps, lr=lr, transforms=transforms, seed=seed,
                       callback=report)
    record.update(images=result.images, stopped=False)
    bar.empty()
    st.rerun()  # drops the Stop button


def show_result() -> None:
    record = st.session_state.get(RESULT)
    if not record or record["images"] is None:
        return
    state = f"stopped at step {record['done']}" if record["stopped"] else f"{record['done']} steps"
    st.caption(f"What maximises {record['caption']} ({state}).")
    images = to_unit(record["images"].float())
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    show_grid(to_uint8(images, DISPLAY_SCALE), [f"image {i}" for i in range(images.shape[0])])
    if record["history"]:
        st.line_chart({"objective": record["history"]}, x_label="step", y_label="objective", height=180)


def render(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    st.subheader("Visualise")
    options = targets(ws)
    labels = [t.label for t in options]
    label = st.radio("Model", labels, key="featurevis_model", horizontal=True, persist_state="session")
    target = options[labels.index(label)] if label in labels else options[0]
    left, right = st.columns(2)
    with left:
        try:
            if target.workspace:
                what = st.segmented_control("What", (UNIT, CLUSTER, DIRECTION), default=UNIT, key="featurevis_what",
                                            persist_state="session") or UNIT
                objective, caption = workspace_objective(ws, what, settings)
            else:
                objective, caption = unit_objective(target)
        except NeedsInput as exc:
            st.info(str(exc))
            return
        except (DissectError, RuntimeError) as exc:
            st.warning(f"Cannot visualise this: {exc}")
            return
    with right:
        n = st.number_input("Images", 1, 6, 2, key="featurevis_n", persist_state="session",
                            help="Images optimised at once, each from its own seed.")
        steps = st.slider("Steps", 8, 256, 64, 8, key="featurevis_steps", persist_state="session")
        seed = int(st.number_input("Seed", 0, 10**6, 0, key="featurevis_seed", persist_state="session"))
        kind, transformed = PARAMETERISATIONS[0], True
        if target.image_shape is not None:
            kind = st.selectbox("Parameterisation", PARAMETERISATIONS, key="featurevis_param", persist_state="session")
            transformed = st.toggle("Random transformations", True, key="featurevis_transforms",
                                    persist_state="session", help="Pad, jitter, scale and rotate at every step.")
    if st.button("Visualise", type="primary", key="featurevis_run"):
        try:
            run(target, ws, objective, caption, int(n), int(steps), seed, kind, transformed)
        except DissectError as exc:
            st.warning(f"Cannot visualise this: {exc}")
    show_result()
