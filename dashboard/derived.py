"""What the pages derive from a workspace through the library, cached per session until the weights change."""

from __future__ import annotations

from typing import Any, Callable

import streamlit as st
import torch

from dashboard.defaults import CLUSTER_SEEDS, MATCH_QUANTILE, POOL_SEEDS, THRESHOLD_IMAGES
from dashboard.workspace import Workspace
from dissect.appearance import Appearance
from dissect.measure import Perceptual
from dissect.memory import KeyClusters
from dissect.models.segmenter import Segmenter, load_segmenter
from dissect.models.world import CLASSES


def cached(ws: Workspace, key: tuple, compute: Callable[[], Any]) -> Any:
    if key not in ws.cache:
        ws.cache[key] = compute()
    return ws.cache[key]


@st.cache_resource(show_spinner="Loading the segmenter…")
def segmenter() -> Segmenter | None:
    """The shipped segmenter (read-only, shared), or None when its weights are not installed."""
    try:
        return load_segmenter()
    except FileNotFoundError:
        return None


@st.cache_resource(show_spinner=False)
def appearance() -> Appearance | None:
    """How a paste by appearance judges a look (the segmenter's features and classes), or None without it."""
    seg = segmenter()
    return None if seg is None else Appearance(Perceptual(seg))


def directions(ws: Workspace, context: Any) -> torch.Tensor:
    """``D (r, C)`` of a library :class:`~dissect.rewrite.Context` at the chosen layer. A context of known seeds
    reads their cached keys (:func:`keys`), so a new stroke on an image already brushed runs no model."""
    key = ("directions", ws.layer, context.rank, ws.brush.revision, tuple(context.seeds or ()))

    def compute() -> torch.Tensor:
        memory = ws.memory()
        if context.seeds is None or context.masks is None:
            return memory.directions(context.inputs, context.masks, context.rank)
        found = keys(ws, list(context.seeds))
        weights = memory.mask_weights(context.masks, context.inputs, found).reshape(-1)
        return memory.directions_from_keys(memory.flat_keys(found), weights, context.rank)

    return cached(ws, key, compute)


def keys(ws: Workspace, seeds: list[int]) -> torch.Tensor:
    """The chosen layer's keys of ``seeds`` (one model run per weights, layer and seeds; redraws reuse them)."""
    return cached(ws, ("keys", ws.layer, tuple(seeds)), lambda: ws.memory().keys(ws.inputs(seeds)))


def scores(ws: Workspace, context: Any, seeds: list[int]) -> torch.Tensor:
    """Match scores ``(N, *grid)`` of ``seeds`` against a context: ``‖D k‖`` on the cached keys."""
    return ws.memory().match_keys(directions(ws, context), keys(ws, seeds))


def threshold(ws: Workspace, context: Any, quantile: float = MATCH_QUANTILE) -> float:
    """The score above which a location matches the context: the ``quantile`` of scores over the pool's first
    images (16 images x the layer's grid: on the default model the 99th percentile moved < 6% between 16, 32 and
    64 images). The pool's scores are kept, so moving the threshold slider costs no model run."""
    pool = list(POOL_SEEDS)[:THRESHOLD_IMAGES]
    key = ("pool_scores", ws.layer, context.rank, ws.brush.revision, tuple(context.seeds or ()))
    found = cached(ws, key, lambda: scores(ws, context, pool))
    return float(torch.quantile(found.reshape(-1).float(), quantile))


def clusters(ws: Workspace, k: int) -> KeyClusters:
    """k-means of the layer's keys over :data:`CLUSTER_SEEDS`."""
    seeds = list(CLUSTER_SEEDS)
    return cached(ws, ("clusters", ws.layer, k), lambda: ws.memory().cluster_keys(ws.sampler, seeds, k))


def cluster_names(ws: Workspace, k: int) -> tuple[list[str], list[float] | None]:
    """Each cluster's best-IoU segmenter class and that IoU; plain numbers without a segmenter."""

    def compute() -> tuple[list[str], list[float] | None]:
        seg = segmenter()
        if seg is None:
            return [f"cluster {c}" for c in range(k)], None
        seeds = list(CLUSTER_SEEDS)
        inputs = ws.inputs(seeds)
        with torch.no_grad():
            labels = seg.segment(ws.images(seeds))
        found = clusters(ws, k).name(clusters(ws, k).predict(inputs), labels, CLASSES)
        return [c.name or f"class {c.label}" for c in found], [c.iou for c in found]

    return cached(ws, ("cluster_names", ws.layer, k), compute)


def cluster_maps(ws: Workspace, k: int, seeds: list[int]) -> torch.Tensor:
    """Each location's key cluster ``(N, *grid)`` on ``seeds``, kept for redraws."""
    return cached(ws, ("cluster_maps", ws.layer, k, tuple(seeds)), lambda: clusters(ws, k).predict(ws.inputs(seeds)))


def class_mask(ws: Workspace, seed: int, edited: bool, name: str) -> torch.Tensor | None:
    """Where the segmenter sees class ``name`` on ``seed``'s image, as a mask ``(H, W)`` in {0, 1} (None without a
    segmenter)."""
    found = labels(ws, [seed], edited)
    return None if found is None else (found[0] == CLASSES.index(name)).float()


def labels(ws: Workspace, seeds: list[int], edited: bool) -> torch.Tensor | None:
    """Segmenter labels ``(N, H, W)`` of the original or edited images (None without a segmenter)."""
    seg = segmenter()
    if seg is None:
        return None
    key = ("labels", ws.version if edited else -1, tuple(seeds))

    def compute() -> torch.Tensor:
        with torch.no_grad():
            batches = [ws.images(seeds[i : i + 50], edited=edited) for i in range(0, len(seeds), 50)]
            return torch.cat([seg.segment(images) for images in batches])

    return cached(ws, key, compute)

