"""Pictures of what a layer does: value patches, key-match overlays, cluster maps, grids and plotly charts.

Conventions. Images *from a model* are ``(N, 3, H, W)`` in about [-1, 1] (the generator's range); every picture
returned here is in [0, 1]: ``(N, 3, H, W)`` or one ``(3, H, W)``, on the input's device. Score and cluster maps
live on a layer's grid ``(N, h, w)`` and are resized to the image here. Nothing here knows a UI format: callers get
tensors, PIL images (:func:`to_pil`) and plotly ``Figure`` objects.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from plotly.subplots import make_subplots
from torch import Tensor, nn

from dissect.errors import LayerError, RequestError
from dissect.hooks import Trace, call_model
from dissect.memory import eval_mode, resize_masks

__all__ = [
    "Legend",
    "LegendEntry",
    "palette",
    "to_unit",
    "to_pil",
    "image_grid",
    "side_by_side",
    "value_patch",
    "match_overlay",
    "cluster_overlay",
    "eigen_spectrum_figure",
    "cluster_projection_figure",
    "score_histogram_figure",
]

# Kelly's colours of maximum contrast, without white and black (they read as "no colour" on an overlay).
_KELLY = [
    (243, 195, 0), (135, 86, 146), (243, 132, 0), (161, 202, 241), (190, 0, 50), (194, 178, 128), (132, 132, 130),
    (0, 136, 86), (230, 143, 172), (0, 103, 165), (249, 147, 121), (96, 78, 151), (246, 166, 0), (179, 68, 108),
    (220, 211, 0), (136, 45, 23), (141, 182, 0), (101, 69, 34), (226, 88, 34), (43, 61, 38),
]


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` fixed, distinguishable RGB colours (0-255): colour ``i`` is the same for every ``n``.

    The first 20 are Kelly's colours; later ones step the hue by the golden angle, so they never repeat.
    """
    colors = list(_KELLY[:n])
    for i in range(len(colors), n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.9)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def to_unit(images: Tensor) -> Tensor:
    """Model images in [-1, 1] -> pictures in [0, 1] (clamped), any shape."""
    return ((images + 1) / 2).clamp(0, 1)


def to_pil(image: Tensor) -> Image.Image:
    """A picture ``(3, H, W)`` (or ``(H, W)``) in [0, 1] -> an RGB (or grayscale) PIL image."""
    if image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[0] not in (1, 3)):
        raise ValueError(f"to_pil takes one picture (3, H, W) or (H, W) in [0, 1], got {tuple(image.shape)}; "
                         "index a batch first, or build a grid with image_grid.")
    import torchvision  # here: importing it costs seconds (torch._dynamo), which the dashboard's first page never pays

    return torchvision.transforms.functional.to_pil_image(image.detach().float().clamp(0, 1).cpu())


def _font(size: int = 10) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_strip(texts: Sequence[str], width: int, height: int, font: ImageFont.ImageFont) -> list[Image.Image]:
    """One white ``width x height`` strip per text, black text shortened with '…' to fit."""
    strips = []
    for text in texts:
        strip = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(strip)
        fitted = text
        if draw.textlength(text, font=font) > width - 2:
            while fitted and draw.textlength(fitted + "…", font=font) > width - 2:
                fitted = fitted[:-1]
            fitted += "…"
        draw.text((1, 0), fitted, fill="black", font=font)
        strips.append(strip)
    return strips


