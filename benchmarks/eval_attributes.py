"""Attribute vectors on the embedded generator, and side by side with a rank-one rewrite for the same goal.

    python benchmarks/eval_attributes.py                       # the figures in RESULTS.md (about 7 min of one core)
    python benchmarks/eval_attributes.py --fit-n 200 --n 40 --grid-n 20 --alphas -1 1    # quick

Fitting: the segmenter labels --fit-n samples (watermark, tree, dusk sky, spire vs dome); each attribute's vector
is fitted in z, in w and in --layer's activations, by mean difference and by a logistic probe (dissect.attributes).
Sweep: the metric seeds are rendered moved by each alpha (alpha = 1: the gap between the class means along the
direction); figures are the attribute's prevalence (share of samples the segmenter labels positive) and the
median perceptual change of the samples (dissect.measure's LPIPS-style distance, as a share of a different image's,
the model's calibrated Scale). A sweep is *monotone* when no step of alpha lowers prevalence by more than one
sample's share (1/n). The main configuration (w, mean difference) runs every attribute on --n seeds, the other
spaces and methods on the first --grid-n of them; the watermark's every configuration (and the w vector moving
only the middle or only the fine layers' w) on --n, for the comparison.
Watermark removal: every watermark vector at each negative alpha, applied to every sample, against the rewrite
(Erase at --layer with its default fill, context = --ctx request images with the watermark's bounding boxes; rank
1 at the library's default budget, rank 1 as plain least squares, the dashboard's recommended rank and budget,
and each of --ranks), on the --n seeds: watermark prevalence, and collateral by the edits' protocol
(dissect.measure: perceptual distance on the samples that showed no watermark before, median, as a share of a
different image). The last line is machine-readable: its vector is --summary-vector at alpha = --summary-alpha,
its rewrite rank 1 at the library's default budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from dissect import measure
from dissect.attributes import AttributeVector, features, segmenter_labels
from dissect.hooks import model_device
from dissect.memory import LayerMemory
from dissect.models import load
from dissect.models.segmenter import load_segmenter
from dissect.rewrite import DEFAULT_BUDGET, Context, Erase, Rewriter, solve
from dissect.stats import DEFAULT_CACHE_DIR
from dissect.style import GROUPS, Shift, Style, interpolate, render, styles, synthesize
from dissect.visualize import image_grid, to_pil, to_unit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the dashboard's defaults, eval_edits' request
from eval_edits import watermark_request  # noqa: E402

from dashboard.defaults import DEFAULT_UNITS, ERASE_BUDGET, ERASE_RANK, STATS_SAMPLES  # noqa: E402

FIT_SEEDS = 700_000  # labelled samples the vectors are fitted on
METRIC_SEEDS = 710_000  # samples the sweeps and the comparison are measured on
REQUEST_SEEDS = 900_000  # the rewrite's request images (eval_edits' pool)
POOL = 200
ATTRIBUTES = ("watermark", "tree", "dusk", "spire vs dome")
GRID_ATTRIBUTES = ("watermark", "tree", "dusk")  # also measured in every space x method
MAIN = ("w", "mean", ())


def steered(G, shifts: list[Shift]):
    """A callable ``z -> images`` that renders with ``shifts`` (for measure.render; default style)."""
    def forward(z: torch.Tensor) -> torch.Tensor:
        z = z.to(model_device(G))
        return synthesize(G, styles(G, z, Style(), None, shifts), list(range(len(z))), Style(), shifts)
    return forward


def positive_share(r: measure.Rendered, attribute: str) -> float:
    return float((segmenter_labels(r.images, r.labels, attribute) == 1).float().mean())


def monotone(prevalences: list[float], n: int) -> bool:
    """No step lowers prevalence by more than one sample's share."""
    return all(b >= a - 1.0 / n - 1e-9 for a, b in zip(prevalences, prevalences[1:]))


