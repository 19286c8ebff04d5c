"""UI formats in and out of tensors: images for display, canvas drawings to masks, seed ranges.

Nothing here is part of an algorithm: it converts between what the browser shows or sends and what the
library takes (``(N, 3, H, W)`` images in [-1, 1], ``(H, W)`` float masks in [0, 1]).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

MAX_SEEDS = 96  # a grid this large already takes seconds to render on a laptop CPU
CANVAS_PX = 384  # the least canvas size: a 64-pixel image is brushed at 6x


def canvas_scale(size: int) -> int:
    """How much an image of ``size`` pixels is enlarged on the brushing canvas (at least :data:`CANVAS_PX`)."""
    return max(1, math.ceil(CANVAS_PX / size))


def to_uint8(pictures: torch.Tensor, scale: int = 1) -> np.ndarray:
    """Pictures ``(N, 3, H, W)`` in [0, 1] -> ``(N, H*scale, W*scale, 3)`` uint8, enlarged without blurring.

    Model images in [-1, 1] go through ``dissect.visualize.to_unit`` first.
    """
    # In numpy: on every redraw torch would wake its thread pool for these few small operations, which costs
    # milliseconds each while the browser keeps the other core busy.
    x = np.rint(np.clip(pictures.detach().float().cpu().numpy(), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return x.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else x


def canvas_mask(rgba: np.ndarray | None, size: tuple[int, int]) -> torch.Tensor | None:
    """A canvas's RGBA pixels ``(h, w, 4)`` -> a soft mask ``(H, W)`` at image resolution, or None if blank.

    Strokes are drawn translucent so the image shows through; any painted canvas pixel counts as covered, and
    the canvas is enlarged, so coverage is area-averaged down to the image: a pixel half covered weighs 0.5.
    """
    if rgba is None or rgba.ndim != 3 or rgba.shape[-1] != 4:
        return None
    painted = rgba[..., 3] > 0  # in numpy, as to_uint8
    if not painted.any():
        return None
    return F.interpolate(torch.from_numpy(painted.astype(np.float32))[None, None], size=size, mode="area")[0, 0]


def tint(pictures: torch.Tensor, masks: torch.Tensor, color: tuple[float, float, float]) -> torch.Tensor:
    """Pictures ``(N, 3, H, W)`` in [0, 1] with ``masks (N, H, W)`` painted translucent in ``color``."""
    ink = torch.tensor(color, dtype=pictures.dtype)[None, :, None, None]
    a = 0.5 * masks.to(pictures.dtype)[:, None]
    return pictures * (1 - a) + ink * a


def parse_seeds(text: str, limit: int = MAX_SEEDS) -> list[int]:
    """``"0-11, 40, 50-52"`` -> ``[0, 1, …, 11, 40, 50, 51, 52]`` (order kept, duplicates dropped).

    Raises ValueError with the accepted syntax on anything else, or beyond ``limit`` seeds.
    """
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"{part!r} is not a seed or a range: write seeds like '0-11' or '3, 7, 20-25'.")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise ValueError(f"The range {part!r} runs backwards: write it as '{hi}-{lo}'.")
        if hi - lo + 1 > limit:
            raise ValueError(f"{part!r} asks for {hi - lo + 1} images; show at most {limit} at once.")
        seeds.extend(range(lo, hi + 1))
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ValueError("Give at least one seed, e.g. '0-11'.")
    if len(seeds) > limit:
        raise ValueError(f"That is {len(seeds)} images; show at most {limit} at once.")
    return seeds


def format_seeds(seeds: list[int]) -> str:
    """The inverse of :func:`parse_seeds` for a sorted run: ``[0..11] -> '0-11'``."""
    runs: list[str] = []
    start = prev = None
    for s in seeds + [None]:
        if start is not None and (s is None or s != prev + 1):
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if s is not None and start is None:
            start = s
        prev = s
    return ", ".join(runs)
