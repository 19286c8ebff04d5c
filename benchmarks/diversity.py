"""How often a generator repeats a scene: near-duplicate pairs among its samples, beside the world's own rate.

    python benchmarks/diversity.py [--model spires] [--n 500]

Both sides are segmented by the shipped segmenter (generator seeds and world latents from 7,000,000 on, a range
no other evaluation uses). A pair of images is a near duplicate when their label maps agree on at least 95% of
pixels; the figure is the share of such pairs among all n(n-1) ordered pairs. A mode-collapsed generator
repeats layouts the world almost never repeats. Since the world reads every choice from the latent, the script
also reports how often G(z) shows what the world's scene for the same z contains (watermark, spire, dome, tree,
dusk): a generator that ignores its latent for a class samples that class from memorised layouts; and, for a
generator with a mapping network, how much of those facts a linear probe still reads from w (``w_reads``); and
whether G(z) puts each object where the world's scene for z has it (``layout_iou``: per-class IoU of the two label
maps, beside the same against another scene's map).
`benchmarks/eval_world.py` reports the same figures with
these helpers, on its own seeds (0..n-1, so its first page is the dashboard's seeds 0-11). The last line is
machine-readable.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dissect.models import load
from dissect.models.segmenter import load_segmenter, present
from dissect.models.world import CLASSES, World, is_dusk

SEEDS = 7_000_000
AGREEMENT = 0.95
FIRST_PAGE = 12  # seeds 0-11: the samples a newcomer sees first
FACT_OF = {"watermark": "has_watermark", "spire": "has_spire", "dome": "has_dome", "tree": "has_tree"}


def near_duplicates(labels: Tensor, agreement: float = AGREEMENT) -> Tensor:
    """``labels (N, H, W)`` -> ``(N, N)`` bool: maps i and j (i != j) agree on at least ``agreement`` of pixels."""
    flat = labels.flatten(1)
    n = flat.shape[0]
    close = torch.stack([((flat[i : i + 1] == flat).float().mean(1) >= agreement) for i in range(n)])
    return close & ~torch.eye(n, dtype=torch.bool, device=close.device)


def near_duplicate_share(labels: Tensor, agreement: float = AGREEMENT) -> float:
    """Share of ordered pairs of ``labels (N, H, W)`` whose maps agree on at least ``agreement`` of pixels."""
    n = labels.shape[0]
    return float(near_duplicates(labels, agreement).sum()) / (n * (n - 1))


def near_duplicate_pairs(labels: Tensor, agreement: float = AGREEMENT) -> list[tuple[int, int]]:
    """The unordered near-duplicate pairs ``(i, j)``, ``i < j``, among ``labels (N, H, W)``."""
    return [(i, j) for i, j in torch.triu(near_duplicates(labels, agreement)).nonzero().tolist()]


def latent_agreement(images: Tensor, labels: Tensor, z: Tensor) -> dict[str, float]:
    """Per class (and dusk), the share of images whose presence by the segmenter's ``labels (N, H, W)`` of
    ``images (N, 3, H, W)`` matches the world's facts for the same latents ``z (N, >= 49)``."""
    facts = World().scene_facts(z)
    shown = {name: present(labels, name) for name in FACT_OF} | {"dusk": is_dusk(images, labels)}
    truth = {name: facts[fact] for name, fact in FACT_OF.items()} | {"dusk": facts["dusk"]}
    return {name: (shown[name].cpu() == truth[name].cpu()).float().mean().item() for name in shown}


OBJECTS = tuple(c for c in CLASSES if c not in ("sky", "ground"))


def layout_iou(generated: Tensor, world: Tensor) -> dict[str, float]:
    """Per object class, the IoU of G(z)'s label map ``generated (N, H, W)`` with the world's map for the same z
    ``world (N, H, W)``, pooled over images: whether G puts things where the world's scene for z has them. Pairing
    each map with another scene's (``world.roll(1, 0)``) gives the level of a generator that ignores positions."""
    out = {}
    for name in OBJECTS:
        g, w = generated == CLASSES.index(name), world == CLASSES.index(name)
        union = (g | w).sum().item()
        out[name] = (g & w).sum().item() / union if union else float("nan")
    return out