def figure(G, sampler, vectors: dict, path: str, seeds: Sequence[int] = range(0, 6), other: int = 11) -> None:
    """One row per control on ``seeds``: the style controls, then attribute moves (w, mean difference)."""
    def move(attribute: str, alpha: float) -> list[Shift]:
        return [vectors[(attribute, *MAIN)].shift(alpha)]

    rows = [
        ("as sampled", Style(), []),
        ("psi 0.5", Style(truncation=0.5), []),
        (f"coarse from {other}", Style(mix_seed=other, mix=("coarse",)), []),
        (f"middle from {other}", Style(mix_seed=other, mix=("middle",)), []),
        (f"fine from {other}", Style(mix_seed=other, mix=("fine",)), []),
        ("noise resampled", Style(noise={g: "resample" for g in GROUPS}), []),
        ("dusk +0.5", Style(), move("dusk", 0.5)),
        ("dusk -0.5", Style(), move("dusk", -0.5)),
        ("watermark -0.5", Style(), move("watermark", -0.5)),
        ("watermark +0.5", Style(), move("watermark", 0.5)),
        ("tree -0.5", Style(), move("tree", -0.5)),
    ]
    pictures, labels = [], []
    with torch.no_grad():
        for label, style, shifts in rows:
            pictures.append(to_unit(render(G, sampler, list(seeds), style, shifts)).cpu())
            labels += [label] + [""] * (len(seeds) - 1)
        path_ws = interpolate(G, sampler([seeds[0]]), sampler([other]), len(seeds), "w")
        pictures.append(to_unit(synthesize(G, path_ws, [seeds[0]] * len(seeds))).cpu())
        labels += [f"w: {seeds[0]} to {other}"] + [""] * (len(seeds) - 1)
    to_pil(image_grid(torch.cat(pictures), nrow=len(seeds), labels=labels, scale=2)).save(path)
    print(f"figure: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fit-n", type=int, default=300)
    p.add_argument("--n", type=int, default=100, help="metric seeds: main sweeps and the watermark comparison")
    p.add_argument("--grid-n", type=int, default=40, help="metric seeds for the other spaces and methods")
    p.add_argument("--alphas", type=float, nargs="+", default=[-1.0, -0.5, 0.5, 1.0], help="0 is always added")
    p.add_argument("--layer", default="synthesis.b16.conv1")
    p.add_argument("--ctx", type=int, default=5, help="the rewrite's context images")
    p.add_argument("--units", type=int, default=DEFAULT_UNITS, help="the erase's zeroed key units (the dashboard's default)")
    p.add_argument("--ranks", type=int, nargs="*", default=[16], help="more rewrite ranks at the default budget")
    p.add_argument("--summary-vector", default="w,mean", help="space,method reported on the last line ('layer' for --layer)")
    p.add_argument("--summary-alpha", type=float, default=-1.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--figure", default=None, help="also save a picture of the controls and moves here (PNG)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    alphas = sorted(set(args.alphas) | {0.0})
    G, sampler = load("spires", args.device)
    seg = load_segmenter(args.device)
    perceptual = measure.Perceptual(seg)
    scale = measure.calibrate(G, sampler, range(64), perceptual, cache_dir=DEFAULT_CACHE_DIR)
    print(f"perceptual scale: {scale}")

    fit_seeds = list(range(FIT_SEEDS, FIT_SEEDS + args.fit_n))
    fit = measure.render(G, sampler, fit_seeds, seg)
    z = sampler(fit_seeds)
    spaces = ["z", "w", args.layer]
    feats = {space: features(G, z, space) for space in spaces}
    vectors: dict[tuple[str, str, str, tuple[str, ...]], AttributeVector] = {}
    for attribute in ATTRIBUTES:
        labels = segmenter_labels(fit.images, fit.labels, attribute)
        pos, neg = int((labels == 1).sum()), int((labels == 0).sum())
        print(f"{attribute}: {pos} positive, {neg} negative of {args.fit_n} fit samples")
        configs = [(space, method, ()) for space in spaces for method in ("mean", "probe")]
        configs += [("w", "mean", (group,)) for group in ("middle", "fine")] if attribute == "watermark" else []
        for space, method, groups in configs:
            if attribute in GRID_ATTRIBUTES or (space, method, groups) == MAIN:
                vectors[attribute, space, method, groups] = AttributeVector(
                    G, space, method, name=attribute, groups=groups).fit(z, labels, x=feats[space])
    del feats
    if args.figure:
        figure(G, sampler, vectors, args.figure)

    seeds = list(range(METRIC_SEEDS, METRIC_SEEDS + args.n))
    base = measure.render(G, sampler, seeds, seg)
    renders: dict[tuple, measure.Rendered] = {}

    def moved(config: tuple, alpha: float, n: int) -> measure.Rendered:
        if (config, alpha) not in renders:
            shift = vectors[config].shift(alpha)
            renders[config, alpha] = base[:n] if alpha == 0 else measure.render(steered(G, [shift]), sampler, seeds[:n], seg)
        return renders[config, alpha]

    def name(config: tuple) -> str:
        _, space, method, groups = config
        return f"{space},{method}" + (f" ({'+'.join(groups)} w only)" if groups else "")

    # -- sweeps ------------------------------------------------------------------------------------------------
    print(f"\nprevalence (and median perceptual change, share of a different image) as alpha sweeps {alphas}")
    print(f"{'attribute':14s} {'vector':38s} {'n':>4s} | " + " ".join(f"{a:>13g}" for a in alphas)
          + " | monotone probe_acc")
    sweeps = {}
    for config, vec in vectors.items():
        attribute = config[0]
        n = args.n if config[1:] == MAIN or attribute == "watermark" else args.grid_n
        cells = []
        for alpha in alphas:
            r = moved(config, alpha, n)
            change = measure.collateral(base[:n], r, None, perceptual)["perceptual_median"] / scale.different
            cells.append((positive_share(r, attribute), change))
        sweeps[config] = ok = monotone([c[0] for c in cells], n)
        acc = f"{vec.accuracy:.2f}" if vec.accuracy is not None else "-"
        print(f"{attribute:14s} {name(config):38s} {n:4d} | "
              + " ".join(f"{prev:5.3f} ({chg:5.3f})" for prev, chg in cells) + f" | {str(ok):8s} {acc}", flush=True)
    main_ok = [sweeps[(a, *MAIN)] for a in ATTRIBUTES]

    # -- watermark: vectors against the rank-one rewrite -----------------------------------------------------
    unrelated = ~measure.present(base.labels, "watermark")

    def removal(r: measure.Rendered) -> tuple[float, float]:
        coll = measure.collateral(base[unrelated], r[unrelated], None, perceptual)["perceptual_median"]
        return measure.prevalence(r.labels, "watermark"), coll / scale.different

    print(f"\nremove the watermark on {args.n} seeds (before: {measure.prevalence(base.labels, 'watermark'):.3f}); "
          f"collateral on the {int(unrelated.sum())} samples without one (median, share of a different image)")
    rows = {}
    for config in vectors:
        if config[0] == "watermark":
            for alpha in (a for a in alphas if a < 0):
                rows[f"vector {name(config)} alpha={alpha:g}"] = removal(moved(config, alpha, args.n))

    pool_seeds = list(range(REQUEST_SEEDS, REQUEST_SEEDS + POOL))
    pool = measure.render(G, sampler, pool_seeds, seg)
    wm_z, wm_masks, wm_seeds = watermark_request(sampler, pool, pool_seeds, args.ctx)
    memory = LayerMemory(G, args.layer)
    memory.fit_moment(sampler, STATS_SAMPLES, cache_dir=str(DEFAULT_CACHE_DIR), progress=False)
    rewriter = Rewriter(G)
    variants = [(1, DEFAULT_BUDGET, "the library's default budget"), (1, None, "least squares, as in the paper"),
                (ERASE_RANK, ERASE_BUDGET, "the dashboard's recommended erase")]
    variants += [(rank, DEFAULT_BUDGET, "the library's default budget") for rank in args.ranks]
    for rank, budget, what in variants:
        rewriter.apply(solve(memory, Erase(wm_z, wm_masks, units=args.units, seeds=wm_seeds),
                             Context(wm_z, wm_masks, rank=rank, seeds=wm_seeds), budget=budget))
        rows[f"rewrite: rank {rank}, budget {budget}, {args.ctx} images ({what})"] = removal(
            measure.render(G, sampler, seeds, seg))
        rewriter.undo()
    rewrite = rows[f"rewrite: rank 1, budget {DEFAULT_BUDGET}, {args.ctx} images (the library's default budget)"]
    print(f"{'how':90s} {'after':>6s} {'collateral':>10s}")
    for how, (after, coll) in rows.items():
        print(f"{how:90s} {after:6.3f} {coll:10.4f}")

    space, method = args.summary_vector.split(",")
    vec_after, vec_coll = rows[f"vector {name(('watermark', args.layer if space == 'layer' else space, method, ()))} "
                               f"alpha={args.summary_alpha:g}"]
    print(f"eval_attributes: attributes={len(ATTRIBUTES)} monotone={sum(main_ok)} watermark_vector_after={vec_after:.3f} "
          f"watermark_vector_collateral={vec_coll:.4f} watermark_rewrite_after={rewrite[0]:.3f} "
          f"watermark_rewrite_collateral={rewrite[1]:.4f}")


if __name__ == "__main__":
    main()
