"""A small random generator behind an entry point, for tests that must not wait for trained weights.

Entry point: ``tiny_model:generator`` with ``tests/e2e`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import torch

from dissect.models.loaders import LatentSampler
from dissect.models.stylegan import Generator


def generator() -> tuple[Generator, LatentSampler]:
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, resolution=64, channels={4: 32, 8: 32, 16: 16, 32: 8, 64: 8}).eval()
    return G, LatentSampler(32, "tiny")


def broken() -> None:
    raise RuntimeError("this entry point is broken on purpose")
