"""Attribute vectors on the embedded generator, and side by side with a rank-one rewrite for the same goal.

    python benchmarks/eval_attributes.py --figure docs/attributes.png --dusk-figure docs/attributes-dusk.png
                                      # the figures in RESULTS.md (about 6 min of one core)
    python benchmarks/eval_attributes.py --fit-n 200 --n 40 --grid-n 20 --alphas -1 1    # quick

Fitting: the segmenter labels --fit-n samples (watermark, tree, dusk sky, spire vs dome); each attribute's vector
is fitted in z, in w and in --layer's activations, by mean difference and by a logistic probe (dissect.attributes).
Sweep: the metric seeds are rendered moved by each alpha (alpha = 1: the gap between the class means along the
direction); figures are the attribute's prevalence (share of samples the segmenter labels positive) and the
median perceptual change of the samples (dissect.measure's LPIPS-style distance, as a share of a different image's,
the model's calibrated Scale). A sweep is *monotone* when no step of alpha lowers prevalence by more than one
sample's share (1/n). The main configuration (w, mean difference) runs every attribute on --n seeds, the other
spaces and methods on the first --grid-n of them; the watermark's every configuration, and the w vectors moving
only some style groups' w (watermark: middle, fine; dusk: coarse), on --n, for the comparisons.
Watermark removal: every watermark vector at each negative alpha, applied to every sample, against the rewrite
(Erase at --layer with its default fill, context = --ctx request images with the watermark's bounding boxes; rank
1 at the library's default budget, rank 1 as plain least squares, the dashboard's recommended rank and budget,
each of --ranks, and the recommended erase on the context grown by its best matches as the Remove-watermark recipe
grows it), on the --n seeds: watermark prevalence, and collateral by the edits' protocol (dissect.measure:
perceptual distance on the samples that showed no watermark before, median, as a share of a different image).
Making skies dusk: the dusk vectors at each positive alpha on every sample, against a Paste made as a user makes
it (dusk_request: the sky of a dusk request image copied onto the sky of a day one, --dusk-ctx other day skies as
the context, grown by their best matches; the dashboard's recommended paste settings, its strength calibrated
on the context's images, and also each fixed strength of --dusk-strengths) at each of --dusk-layers.
Figures on the --n seeds: the dusk share (segmenter sky colour, dissect.models.world.is_dusk) of all samples and
of those that were day before; collateral on the day samples outside the sky (perceptual distance with every
pixel that either render labels sky, grown by one pixel, taken from the original: a sky edit may change the sky
and nothing else), and on the samples that were dusk already (whole image: a "make every sky dusk" rule should
leave them alone). Both rewrites are one helper (rewritten), solved with the dashboard's Settings.
The last line is machine-readable: its watermark vector is --summary-vector at alpha = --summary-alpha, its
watermark rewrite rank 1 at the library's default budget; its dusk vector is w, mean at --dusk-alpha, its dusk
rewrite the recommended paste at the first of --dusk-layers (collateral: the day samples outside the sky).
Seeds: vectors fitted on 700000+, measured on 710000+; request images 900000+; grown contexts from the
dashboard's pool (100000+); no metric seed fits a vector or picks a request image.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from dissect.rewrite import (
    DEFAULT_BUDGET,
    Context,
    Copy,
    Edit,
    Erase,
    Paste,
    Request,
    Rewriter,
    calibrate_strength,
    mask_centre,
    solve,
)
from dissect.stats import DEFAULT_CACHE_DIR
from dissect.style import GROUPS, Shift, Style, interpolate, render, styles, synthesize
from dissect.visualize import image_grid, to_pil, to_unit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the dashboard's defaults, eval_edits' request
from eval_edits import watermark_request  # noqa: E402

from dashboard.defaults import (  # noqa: E402
    DEFAULT_LAYER,
    DEFAULT_UNITS,
    GROW_IMAGES,
    GROW_POOL,
    MATCH_QUANTILE,
    POOL_SEEDS,
    STATS_SAMPLES,
)
from dashboard.requests import RECOMMENDED, Settings  # noqa: E402

FIT_SEEDS = 700_000  # labelled samples the vectors are fitted on
METRIC_SEEDS = 710_000  # samples the sweeps and the comparison are measured on
REQUEST_SEEDS = 900_000  # the rewrite's request images (eval_edits' pool)
POOL = 200
ATTRIBUTES = ("watermark", "tree", "dusk", "spire vs dome")
GRID_ATTRIBUTES = ("watermark", "tree", "dusk")  # also measured in every space x method
GROUP_MOVES = {"watermark": ("middle", "fine"), "dusk": ("coarse",)}  # w moved in these style groups only, too
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


def layer_memory(G, sampler, layer: str) -> LayerMemory:
    """``layer``'s key statistics as the dashboard and the CLI fit them (one shared disk cache)."""
    memory = LayerMemory(G, layer)
    memory.fit_moment(sampler, STATS_SAMPLES, cache_dir=str(DEFAULT_CACHE_DIR), progress=False)
    return memory


