"""The image browser: a grid of generated images by seed, original or edited."""

from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from dashboard.defaults import DISPLAY_SCALE, GRID_COLUMNS
from dashboard.imaging import to_uint8
from dashboard.workspace import Workspace


def show_grid(pictures: np.ndarray, seeds: list[int], captions: list[str] | None = None) -> None:
    """``pictures (N, h, w, 3)`` uint8 in rows of :data:`GRID_COLUMNS`, captioned by seed."""
    captions = captions or [f"seed {s}" for s in seeds]
    for start in range(0, len(seeds), GRID_COLUMNS):
        cols = st.columns(GRID_COLUMNS)
        for col, pic, cap in zip(cols, pictures[start : start + GRID_COLUMNS], captions[start : start + GRID_COLUMNS]):
            col.image(pic, caption=cap, width="stretch")


def grid_images(ws: Workspace, seeds: list[int], edited: bool) -> torch.Tensor:
    return ws.images(seeds, edited=edited)


def render(ws: Workspace, seeds: list[int]) -> None:
    edited = st.toggle("Show edited images", key="show_edited", value=True,
                       help="Off: the original model's images for the same seeds.")
    images = grid_images(ws, seeds, edited)
    show_grid(to_uint8(images, DISPLAY_SCALE), seeds)
