"""The Dissect page: which units of a layer mean what (layer dissection), their top images, and what ablating or
inserting them does to the grid, beside the session's rewrite. Self-contained: ``render(ws, seeds, settings)``."""

from __future__ import annotations

from typing import Any

import streamlit as st
import torch

from dashboard import derived
from dashboard.imaging import to_uint8
from dashboard.workspace import Workspace, spatial_layers
from dissect.dissection import (
    IOU_LEVEL,
    Dissection,
    GeneratedSamples,
    ablate,
    dissect,
    insert,
    iou_figure,
    measure_ablation,
    measure_insertion,
    unit_grid,
    units_per_class_figure,
)
from dissect.errors import DissectError
from dissect.visualize import to_unit

SAMPLE_CHOICES = (50, 100, 200, 500)  # dissection samples (seeds 0 .. n-1, as `dissect units`)
MEASURE_SEEDS = range(600_000, 600_100)  # fresh seeds for the measured ablation / insertion
TOP_IMAGES = 6


def dissection(ws: Workspace, layer: str, n: int) -> Dissection:
    """The layer dissected over ``n`` samples of this session's model (cached until its weights change)."""

    def compute() -> Dissection:
        with st.spinner(f"Dissecting {layer} over {n} samples (two passes)…"):
            return dissect(ws.model, [layer], GeneratedSamples(ws.sampler, range(n)), segmenter=derived.segmenter(),
                           top_k=TOP_IMAGES, progress=False)

    return derived.cached(ws, ("dissection", layer, n), compute)


def region_of(box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """A box ``(y0, x0, y1, x1)`` in percent of the image -> a mask ``(H, W)``."""
    y0, x0, y1, x1 = box
    mask = torch.zeros(size)
    mask[size[0] * y0 // 100 : max(size[0] * y1 // 100, size[0] * y0 // 100 + 1),
         size[1] * x0 // 100 : max(size[1] * x1 // 100, size[1] * x0 // 100 + 1)] = 1
    return mask


def show(pictures: torch.Tensor, captions: list[str]) -> None:
    columns = st.columns(len(captions)) if captions else []
    for column, picture, caption in zip(columns, to_uint8(pictures, 2), captions):
        column.image(picture, caption=caption, width="stretch")


def render_units(ws: Workspace, layer: str, result: Dissection, level: float) -> None:
    d = result[layer]
    st.caption(f"{d.units} units over {result.samples} samples, {result.forward_passes} passes, {result.seconds:.1f} s; "
               f"{d.interpretable_share(level):.0%} reach IoU {level:g}. A unit's region: where its upsampled map "
               f"exceeds its {d.quantile:g} quantile.")
    left, right = st.columns(2)
    left.plotly_chart(units_per_class_figure(result, level), key="dissect_per_class")
    right.plotly_chart(iou_figure(result, level), key="dissect_iou")
    rows = d.table()
    labels = {u: f"unit {u}: {c} (IoU {iou:.3f})" for u, c, iou in rows}
    unit = st.selectbox("Unit (best IoU first)", list(labels), format_func=labels.get, key="dissect_unit")
    samples = GeneratedSamples(ws.sampler, range(result.samples))
    grid = unit_grid(ws.model, samples, d, [unit], k=TOP_IMAGES, scale=3)
    st.image(to_uint8(grid[None])[0], caption=f"Top {TOP_IMAGES} images of unit {unit}: its region kept and outlined")


def edited_grid(ws: Workspace, seeds: list[int], layer: str, units: torch.Tensor, action: str,
                region: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The grid's images with the units ablated or inserted (on this session's model, rewrite included)."""
    edit: Any = ablate(ws.model, layer, units) if action == "Ablate" else insert(ws.model, layer, units, region, value)
    with torch.no_grad(), edit:
        return ws.run(seeds)


def render_causal(ws: Workspace, seeds: list[int], layer: str, result: Dissection) -> None:
    d = result[layer]
    st.subheader("Switch units off or on")
    a, b, c = st.columns(3)
    name = a.selectbox("Class", d.classes, index=d.classes.index("tree") if "tree" in d.classes else 0,
                       key="dissect_class")
    k = b.slider("Units (its top by IoU)", 1, min(60, d.units), min(20, d.units), key="dissect_k")
    action = c.radio("Action", ("Ablate", "Insert"), horizontal=True, key="dissect_action",
                     help="Ablate: the units are zero everywhere. Insert: set to their 0.999 quantile inside the box.")
    box = (60, 10, 95, 45)
    if action == "Insert":
        y = st.slider("Box rows (% of the image)", 0, 100, (60, 95), key="dissect_rows")
        x = st.slider("Box columns (% of the image)", 0, 100, (10, 45), key="dissect_cols")
        box = (y[0], x[0], y[1], x[1])
    units = d.top(name, k)
    shown = seeds[:6]
    images = ws.images(shown, edited=False)
    region = region_of(box, tuple(images.shape[2:]))
    changed = edited_grid(ws, shown, layer, units, action, region, d.high[units])
    what = f"{action.lower()} top {k} {name} units" + (" (on the rewritten model)" if ws.edited else "")
    st.caption(f"Original, then {what}" + (", then the rewrite alone" if ws.edited else "") + f"; units {units.tolist()}")
    show(to_unit(images), [f"seed {s}" for s in shown])
    show(to_unit(changed), [f"seed {s} · {action.lower()}" for s in shown])
    if ws.edited:
        show(to_unit(ws.images(shown, edited=True)), [f"seed {s} · rewrite" for s in shown])
    if st.button(f"Measure on {len(MEASURE_SEEDS)} fresh seeds", key="dissect_measure"):
        seg = derived.segmenter()
        fresh = GeneratedSamples(ws.sampler, MEASURE_SEEDS)
        with st.spinner("Measuring with the segmenter…"):
            if action == "Ablate":
                e = measure_ablation(ws.model, layer, units, fresh, seg, name)
                st.write(f"Images showing {name}: {e.before:.0%} → {e.after:.0%}; removed from {e.removed:.0%} of them.")
            else:
                e = measure_insertion(ws.model, layer, units, d.high[units], region, fresh, seg, name)
                st.write(f"{e.drawn:.0%} of the box becomes {name} ({e.before:.0%} was before); {e.outside:.1%} "
                         f"outside it.")


def render(ws: Workspace, seeds: list[int], settings: Any) -> None:
    if derived.segmenter() is None:
        st.info("Dissection names units with the segmenter, whose weights are not installed.")
        return
    names = [info.name for info in spatial_layers(ws.layers)]
    if not names:
        st.info("This model has no layer with a spatial map to dissect.")
        return
    a, b, c = st.columns([3, 1, 1])
    layer = a.selectbox("Layer", names, index=names.index(ws.layer) if ws.layer in names else 0, key="dissect_layer")
    n = b.selectbox("Samples", SAMPLE_CHOICES, index=1, key="dissect_n")
    level = c.number_input("IoU level", 0.0, 1.0, IOU_LEVEL, 0.01, key="dissect_level")
    try:
        result = dissection(ws, layer, n)
        render_units(ws, layer, result, level)
        render_causal(ws, seeds, layer, result)
    except DissectError as exc:
        st.warning(str(exc))