def _pil_to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image -> ``(3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def image_grid(
    images: Tensor,
    nrow: int = 8,
    labels: Sequence[str] | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
    scale: int = 1,
) -> Tensor:
    """Pictures ``(N, 3, H, W)`` in [0, 1] tiled ``nrow`` per row -> one picture ``(3, H', W')``.

    ``labels``: one caption per image, drawn in a strip under it (shortened with '…' to the image's width).
    ``scale``: each image enlarged by this integer factor first, without blurring (small images stay legible).
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid takes pictures (N, 3, H, W), got {tuple(images.shape)}.")
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    if labels is not None:
        if len(labels) != images.shape[0]:
            raise ValueError(f"Give one label per image: {len(labels)} labels for {images.shape[0]} images.")
        font = _font()
        height = font.getbbox("Ag")[3] + 3
        strips = _text_strip([str(t) for t in labels], images.shape[3], height, font)
        captions = torch.stack([_pil_to_tensor(s) for s in strips]).to(images)
        images = torch.cat([images.expand(-1, 3, -1, -1), captions], dim=2)
    import torchvision  # see to_pil

    return torchvision.utils.make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)


def side_by_side(pictures: Sequence[Tensor], padding: int = 4, pad_value: float = 1.0) -> Tensor:
    """Pictures ``(3, H_i, W_i)`` left to right, top-aligned, ``padding`` apart on ``pad_value``: ``(3, H, W)``."""
    if not pictures or any(p.dim() != 3 or p.shape[0] != 3 for p in pictures):
        raise ValueError(f"side_by_side takes pictures (3, H, W), got {[tuple(p.shape) for p in pictures]}.")
    height = max(p.shape[1] for p in pictures)
    width = sum(p.shape[2] for p in pictures) + padding * (len(pictures) - 1)
    out = torch.full((3, height, width), pad_value, dtype=pictures[0].dtype, device=pictures[0].device)
    left = 0
    for p in pictures:
        out[:, : p.shape[1], left : left + p.shape[2]] = p.to(out)
        left += p.shape[2] + padding
    return out


# ----------------------------------------------------------------------------------------------------------
# Value patches
# ----------------------------------------------------------------------------------------------------------


def value_patch(
    model: nn.Module, layer: str, inputs: Any, region: Tensor, values: Tensor | None = None
) -> Tensor:
    """Render what ``layer`` emits inside ``region`` alone: pictures ``(N, 3, H, W)`` in [0, 1].

    What is zeroed: the layer's *output* (its values, after any nonlinear rest: for the generator's
    ``ModulatedConv2d`` that is after demodulation, noise, bias and activation) is multiplied by ``region``
    area-resized to the output grid, so every location outside the region is exactly zero and a soft region scales
    the locations at its edge. Nothing before the layer changes, and the rest of the model runs normally on the
    masked values, so paths that bypass the layer (the generator's RGB skips from lower resolutions) still draw
    their part of the picture, as in the authors' renderings. A region of ones gives the normal render.

    Args:
        model: a model whose output is images in [-1, 1] (the generator; or ``G.synthesis`` with ws as inputs and
            layer names relative to it, e.g. ``"b16.conv1"``).
        layer: a ``model.named_modules()`` name whose output is ``(N, C, h, w)``.
        inputs: a batch ``model`` takes (see :func:`dissect.hooks.call_model`: a tuple or list is unpacked into
            positional arguments, a dict into keywords), e.g. ``z (N, z_dim)``.
        region: ``(H', W')`` or ``(N, H', W')`` soft mask in [0, 1] at any resolution (image or layer grid).
        values: optional ``(N or 1, C, h, w)`` values shown instead of the layer's own output (e.g. a copy
            request's target values); they are masked by ``region`` the same way.
    """
    region = region.float()
    if region.dim() == 2:
        region = region[None]
    if region.dim() != 3:
        raise RequestError(f"region must be (H, W) or (N, H, W), got {tuple(region.shape)}.")

    def keep_region(output: Tensor, name: str) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise LayerError(f"value_patch needs layer {name!r} to output (N, C, h, w); it gave "
                            f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}.")
        if values is not None and (values.dim() != 4 or values.shape[1:] != output.shape[1:]
                                   or values.shape[0] not in (1, output.shape[0])):
            raise RequestError(f"values {tuple(values.shape)} must be (1 or {output.shape[0]}, "
                             f"{', '.join(map(str, output.shape[1:]))}) to stand in for layer {name!r}'s output.")
        shown = output if values is None else values.to(output).expand_as(output)
        weights = resize_masks(region.to(output), output.shape[2:])
        if weights.shape[0] not in (1, output.shape[0]):
            raise RequestError(f"region has {weights.shape[0]} masks for a batch of {output.shape[0]}.")
        return shown * weights[:, None]

    with eval_mode(model), torch.no_grad(), Trace(model, layer, retain_output=False, edit_output=keep_region):
        images = call_model(model, inputs)
    return to_unit(images)


# ----------------------------------------------------------------------------------------------------------
# Overlays
# ----------------------------------------------------------------------------------------------------------


def _outline(region: Tensor) -> Tensor:
    """The inner border of ``region (N, H, W)`` bool: region pixels with an 8-neighbour outside (or off the image)."""
    padded = F.pad(region.float()[:, None], (1, 1, 1, 1), value=0.0)
    eroded = -F.max_pool2d(-padded, kernel_size=3, stride=1)[:, 0]
    return region & (eroded < 0.5)


def match_overlay(
    images: Tensor,
    scores: Tensor,
    threshold: float | Tensor,
    dim: float = 0.3,
    color: tuple[float, float, float] = (1.0, 0.85, 0.0),
) -> Tensor:
    """Key-match overlays: the matched region as is, the rest dimmed, its border outlined.

    Args:
        images: ``(N, 3, H, W)`` in [-1, 1].
        scores: ``(N, h, w)`` match scores on a layer's grid, bilinearly upsampled to ``(H, W)``.
        threshold: a location matches where its upsampled score is ``>= threshold`` (a float, or ``(N,)``).
        dim: brightness kept outside the region (0 black, 1 unchanged).
        color: RGB in [0, 1] of the 1-pixel contour drawn on the region's inner border.

    Returns:
        ``(N, 3, H, W)`` pictures in [0, 1].
    """
    if images.dim() != 4 or scores.dim() != 3 or scores.shape[0] != images.shape[0]:
        raise ValueError(f"match_overlay takes images (N, 3, H, W) and scores (N, h, w); got {tuple(images.shape)} "
                         f"and {tuple(scores.shape)}.")
    up = F.interpolate(scores[:, None].float(), size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    threshold = torch.as_tensor(threshold, dtype=up.dtype, device=up.device).reshape(-1, 1, 1)
    region = up >= threshold
    pictures = to_unit(images.float())
    out = torch.where(region[:, None], pictures, pictures * dim)
    ink = torch.tensor(color, dtype=out.dtype, device=out.device)[None, :, None, None]
    return torch.where(_outline(region)[:, None], ink, out)


@dataclass(frozen=True)
class LegendEntry:
    """One cluster shown on an overlay: its colour (RGB 0-255), name, optional IoU, and share of the pixels."""

    cluster: int
    name: str
    color: tuple[int, int, int]
    iou: float | None
    share: float


@dataclass(frozen=True)
class Legend:
    """The clusters present on a set of overlays, most pixels first; ``image (3, h, w)`` in [0, 1] draws them."""

    entries: list[LegendEntry]
    image: Tensor


def _legend_image(entries: Sequence[LegendEntry]) -> Tensor:
    font = _font()
    row = font.getbbox("Ag")[3] + 4
    texts = [f"{e.cluster}: {e.name}" + (f"  IoU {e.iou:.2f}" if e.iou is not None else "") for e in entries]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = row + 4 + int(max((probe.textlength(t, font=font) for t in texts), default=0)) + 4
    strip = Image.new("RGB", (width, max(row * len(entries), 1)), "white")
    draw = ImageDraw.Draw(strip)
    for i, (entry, text) in enumerate(zip(entries, texts)):
        top = i * row
        draw.rectangle([1, top + 1, row - 2, top + row - 2], fill=entry.color, outline="black")
        draw.text((row + 3, top + 1), text, fill="black", font=font)
    return _pil_to_tensor(strip)


def cluster_overlay(
    images: Tensor,
    cluster_maps: Tensor,
    names: Sequence[str],
    ious: Sequence[float] | None = None,
    alpha: float = 0.5,
) -> tuple[Tensor, Legend]:
    """Cluster maps as coloured overlays, with their legend.

    Args:
        images: ``(N, 3, H, W)`` in [-1, 1].
        cluster_maps: ``(N, h, w)`` int cluster ids on a layer's grid (nearest-upsampled to ``(H, W)``); a negative
            id leaves the pixel uncoloured.
        names: ``names[c]`` names cluster ``c`` (e.g. its best-IoU segmenter class).
        ious: optional ``ious[c]``, shown in the legend.
        alpha: opacity of the cluster colours.

    Returns:
        ``(overlays (N, 3, H, W) in [0, 1], legend)``; colour ``c`` is ``palette(len(names))[c]``.
    """
    if images.dim() != 4 or cluster_maps.dim() != 3 or cluster_maps.shape[0] != images.shape[0]:
        raise ValueError(f"cluster_overlay takes images (N, 3, H, W) and cluster_maps (N, h, w); got "
                         f"{tuple(images.shape)} and {tuple(cluster_maps.shape)}.")
    k = len(names)
    if int(cluster_maps.max()) >= k:
        raise ValueError(f"cluster_maps holds id {int(cluster_maps.max())} but only {k} names were given.")
    if ious is not None and len(ious) != k:
        raise ValueError(f"Give one IoU per name: {len(ious)} IoUs for {k} names.")
    maps = F.interpolate(cluster_maps[:, None].float(), size=images.shape[2:], mode="nearest")[:, 0].long()
    colors = torch.tensor(palette(k), dtype=torch.float32, device=images.device) / 255  # (K, 3)
    coloured = maps >= 0
    paint = colors[maps.clamp_min(0)].permute(0, 3, 1, 2)  # (N, 3, H, W)
    pictures = to_unit(images.float())
    out = torch.where(coloured[:, None], (1 - alpha) * pictures + alpha * paint, pictures)

    counts = torch.bincount(maps[coloured].flatten().cpu(), minlength=k)
    total = maps.numel()
    entries = [
        LegendEntry(c, names[c], palette(k)[c], None if ious is None else float(ious[c]), float(counts[c]) / total)
        for c in counts.argsort(descending=True).tolist()
        if counts[c] > 0
    ]
    return out, Legend(entries, _legend_image(entries))


# ----------------------------------------------------------------------------------------------------------
# plotly charts
# ----------------------------------------------------------------------------------------------------------


def eigen_spectrum_figure(moment_or_eigenvalues: Tensor, title: str = "Key second moment C") -> go.Figure:
    """C's eigenvalues (log scale, largest first) and their cumulative share of the energy (trace).

    ``moment_or_eigenvalues``: ``C (C, C)`` (symmetric) or its eigenvalues ``(C,)``. C is the raw keys' uncentred
    second moment ``E[k kᵀ]``, so eigenvalue i over the trace is the share of the keys' energy along component i;
    the title states component 1's share. The log axis has one labelled tick per decade.
    """
    x = moment_or_eigenvalues.detach().double().cpu()
    if x.dim() == 2:
        if x.shape[0] != x.shape[1]:
            raise ValueError(f"eigen_spectrum_figure takes a square C or eigenvalues (C,), got {tuple(x.shape)}.")
        x = torch.linalg.eigvalsh((x + x.T) / 2)
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"eigen_spectrum_figure takes a square C or eigenvalues (C,), got {tuple(x.shape)}.")
    evals = x.sort(descending=True).values
    share = evals.clamp_min(0) / evals.clamp_min(0).sum().clamp_min(torch.finfo(evals.dtype).tiny)
    energy = share.cumsum(0)
    index = torch.arange(1, evals.numel() + 1).tolist()
    # A log axis cannot show zero or round-off negatives: those eigenvalues are left as gaps.
    shown = torch.where(evals > 0, evals, torch.tensor(float("nan"), dtype=evals.dtype)).tolist()
    k99 = int((energy < 0.99).sum()) + 1
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=index, y=shown, customdata=share.tolist(), mode="lines+markers", name="eigenvalue",
                             hovertemplate="component %{x}: %{y:.3g}, %{customdata:.1%} of the trace<extra></extra>"),
                  secondary_y=False)
    fig.add_trace(go.Scatter(x=index, y=energy.tolist(), mode="lines", name="cumulative energy",
                             hovertemplate="components 1-%{x}: %{y:.1%} of the trace<extra></extra>"), secondary_y=True)
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", showexponent="all", minor=dict(showgrid=False),
                     title_text="eigenvalue (log)", secondary_y=False)
    fig.update_yaxes(range=[0, 1.02], dtick=0.25, tickformat=".0%", title_text="cumulative share of the trace",
                     secondary_y=True)
    fig.update_xaxes(title_text="component of the raw keys (largest first)")
    fig.update_layout(title=f"{title}: component 1 holds {float(share[0]):.1%} of the trace; {k99} of {evals.numel()} "
                            f"hold 99%", legend=dict(orientation="h", y=-0.25))
    return fig


def cluster_projection_figure(
    keys: Tensor,
    cluster_ids: Tensor,
    names: Sequence[str],
    max_points: int = 3000,
    seed: int = 0,
    features: str = "keys",
) -> go.Figure:
    """Keys projected on their top two principal components, one coloured trace per cluster.

    The axes state each component's share of the variance of the points drawn (centred), of ``features`` (what
    ``keys`` are, e.g. "whitened keys": whitening equalises the variance over every direction, so there each
    component holds about 1/C of it, unlike the raw keys' C).

    Args:
        keys: ``(M, C)`` features, ideally those the clustering used (e.g. whitened, normalised keys).
        cluster_ids: ``(M,)`` int cluster of each key.
        names: ``names[c]`` names cluster ``c``; colours match :func:`cluster_overlay`.
        max_points: at most this many keys are drawn (a seeded uniform sample), to keep the figure light.
    """
    if keys.dim() != 2 or keys.shape[1] < 2 or cluster_ids.shape != keys.shape[:1]:
        raise ValueError(f"cluster_projection_figure takes keys (M, C >= 2) and cluster_ids (M,); got "
                         f"{tuple(keys.shape)} and {tuple(cluster_ids.shape)}.")
    x = keys.detach().float().cpu()
    ids = cluster_ids.detach().long().cpu()
    if x.shape[0] > max_points:
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        x, ids = x[pick], ids[pick]
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    xy = x @ vh[:2].T
    explained = (s[:2].square() / s.square().sum().clamp_min(torch.finfo(s.dtype).tiny)).tolist()
    colors = palette(len(names))
    fig = go.Figure()
    for c in ids.unique().tolist():
        sel = ids == c
        fig.add_trace(go.Scattergl(
            x=xy[sel, 0].tolist(), y=xy[sel, 1].tolist(), mode="markers", name=f"{c}: {names[c]}",
            marker=dict(size=4, color="rgb({},{},{})".format(*colors[c]), opacity=0.7),
        ))
    fig.update_layout(
        title=f"{features[0].upper()}{features[1:]} on their first two principal components ({x.shape[0]} shown)",
        xaxis_title=f"PC 1: {explained[0]:.1%} of the {features}' variance",
        yaxis_title=f"PC 2: {explained[1]:.1%} of the {features}' variance",
    )
    return fig


def score_histogram_figure(
    scores: Tensor, threshold: float | None = None, bins: int = 60, log_y: bool = True
) -> go.Figure:
    """Histogram of match scores (any shape, e.g. ``(N, h, w)``), with the threshold and the share above it.

    Counts are binned here, so the figure stays small for millions of scores. ``log_y`` shows the rare tail of
    strong matches next to the bulk.
    """
    x = scores.detach().double().flatten().cpu()
    if x.numel() == 0:
        raise ValueError("score_histogram_figure got no scores.")
    lo, hi = float(x.min()), float(x.max())
    counts, edges = torch.histogram(x, bins=bins, range=(lo, hi if hi > lo else lo + 1.0))
    fig = go.Figure(go.Bar(
        x=((edges[:-1] + edges[1:]) / 2).tolist(), y=counts.tolist(), width=(edges[1:] - edges[:-1]).tolist(),
        name="locations",
    ))
    title = f"Match scores over {x.numel()} locations"
    if threshold is not None:
        share = float((x >= threshold).double().mean())
        fig.add_vline(x=float(threshold), line_dash="dash", line_color="red",
                      annotation_text=f"threshold {threshold:.3g}: {share:.1%} at or above")
        title += f"; {share:.1%} at or above the threshold"
    fig.update_layout(title=title, xaxis_title="score", yaxis_title="locations", bargap=0)
    if log_y:  # one labelled tick per decade: 1, 10, 100, 1k
        fig.update_yaxes(type="log", dtick=1, tickformat="~s", minor=dict(showgrid=False))
    return fig