def grown(memory: LayerMemory, sampler, context: Context) -> Context:
    """What the dashboard's *Add the best matches to the context* makes of a brushed ``context``
    (dashboard.requests.grown_context): plus the pool images whose keys match it best, each masked where it matches."""
    seeds = list(POOL_SEEDS)[:GROW_POOL]
    return context.grown(memory, sampler(seeds), GROW_IMAGES, MATCH_QUANTILE, pool_seeds=seeds)


def rewritten(rewriter: Rewriter, memory: LayerMemory, target: Request, context: Context, settings: Settings,
              render_now) -> tuple[Edit, measure.Rendered]:
    """The edit ``target`` and ``context`` ask for, solved as the dashboard's *Apply* solves a request
    (dashboard.editing.solve_request: the settings' rank, budget, pointwise, L-BFGS, and strength, calibrated on the
    context's images where it is None), and ``render_now()`` under it, applied through the Rewriter for the render
    only (a trial: the model is unchanged afterwards)."""
    edit = solve(memory, target, dataclasses.replace(context, rank=settings.rank), refine=settings.refine,
                 max_iter=settings.iterations, pointwise=settings.pointwise, budget=settings.budget)
    if settings.strength is None:
        found = calibrate_strength(rewriter, memory, edit)
        edit = found.edit
        print(f"calibrated strength {edit.strength:g} on {found.images} context images (carries: {found.carries}; "
              f"losses {', '.join(f'{k:g}: {v:.4g}' for k, v in found.losses.items())}; unedited {found.unedited:.4g})")
    else:
        edit = edit.scaled(settings.strength)
    with rewriter.trial([edit]):
        return edit, render_now()


def dusk_request(sampler, pool: measure.Rendered, seeds: Sequence[int], n_ctx: int) -> tuple[Paste, Context]:
    """"Make the sky dusk" as a user asks it on the Images page: *Copy* the whole sky of the pool's first dusk
    image, *Paste* it onto the sky of its first day image (painted over that sky: the recommended paste goes onto
    the painted region only, centred on it as requests.paste centres it), and brush the skies of
    the next ``n_ctx`` day images as the *Context* (at the recommended paste's rank). Every mask is the
    segmenter's sky pixels ``(H, W)``; grow the context with :func:`grown` as the dashboard's button does."""
    dusk = segmenter_labels(pool.images, pool.labels, "dusk")
    sky = measure.region(pool.labels, "sky", grow=0).float()
    sources, days = (dusk == 1).nonzero()[:, 0].tolist(), (dusk == 0).nonzero()[:, 0].tolist()
    if not sources or len(days) < n_ctx + 1:
        raise ValueError(f"{len(sources)} dusk and {len(days)} day images among {len(seeds)} request seeds; need 1 "
                         f"and {n_ctx + 1}.")
    src, dst, ctx = sources[0], days[0], days[1 : n_ctx + 1]
    copy = Copy(sampler([seeds[src]]), sky[src], seeds=[seeds[src]])
    paste = Paste(sampler([seeds[dst]]), copy, mask_centre(sky[dst]), seeds=[seeds[dst]], region=sky[dst])
    brushed = [seeds[i] for i in ctx]
    return paste, Context(sampler(brushed), sky[ctx], rank=RECOMMENDED["Paste"].rank, seeds=brushed)


