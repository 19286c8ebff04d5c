"""How often a generator repeats a scene: near-duplicate pairs among its samples, beside the world's own rate.

    python benchmarks/diversity.py [--model spires] [--n 500]

Both sides are segmented by the shipped segmenter (generator seeds and world latents from 7,000,000 on, a range
no other evaluation uses). A pair of images is a near duplicate when their label maps agree on at least 95% of
pixels; the figure is the share of such pairs among all n(n-1) ordered pairs. A mode-collapsed generator
repeats layouts the world almost never repeats. The last line is machine-readable.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from dissect.models import load
from dissect.models.segmenter import load_segmenter
from dissect.models.world import World

SEEDS = 7_000_000
AGREEMENT = 0.95


def near_duplicate_share(labels: Tensor, agreement: float = AGREEMENT) -> float:
    """Share of ordered pairs of ``labels (N, H, W)`` whose maps agree on at least ``agreement`` of pixels."""
    flat = labels.flatten(1)
    n = flat.shape[0]
    close = torch.stack([((flat[i : i + 1] == flat).float().mean(1) >= agreement) for i in range(n)])
    return float(close[~torch.eye(n, dtype=torch.bool)].float().mean())


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spires")
    p.add_argument("--n", type=int, default=500)
    args = p.parse_args()
    G, sampler = load(args.model)
    seg = load_segmenter()
    seeds = list(range(SEEDS, SEEDS + args.n))
    generated = torch.cat([seg.segment(G(sampler(seeds[s : s + 100])).clamp(-1, 1)) for s in range(0, args.n, 100)])
    world = seg.segment(World(G(sampler(seeds[:1])).shape[-1]).render(World.sample_latents(seeds))[0])
    g, w = near_duplicate_share(generated), near_duplicate_share(world)
    print(f"near-duplicate pairs (label maps agreeing on >= {AGREEMENT:.0%} of pixels), {args.n} images each:")
    print(f"  generator {g:.5f}   world {w:.5f}")
    print(f"diversity: model={args.model} n={args.n} generator_near_dup={g:.5f} world_near_dup={w:.5f}")


if __name__ == "__main__":
    main()
