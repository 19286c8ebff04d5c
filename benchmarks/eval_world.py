"""Quality of a generator against the procedural world it was trained on, measured with the segmenter.

    python benchmarks/eval_world.py [--model spires] [--n 2000] [--device cpu]
    python benchmarks/eval_world.py --model world --n 200      # the world stands in for a generator
    python benchmarks/eval_world.py --calibrate                # how the presence thresholds were chosen
    python benchmarks/eval_world.py --grid docs/generator_samples.png   # also save seeds 0-31 over world images

Generator samples use seeds 0..n-1 (batches of 100); world images use seeds from ranges no generator
seed, segmenter training or segmenter evaluation uses. Both sides are labelled by the segmenter, so
they are compared through the same lens. Figures:
  presence  an image "has" a class when the segmenter gives it at least its
            `dissect.models.segmenter.PRESENCE_PIXELS` pixels
            (at 64x64; scaled by area at other sizes); dusk is `is_dusk` on the segmenter's labels;
            printed for every class, with presence_worst_rel_err, the worst |p_G - p_W| / p_W over them
            and dusk (issue 16: every class within 25%), and presence_worst, its class;
  class_freq_worst_rel_err  the worst |f_G - f_W| / f_W over classes whose pixel frequencies differ by
            more than 2 percentage points (0 when none does);
  fd        Fréchet distance between segmenter features of `--fd-n` generator samples and as many world
            images, beside fd_floor, the same distance between two disjoint world sets;
  seg_*     the segmenter's pixel accuracy and mean IoU on held-out world images (true labels);
  near_dup  the share of ordered sample pairs whose label maps agree on >= 95% of pixels (the helper of
            `benchmarks/diversity.py`), and first_page_near_dup_pairs, such pairs among seeds 0-11.
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from diversity import FACT_OF, FIRST_PAGE, load_model, near_duplicate_pairs, near_duplicate_share
from torch import Tensor

from dissect.models.segmenter import (
    HELD_OUT_SEEDS,
    WEIGHTS,
    Segmenter,
    evaluate,
    load_segmenter,
    presence_threshold,
)
from dissect.models.world import CLASSES, World, is_dusk

WORLD_SEEDS_A = 2_000_000  # world images compared with the generator
WORLD_SEEDS_B = 3_000_000  # a second, disjoint world set: the Fréchet floor
CALIBRATION_SEEDS = 4_000_000
BATCH = 100

Render = Callable[[Sequence[int]], Tensor]  # seeds -> images (N, 3, H, W) in [-1, 1]


def generator_render(model: str, device: str) -> Render:
    """Images from the named generator (or the world itself when `model == "world"`)."""
    if model == "world":
        world = World(64)
        return lambda seeds: world.render(world.sample_latents(seeds).to(device))[0]
    G, sampler = load_model(model, device)
    return lambda seeds: G(sampler(seeds).to(device))


def world_render(device: str) -> Render:
    world = World(64)
    return lambda seeds: world.render(world.sample_latents(seeds).to(device))[0]


def batches(render: Render, seeds: Sequence[int]) -> Iterator[Tensor]:
    for start in range(0, len(seeds), BATCH):
        yield render(seeds[start : start + BATCH])


@torch.no_grad()
def summarise(seg: Segmenter, render: Render, seeds: Sequence[int], n_stats: int) -> dict:
    """Features of every image; labels of the first `n_stats` (when > 0).

    Returns: features (N, F) float64, pixels (int, per image) and, when n_stats > 0,
    counts (n_stats, K) segmenter pixels per class, dusk (n_stats,) bool and labels (n_stats, H, W) uint8.
    """
    counts, dusk, feats, label_maps = [], [], [], []
    for start, images in zip(range(0, len(seeds), BATCH), batches(render, seeds)):
        feats.append(seg.features(images).double().cpu())
        if start < n_stats:
            labels = seg.segment(images)
            counts.append(class_counts(labels, seg.num_classes))
            dusk.append(is_dusk(images, labels).cpu())
            label_maps.append(labels.to("cpu", torch.uint8))
    out = {"features": torch.cat(feats), "pixels": images.shape[-2] * images.shape[-1]}
    if counts:
        out.update(counts=torch.cat(counts)[:n_stats], dusk=torch.cat(dusk)[:n_stats],
                   labels=torch.cat(label_maps)[:n_stats])
    return out


def class_counts(labels: Tensor, k: int) -> Tensor:
    """labels (N, H, W) -> pixels per class (N, K) int64, on the CPU."""
    return torch.nn.functional.one_hot(labels.flatten(1), k).sum(1).cpu()


def presence(summary: dict, name: str) -> Tensor:
    """(N,) bool: the segmenter gives class `name` at least its threshold of pixels, scaled to the size."""
    return summary["counts"][:, CLASSES.index(name)] >= presence_threshold(name, summary["pixels"])


def frechet(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F), float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(cov_a cov_b) = sum of sqrt eigenvalues of the symmetric cov_a^1/2 cov_b cov_a^1/2
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


@torch.no_grad()
def save_grid(path: Path, render: Render, world: Render) -> None:
    """Four rows of generator samples (seeds 0-31), then two rows of world images for comparison."""
    from torchvision.utils import save_image

    images = torch.cat([render(range(32)), world(range(WORLD_SEEDS_A, WORLD_SEEDS_A + 16))]).clamp(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.cpu() * 0.5 + 0.5, str(path), nrow=8, padding=2)


def calibrate(seg: Segmenter, device: str, n: int) -> None:
    """Print, per class and threshold, how often the pixel-count rule agrees with the world's facts."""
    world = World(64)
    z = world.sample_latents(range(CALIBRATION_SEEDS, CALIBRATION_SEEDS + n))
    facts = world.scene_facts(z)
    images = torch.cat([world.render(z[i : i + BATCH].to(device))[0] for i in range(0, n, BATCH)])
    counts = torch.cat([class_counts(seg.segment(b), seg.num_classes) for b in images.split(BATCH)])
    print(f"calibration on {n} world images (seeds from {CALIBRATION_SEEDS}): agreement | rate by rule vs facts")
    for name, fact in FACT_OF.items():
        truth = facts[fact]
        cells = []
        for t in (1, 2, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 96):
            rule = counts[:, CLASSES.index(name)] >= t
            cells.append(f"{t}:{(rule == truth).float().mean():.3f}|{rule.float().mean():.3f}")
        print(f"  {name:9s} facts={truth.float().mean():.3f}  " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spires", help="loaders.load name or entry point; 'world' for the world")
    parser.add_argument("--n", type=int, default=2000, help="samples for the rates (the Fréchet sets are 2.5x)")
    parser.add_argument("--fd-n", type=int, default=None, help="images per Fréchet set (default 2.5 * n)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segmenter", type=Path, default=WEIGHTS, help="segmenter weights (safetensors)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--calibrate", action="store_true", help="print threshold agreement and exit")
    parser.add_argument("--grid", type=Path, default=None, help="save a PNG: generator seeds 0-31 above 16 world images")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fd_n = args.fd_n or int(2.5 * args.n)
    start = time.time()
    seg = load_segmenter(args.device, args.segmenter)
    if args.calibrate:
        calibrate(seg, args.device, args.n)
        return

    if args.grid:
        save_grid(args.grid, generator_render(args.model, args.device), world_render(args.device))
    count = max(args.n, fd_n)
    g = summarise(seg, generator_render(args.model, args.device), range(count), args.n)
    w = summarise(seg, world_render(args.device), range(WORLD_SEEDS_A, WORLD_SEEDS_A + count), args.n)
    w_b = summarise(seg, world_render(args.device), range(WORLD_SEEDS_B, WORLD_SEEDS_B + fd_n), 0)
    fd = frechet(g["features"][:fd_n], w["features"][:fd_n])
    fd_floor = frechet(w_b["features"], w["features"][:fd_n])
    scores = evaluate(seg, list(HELD_OUT_SEEDS)[: max(1, args.n // 2)])

    every = {name: (presence(g, name).float().mean().item(), presence(w, name).float().mean().item())
             for name in CLASSES}
    every["dusk"] = (g["dusk"].float().mean().item(), w["dusk"].float().mean().item())
    rates = {name: every[name] for name in (*FACT_OF, "dusk")}  # the five the bar bounds
    presence_err = {name: abs(rg - rw) / max(rw, 1e-9) for name, (rg, rw) in every.items()}
    worst_presence = max(presence_err, key=presence_err.get)
    freq_g = g["counts"].sum(0).double() / g["counts"].sum()
    freq_w = w["counts"].sum(0).double() / w["counts"].sum()
    gap = (freq_g - freq_w).abs()
    rel = torch.where(gap > 0.02, gap / freq_w.clamp(min=1e-9), torch.zeros_like(gap))
    worst = rel.max().item()
    near_dup, near_dup_world = near_duplicate_share(g["labels"]), near_duplicate_share(w["labels"])
    page = near_duplicate_pairs(g["labels"][:FIRST_PAGE])

    print(f"model={args.model} samples={args.n} fd_sets={fd_n} device={args.device} ({time.time() - start:.0f}s)")
    print(f"{'presence':<12}{'generator':>10}{'world':>8}   target")
    targets = {"watermark": "0.20-0.40", "spire": ">= 0.15", "dome": ">= 0.15", "tree": ">= 0.30", "dusk": "0.20-0.40"}
    for name, (rg, rw) in rates.items():
        print(f"{name:<12}{rg:>10.3f}{rw:>8.3f}   {targets[name]}")
    print(f"\n{'presence':<12}{'generator':>10}{'world':>8}{'rel err':>9}   (every class; issue 16: within 0.25)")
    for name, (rg, rw) in every.items():
        flag = "  > 0.25" if presence_err[name] > 0.25 else ""
        print(f"{name:<12}{rg:>10.3f}{rw:>8.3f}{presence_err[name]:>9.3f}{flag}")
    print(f"\n{'pixel share':<12}{'generator':>10}{'world':>8}{'rel err':>9}")
    for i, name in enumerate(CLASSES):
        flag = "  > 2pp" if gap[i] > 0.02 else ""
        print(f"{name:<12}{freq_g[i]:>10.4f}{freq_w[i]:>8.4f}{gap[i] / max(freq_w[i], 1e-9):>9.3f}{flag}")
    print(f"\nfrechet distance (segmenter features): generator-world {fd:.4g}, world-world floor {fd_floor:.4g}")
    print(f"segmenter on {max(1, args.n // 2)} held-out world images: pixel acc {scores['pixel_acc']:.4f}, "
          f"mIoU {scores['miou']:.4f}")
    print("  " + "  ".join(f"{c}={scores[f'iou_{c}']:.3f}" for c in CLASSES))
    print(f"near-duplicate pairs (label maps agreeing on >= 95%): generator {near_dup:.5f}, world {near_dup_world:.5f}; "
          f"among seeds 0-{FIRST_PAGE - 1}: {page or 'none'}")
    print(
        f"eval_world: watermark={rates['watermark'][0]:.3f} spire={rates['spire'][0]:.3f} dome={rates['dome'][0]:.3f} "
        f"tree={rates['tree'][0]:.3f} dusk={rates['dusk'][0]:.3f} class_freq_worst_rel_err={worst:.3f} "
        f"fd={fd:.4g} fd_floor={fd_floor:.4g} seg_pixel_acc={scores['pixel_acc']:.4f} seg_miou={scores['miou']:.4f} "
        f"near_dup={near_dup:.5f} first_page_near_dup_pairs={len(page)} "
        f"presence_worst_rel_err={presence_err[worst_presence]:.3f} presence_worst={worst_presence}"
    )


if __name__ == "__main__":
    main()