def mean_iou(ious: dict[str, float]) -> float:
    """The mean of :func:`layout_iou`'s figures over the classes either map shows (the others have no IoU)."""
    seen = [v for v in ious.values() if v == v]
    return sum(seen) / len(seen)


def w_readability(
    mapping: Callable[[Tensor], Tensor], n: int = 3000, seed: int = SEEDS + 1_000_000
) -> dict[str, tuple[float, float]]:
    """Per fact, held-out accuracy of a linear probe (standardised logistic regression, 80/20 split) from
    ``mapping(z)`` and from ``z`` itself, on ``n`` world latents: how much of what the world reads from z survives
    into w. A mapping that scrambles z leaves G to unscramble it before it can place anything."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z = World.sample_latents(range(seed, seed + n))
    facts = World().scene_facts(z)
    w = mapping(z).flatten(1).float().cpu().numpy()
    train = int(0.8 * n)
    out = {}
    for name, fact in {**FACT_OF, "dusk": "dusk"}.items():
        y = facts[fact].cpu().numpy().astype(int)
        scores = []
        for x in (w, z.numpy()):
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
            scores.append(probe.fit(x[:train], y[:train]).score(x[train:], y[train:]))
        out[name] = (scores[0], scores[1])
    return out


def load_model(name: str, device: str = "cpu") -> tuple[nn.Module, Any]:
    """``loaders.load(name)``, or exit with a message naming ``name`` and why it is not a loadable generator."""
    try:
        return load(name, device)
    except Exception as exc:  # any failure to load is the user's --model, reported as such
        raise SystemExit(f"--model {name!r} is not a generator that dissect can load: {type(exc).__name__}: {exc}") from exc


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spires", help="loaders.load name, entry point or exported generator file")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    G, sampler = load_model(args.model)
    seg = load_segmenter()
    seeds = list(range(SEEDS, SEEDS + args.n))
    z = sampler(seeds)
    images = torch.cat([G(z[s : s + 100]).clamp(-1, 1) for s in range(0, args.n, 100)])
    generated = torch.cat([seg.segment(batch) for batch in images.split(100)])
    world = seg.segment(World(images.shape[-1]).render(World.sample_latents(seeds))[0])
    g, w = near_duplicate_share(generated), near_duplicate_share(world)
    page = near_duplicate_pairs(seg.segment(G(sampler(range(FIRST_PAGE))).clamp(-1, 1)))
    follows = latent_agreement(images, generated, z)
    print(f"near-duplicate pairs (label maps agreeing on >= {AGREEMENT:.0%} of pixels), {args.n} images each:")
    print(f"  generator {g:.5f}   world {w:.5f}")
    print(f"  near-duplicate pairs among seeds 0-{FIRST_PAGE - 1}: {page or 'none'}")
    print("G(z) shows what the world's scene for z contains (1: always, about 0.5: ignores z): "
          + "  ".join(f"{k}={v:.3f}" for k, v in follows.items()))
    layout, unpaired = layout_iou(generated, world), layout_iou(generated, world.roll(1, 0))
    mean_layout = mean_iou(layout)
    print("G(z) puts objects where the world's scene for z has them (IoU; against another scene's map): "
          + "  ".join(f"{k}={v:.2f} ({unpaired[k]:.2f})" for k, v in layout.items())
          + f"  mean {mean_layout:.3f} ({mean_iou(unpaired):.3f})")
    mapping = getattr(G, "mapping", None)
    reads = w_readability(mapping) if isinstance(mapping, nn.Module) else {}
    if reads:
        print("a linear probe reads the world's facts from G's w (from z itself): "
              + "  ".join(f"{k}={a:.3f} ({b:.3f})" for k, (a, b) in reads.items()))
    w_reads = f" w_reads={sum(a for a, _ in reads.values()) / len(reads):.3f}" if reads else ""
    print(f"diversity: model={args.model} n={args.n} generator_near_dup={g:.5f} world_near_dup={w:.5f} "
          f"first_page_near_dup_pairs={len(page)} follows_latent={sum(follows.values()) / len(follows):.3f}"
          f" layout_iou={mean_layout:.3f}{w_reads}")


if __name__ == "__main__":
    main()