def sheet(path: str, base: measure.Rendered, rows: dict[str, measure.Rendered], dusk: torch.Tensor) -> None:
    """Before/after of the first 6 day samples and 2 dusk samples: one row per way of making skies dusk."""
    idx = (~dusk).nonzero()[:6, 0].tolist() + dusk.nonzero()[:2, 0].tolist()
    pictures, labels = [to_unit(base.images[idx])], [f"{base.seeds[i]} before" for i in idx]
    for how, r in rows.items():
        pictures.append(to_unit(r.images[idx]))
        labels += [how] + [""] * (len(idx) - 1)
    to_pil(image_grid(torch.cat(pictures), nrow=len(idx), labels=labels, scale=2)).save(path)
    print(f"figure: {path}")


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
    p.add_argument("--dusk-ctx", type=int, default=3, help="day skies brushed as the dusk paste's context (then grown)")
    p.add_argument("--dusk-layers", nargs="+", default=[DEFAULT_LAYER, "synthesis.b4.conv1"],
                   help="layers the dusk paste is made at; the first is on the last line")
    p.add_argument("--dusk-strengths", type=float, nargs="*", default=[2.5],
                   help="the dusk paste also at these fixed strengths (beside the recommended, calibrated one)")
    p.add_argument("--dusk-alpha", type=float, default=1.0, help="the dusk vector's alpha on the last line")
    p.add_argument("--dusk-figure", default=None, help="also save the dusk before/after sheet here (PNG)")
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
        configs += [("w", "mean", (group,)) for group in GROUP_MOVES.get(attribute, ())]
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
        n = args.n if config[1:] == MAIN or attribute == "watermark" or config[3] else args.grid_n
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
            for alpha in sorted({a for a in alphas if a < 0} | {args.summary_alpha}):  # the last line's too
                rows[f"vector {name(config)} alpha={alpha:g}"] = removal(moved(config, alpha, args.n))

    pool_seeds = list(range(REQUEST_SEEDS, REQUEST_SEEDS + POOL))
    pool = measure.render(G, sampler, pool_seeds, seg)
    wm_z, wm_masks, wm_seeds = watermark_request(sampler, pool, pool_seeds, args.ctx)
    memory = layer_memory(G, sampler, args.layer)
    rewriter = Rewriter(G)
    brushed = Context(wm_z, wm_masks, seeds=wm_seeds)

    def metric_render() -> measure.Rendered:
        return measure.render(G, sampler, seeds, seg)

    def erased(context: Context, settings: Settings) -> measure.Rendered:
        erase = Erase(context.inputs, context.masks, units=args.units, seeds=context.seeds)  # as requests.erase
        return rewritten(rewriter, memory, erase, context, settings, metric_render)[1]

    default = f"rewrite: rank 1, budget {DEFAULT_BUDGET}, {args.ctx} images (the library's default budget)"
    variants = {default: Settings(rank=1), f"rewrite: rank 1, budget None, {args.ctx} images (least squares, as "
                "in the paper)": Settings(rank=1, budget=None)}  # type: ignore[arg-type]  # None: plain least squares
    erase = RECOMMENDED["Erase"]
    variants[f"rewrite: rank {erase.rank}, budget {erase.budget}, {args.ctx} images (the dashboard's recommended "
             "erase)"] = erase
    variants.update({f"rewrite: rank {rank}, budget {DEFAULT_BUDGET}, {args.ctx} images (the library's default "
                     "budget)": Settings(rank=rank) for rank in args.ranks})
    for how, settings in variants.items():
        rows[how] = removal(erased(brushed, settings))
    recipe = grown(memory, sampler, dataclasses.replace(brushed, rank=erase.rank))
    rows[f"rewrite: the recommended erase, {args.ctx} images grown to {len(recipe.seeds or [])} by their best "
         "matches (the Remove-watermark recipe)"] = removal(erased(recipe, erase))
    rewrite = rows[default]
    print(f"{'how':100s} {'after':>6s} {'collateral':>10s}")
    for how, (after, coll) in rows.items():
        print(f"{how:100s} {after:6.3f} {coll:10.4f}")

    # -- dusk: vectors against the rank-one paste --------------------------------------------------------------
    dusk = segmenter_labels(base.images, base.labels, "dusk") == 1
    day = ~dusk

    def duskening(r: measure.Rendered) -> tuple[float, float, float, float]:
        """Dusk share of all samples, dusk share of the day samples, the day samples' change outside the sky
        (either render's sky, grown by a pixel: what a sky edit is allowed to change), the dusk samples' change."""
        now = segmenter_labels(r.images, r.labels, "dusk") == 1
        sky = measure.region(base.labels, "sky") | measure.region(r.labels, "sky")
        outside = measure.collateral(base[day], r[day], sky[day], perceptual)["perceptual_median"]
        kept = measure.collateral(base[dusk], r[dusk], None, perceptual)["perceptual_median"]
        return (float(now.float().mean()), float(now[day].float().mean()), outside / scale.different,
                kept / scale.different)

    print(f"\nmake skies dusk on {args.n} seeds ({int(day.sum())} day, {int(dusk.sum())} dusk before): dusk share of all, "
          f"of the day samples; median change of the day samples outside the sky, of the dusk samples (whole image); "
          f"shares of a different image")
    dusk_rows: dict[str, tuple[float, float, float, float]] = {"unchanged": duskening(base)}
    pictures: dict[str, measure.Rendered] = {}
    for config in vectors:
        if config[0] == "dusk" and (config[1:] == MAIN or config[3]):
            for alpha in sorted({a for a in alphas if a > 0} | {args.dusk_alpha}):
                how = f"vector {name(config)} alpha={alpha:g}"
                dusk_rows[how] = duskening(moved(config, alpha, args.n))
                if alpha == args.dusk_alpha:
                    pictures[f"{name(config)} +{alpha:g}"] = moved(config, alpha, args.n)
    paste = RECOMMENDED["Paste"]
    target, dusk_brushed = dusk_request(sampler, pool, pool_seeds, args.dusk_ctx)
    dusk_rewrites = []
    for layer in args.dusk_layers:
        at = layer_memory(G, sampler, layer)
        context = grown(at, sampler, dusk_brushed)
        for strength in [None, *args.dusk_strengths]:  # None: the recommended paste's calibrated strength
            edit, r = rewritten(rewriter, at, target, context, dataclasses.replace(paste, strength=strength),
                                metric_render)
            how = (f"rewrite: paste at {layer}, rank {paste.rank}, pointwise, budget {paste.budget:g}, strength "
                   f"{edit.strength:g} " + ("(recommended: calibrated)" if strength is None else "(fixed)")
                   + f", {args.dusk_ctx} skies grown to {len(context.seeds or [])}")
            dusk_rows[how] = duskening(r)
            dusk_rewrites.append(how)
            if strength is None:
                pictures[f"paste {layer.removeprefix('synthesis.')}"] = r
    print(f"{'how':120s} {'dusk':>5s} {'day->dusk':>9s} {'outside sky':>11s} {'dusk samples':>12s}")
    for how, (share, turned, outside, kept) in dusk_rows.items():
        print(f"{how:120s} {share:5.3f} {turned:9.3f} {outside:11.4f} {kept:12.4f}")
    if args.dusk_figure:
        sheet(args.dusk_figure, base, pictures, dusk)

    space, method = args.summary_vector.split(",")
    vec_after, vec_coll = rows[f"vector {name(('watermark', args.layer if space == 'layer' else space, method, ()))} "
                               f"alpha={args.summary_alpha:g}"]
    dusk_vec = dusk_rows[f"vector {name(('dusk', *MAIN))} alpha={args.dusk_alpha:g}"]
    dusk_rw = dusk_rows[dusk_rewrites[0]]  # the first layer, recommended (calibrated) strength
    print(f"eval_attributes: attributes={len(ATTRIBUTES)} monotone={sum(main_ok)} watermark_vector_after={vec_after:.3f} "
          f"watermark_vector_collateral={vec_coll:.4f} watermark_rewrite_after={rewrite[0]:.3f} "
          f"watermark_rewrite_collateral={rewrite[1]:.4f} dusk_before={dusk_rows['unchanged'][0]:.3f} "
          f"dusk_vector_after={dusk_vec[0]:.3f} dusk_vector_collateral={dusk_vec[2]:.4f} "
          f"dusk_rewrite_after={dusk_rw[0]:.3f} dusk_rewrite_collateral={dusk_rw[2]:.4f}")


if __name__ == "__main__":
    main()
