"""The scale of dissect.measure's collateral on the embedded generator, with synthetic anchors.

Calibration (what :func:`dissect.measure.calibrate` caches): the perceptual distance, pixel RMSE and SSIM between
two renders of a seed that differ only in the generator's per-pixel noise (invisible) and between two different
seeds (a different image). Anchors: the same measures for synthetic degradations of fresh samples (Gaussian blur
of sigma 0.5 / 1 / 2 px, Gaussian pixel noise, a smear: a 24x24 patch blurred at sigma 4, and a blob: a soft
dark-green disc of radius 6 px), and the perceptual distance restricted to outside the smeared patch.

With ``--edits``, it also checks the measure on real edits: three erases of the watermarks a user brushes on
seeds 5, 27 and 28 (boxes around the segmenter's watermark pixels) at ``synthesis.b16.conv1``: rank 16 by plain
least squares (known to smear), rank 16 and rank 4 with the solver's default smoothness; the collateral on
samples without a watermark, and (with ``--sheets DIR``) a sheet per edit of unrelated samples, original above
edited, at the 0/25/50/75/90/100th percentile of the distance, to see whether the ranking follows the damage.

    python benchmarks/measure_scale.py [--n 200] [--calibration-n 64] [--edits [--sheets DIR]]

Ends with one line ``measure_scale: noise=... different=... blur1=... smear=... blob=...`` (perceptual means).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from dissect import measure
from dissect.memory import LayerMemory, bounding_boxes
from dissect.models import load
from dissect.rewrite import Context, Erase, Rewriter

FRESH = 500_000  # anchor seeds (the metric seeds of eval_edits)


def blur(x: Tensor, sigma: float) -> Tensor:
    """``x (N, 3, H, W)`` convolved with a Gaussian of std ``sigma`` px (reflected borders)."""
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=3)


def centre_box(n: int, size: int, side: int = 64) -> Tensor:
    """``(n, side, side)`` bool: a ``size`` x ``size`` square in the middle."""
    mask = torch.zeros(n, side, side, dtype=torch.bool)
    lo = (side - size) // 2
    mask[:, lo : lo + size, lo : lo + size] = True
    return mask


def blob(x: Tensor, radius: float = 6.0, colour: tuple[float, float, float] = (-0.8, -0.4, -0.8)) -> Tensor:
    """``x`` with a soft dark-green disc of ``radius`` px at a seeded position per image."""
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(0)
    cy, cx = torch.randint(12, h - 12, (n, 1, 1), generator=g), torch.randint(12, w - 12, (n, 1, 1), generator=g)
    yy, xx = torch.arange(h).view(1, -1, 1), torch.arange(w).view(1, 1, -1)
    alpha = torch.sigmoid(radius - ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt())[:, None]
    return (1 - alpha) * x + alpha * torch.tensor(colour).view(1, 3, 1, 1)


def sheet(before: Tensor, after: Tensor, d: Tensor, scale: measure.Scale, path: str) -> None:
    """Originals above edits at six percentiles of the distance ``d (N,)``, each labelled with its value."""
    from PIL import Image, ImageDraw

    order = d.argsort()
    picks = [int(order[round(q * (len(d) - 1))]) for q in (0, 0.25, 0.5, 0.75, 0.9, 1.0)]
    tiles = torch.cat([torch.cat([before[i], after[i]], 1) for i in picks], 2)
    img = Image.fromarray(((tiles.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy())
    img = img.resize((img.width * 3, img.height * 3), Image.NEAREST)
    canvas = Image.new("RGB", (img.width, img.height + 18), "white")
    canvas.paste(img, (0, 18))
    for k, i in enumerate(picks):
        label = f"{float(d[i]):.3f} = {float(measure.relative(d[i], scale)):.2g} of a different image"
        ImageDraw.Draw(canvas).text((k * img.width // len(picks) + 4, 3), label, fill="black")
    canvas.save(path)


def edit_check(G, sampler, perceptual: measure.Perceptual, scale: measure.Scale, n: int, sheets: str | None) -> None:
    """The collateral of three erases of three brushed watermarks (see the module docstring)."""
    brushed = measure.render(G, sampler, [5, 27, 28], perceptual.network)
    masks = bounding_boxes(measure.region(brushed.labels, "watermark", grow=1).float())  # (3, H, W)
    z = sampler(brushed.seeds)
    base = measure.render(G, sampler, range(FRESH, FRESH + n), perceptual.network)
    memory = LayerMemory(G, "synthesis.b16.conv1")
    memory.fit_moment(sampler, 2000, progress=False)
    edits = Rewriter(G)
    print(f"\nerases of the watermarks brushed on seeds 5, 27, 28 at {memory.layer}; {n} fresh samples")
    for name, tag, rank, smooth in (("rank 16, least squares", "r16_lstsq", 16, 0.0),
                                    ("rank 16, smoothed", "r16_smooth", 16, None), ("rank 4, smoothed", "r4_smooth", 4, None)):
        edits.rewrite(memory, Erase(z, masks), Context(z, masks, rank=rank), smooth=smooth)
        result = measure.compare(base, G, sampler, base.seeds, classes=["watermark"], target="watermark",
                                 perceptual=perceptual, scale=scale)
        print(f"{name}: " + result.summary().replace("\n", "\n    "))
        if sheets:
            unrelated = result.before[result.unrelated], result.after[result.unrelated]
            d = measure.collateral_per_image(*unrelated, None, perceptual)["perceptual"]
            sheet(unrelated[0].images, unrelated[1].images, d, scale, f"{sheets}/measure_{tag}.png")
        edits.undo()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="fresh samples for the anchors (default: %(default)s)")
    parser.add_argument("--calibration-n", type=int, default=64, help="seeds for the calibration (default: %(default)s)")
    parser.add_argument("--edits", action="store_true", help="also measure three real erases (see above)")
    parser.add_argument("--sheets", default=None, help="with --edits: write a sheet per erase into this folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    G, sampler = load("spires")
    perceptual = measure.Perceptual()

    t = time.time()
    scale = measure.calibrate(G, sampler, range(args.calibration_n), perceptual)
    print(f"calibration on seeds 0-{args.calibration_n - 1} ({time.time() - t:.1f} s): {scale.how}")
    print(f"{'':24s} {'perceptual':>10s} {'RMSE':>8s} {'SSIM':>8s}")
    print(f"{'noise re-render':24s} {scale.noise:10.5f} {scale.rmse[0]:8.5f} {scale.ssim[0]:8.5f}")
    print(f"{'different image':24s} {scale.different:10.4f} {scale.rmse[1]:8.4f} {scale.ssim[1]:8.4f}")

    base = measure.render(G, sampler, range(FRESH, FRESH + args.n)).images
    box = centre_box(len(base), 24)
    torch.manual_seed(0)
    degraded = {
        "noise re-render": measure.render(G, sampler, range(FRESH, FRESH + args.n), noise_mode="random").images,
        "blur sigma 0.5": blur(base, 0.5),
        "blur sigma 1": blur(base, 1.0),
        "blur sigma 2": blur(base, 2.0),
        "pixel noise std 0.02": (base + 0.02 * torch.randn_like(base)).clamp(-1, 1),
        "pixel noise std 0.05": (base + 0.05 * torch.randn_like(base)).clamp(-1, 1),
        "pixel noise std 0.1": (base + 0.1 * torch.randn_like(base)).clamp(-1, 1),
        "smear (24x24, sigma 4)": torch.where(box[:, None], blur(base, 4.0), base),
        "blob (r 6, dark green)": blob(base),
        "different seed": base.roll(1, 0),
    }
    print(f"\nanchors on {args.n} fresh samples (seeds {FRESH}-{FRESH + args.n - 1}); perceptual as mean, median "
          "and share of a different image")
    print(f"{'degradation':24s} {'mean':>8s} {'median':>8s} {'relative':>8s} {'RMSE':>8s} {'SSIM':>8s}")
    means = {}
    for name, images in degraded.items():
        t = time.time()
        c = measure.collateral(base, images, None, perceptual)
        means[name] = c["perceptual"]
        print(f"{name:24s} {c['perceptual']:8.4f} {c['perceptual_median']:8.4f} {measure.relative(c['perceptual'], scale):8.3f} "
              f"{c['rmse']:8.4f} {c['ssim']:8.4f}   ({time.time() - t:.1f} s)")
    outside = measure.collateral(base, degraded["smear (24x24, sigma 4)"], box, perceptual)
    print(f"smear measured outside its patch: perceptual {outside['perceptual']:.4f}, RMSE {outside['rmse']:.4f}, "
          f"SSIM {outside['ssim']:.4f} (the patch's own change does not count)")
    print(f"\nexample: smear {measure.format_distance(means['smear (24x24, sigma 4)'], scale)}")
    if args.edits:
        edit_check(G, sampler, perceptual, scale, args.n, args.sheets)
    print(f"measure_scale: noise={scale.noise:.5f} different={scale.different:.4f} rmse_noise={scale.rmse[0]:.5f} "
          f"rmse_different={scale.rmse[1]:.4f} ssim_noise={scale.ssim[0]:.5f} ssim_different={scale.ssim[1]:.4f} "
          f"blur1={means['blur sigma 1']:.4f} smear={means['smear (24x24, sigma 4)']:.4f} "
          f"blob={means['blob (r 6, dark green)']:.4f}")


if __name__ == "__main__":
    main()
