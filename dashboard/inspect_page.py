"""Inspecting the layer: where the context's keys match, the key clusters, value patches, and C's spectrum."""

from __future__ import annotations

import streamlit as st
import torch

from dashboard import derived, requests
from dashboard.browse import match_quantile, show_grid, show_legend, threshold_slider
from dashboard.brushing import cluster_label
from dashboard.defaults import DEFAULT_CLUSTERS, DISPLAY_SCALE, GRID_COLUMNS, POOL_SEEDS, STATS_SAMPLES
from dashboard.imaging import to_uint8
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import Workspace
from dissect.memory import rank_by_peak
from dissect.visualize import (
    cluster_overlay,
    cluster_projection_figure,
    eigen_spectrum_figure,
    match_overlay,
    score_histogram_figure,
    value_patch,
)

BEST = 2 * GRID_COLUMNS  # best matches shown from the pool


def pool_matches(ws: Workspace, settings: Settings) -> tuple[list[int], torch.Tensor, torch.Tensor, float]:
    """The pool's best-matching seeds, their score maps, every pool score, and the match threshold."""
    ctx = requests.selection(ws, settings.rank)
    d = derived.directions(ws, ctx)
    pool = list(POOL_SEEDS)

    def compute() -> tuple[list[int], torch.Tensor, torch.Tensor]:
        # One pass over the pool: the best images' maps are rows of the pool's, ranked by their peak.
        scores = ws.memory().match(d, ws.inputs(pool))
        order = rank_by_peak(scores)[0][:BEST]
        return [pool[i] for i in order.tolist()], scores[order], scores

    key = ("pool", ws.layer, ctx.rank, ws.brush.revision, tuple(ctx.seeds or ()))
    best, best_scores, scores = derived.cached(ws, key, compute)
    return best, best_scores, scores, derived.threshold(ws, ctx, match_quantile())


def render_matches(ws: Workspace, settings: Settings) -> None:
    st.subheader("Key matches")
    with st.columns([1, 2])[0]:
        threshold_slider()
    try:
        best, best_scores, scores, threshold = pool_matches(ws, settings)
    except NeedsInput as exc:
        st.info(str(exc))
        return
    except (ValueError, RuntimeError) as exc:
        st.warning(f"No matches: {exc}")
        return
    st.caption(f"The {BEST} best-matching images of {len(POOL_SEEDS)} samples (seeds {POOL_SEEDS.start}–"
               f"{POOL_SEEDS.stop - 1}); matching regions kept, the rest dimmed.")
    pictures = match_overlay(ws.images(best), best_scores, threshold)
    show_grid(to_uint8(pictures), [f"seed {s}" for s in best])
    st.plotly_chart(score_histogram_figure(scores, threshold), key="score_histogram")


def choose_cluster(ws: Workspace, k: int, cluster: int) -> None:
    ws.brush.use_cluster(cluster, k, ws.layer)


def render_clusters(ws: Workspace, seeds: list[int]) -> None:
    st.subheader("Key clusters")
    k = st.columns([1, 3])[0].number_input("Clusters", 2, 40, DEFAULT_CLUSTERS, key="cluster_k", persist_state="session",
                        help="k-means on the layer's whitened keys; each cluster is named by the segmenter class "
                             "it overlaps best (IoU).")
    try:
        with st.spinner("Clustering the layer's keys…"):
            names, ious = derived.cluster_names(ws, k)
            clusters = derived.clusters(ws, k)
    except (ValueError, RuntimeError) as exc:
        st.warning(f"No clusters: {exc}")
        return
    images = ws.images(seeds)
    pictures, legend = cluster_overlay(images, derived.cluster_maps(ws, k, seeds), names, ious)
    left, right = st.columns([3, 1])
    with left:
        show_grid(to_uint8(pictures), [f"seed {s}" for s in seeds])
    with right:
        st.caption("Cluster: the segmenter class it overlaps best (IoU)")
        show_legend(legend, numbered=True)
        label = lambda c: f"{c}: {names[c]}" + (f" (IoU {ious[c]:.2f})" if ious else "")  # noqa: E731
        chosen = st.selectbox("Cluster", range(k), key="cluster_pick", persist_state="session", format_func=label)
        st.button("Use as context", on_click=choose_cluster, args=(ws, k, chosen), key="use_cluster",
                  help="Edits then apply where this cluster's keys are, instead of the brushed regions.")
        if ws.brush.cluster is not None:
            st.caption(f"Context: {cluster_label(ws)}.")
    with st.expander("Isolated value patch of the cluster"):
        region = clusters.masks(ws.inputs(seeds[:GRID_COLUMNS]), chosen)
        patch = value_patch(ws.model, ws.layer, ws.inputs(seeds[:GRID_COLUMNS]), region)
        show_grid(to_uint8(patch), [f"seed {s}" for s in seeds[:GRID_COLUMNS]])
    with st.expander("Cluster projection"):
        # The features k-means groups (whitened, unit-length keys), so the clusters separate as it sees them.
        feats = clusters._features(derived.keys(ws, seeds))
        ids = derived.cluster_maps(ws, k, seeds).reshape(-1)
        st.plotly_chart(cluster_projection_figure(feats, ids, names, features="whitened keys"),
                        key="cluster_projection")
        st.caption(f"Whitened keys (C^(-1/2) k, scaled to unit length: what the clustering and the edits compare) "
                   f"have about the same variance along each of the layer's {ws.memory_channels()} directions, so "
                   f"even the first component holds only a few percent of it. The spectrum under *Key statistics* "
                   f"is of the raw keys, whose first component holds a larger share of C's trace.")


def render_copied(ws: Workspace) -> None:
    st.subheader("Copied region, alone")
    if ws.brush.copied is None:
        st.info("Nothing is copied: brush a region in *Copy* mode on the Images page.")
        return
    seed, mask = ws.brush.copied
    patch = value_patch(ws.model, ws.layer, ws.inputs([seed]), mask)
    st.image(to_uint8(patch, DISPLAY_SCALE)[0], caption=f"What {ws.layer} draws in the region copied from seed {seed}")


def render(ws: Workspace, seeds: list[int], settings: Settings) -> None:
    render_matches(ws, settings)
    render_clusters(ws, seeds)
    render_copied(ws)
    st.subheader("Key statistics")
    st.plotly_chart(eigen_spectrum_figure(ws.memory().moment, title=f"C of {ws.layer}"), key="spectrum")
    st.caption(f"C = E[k kᵀ] over the raw (unwhitened, uncentred) keys of {STATS_SAMPLES} samples. Each eigenvalue "
               "over the trace is the share of the keys' energy along that component; the curve adds them up. Few "
               "components holding most of it means the layer's keys live in a small subspace, which a low-rank "
               "edit can address.")
