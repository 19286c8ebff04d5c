"""Edits on the embedded generator, measured with the segmenter, against the paper's baselines.

    python benchmarks/eval_edits.py                      # full run: 2000 seeds for the headline figures
    python benchmarks/eval_edits.py --n 200 --sweep-n 100 --layers synthesis.b16.conv1 --ranks 4   # quick

Two edits, built from fixed request seeds (disjoint from the metric seeds and from the seeds C is collected on):
  remove watermarks  Erase at the layer, context = segmenter watermark masks of a few images, rank r. Beside it:
                     GAN-dissection ablation (zero the top-30 / top-60 watermark units by IoU, everywhere) and
                     unconstrained fine-tuning of the whole weight on the same constraint. Figures: prevalence
                     (share of images where the segmenter sees a watermark, the library's presence rule) and
                     collateral (mean |Δ pixel| in [0, 1] units outside the base images' watermark regions).
                     The headline erase and its fine-tuning run in --passes passes, as a user iterates: each
                     pass draws its request from the request images the edited model still marks, and the
                     summary's watermark_after and rewrite_collateral are those of the last pass.
  spire -> tree      copy a tree, paste it onto a spire, context from several spires (rank r). Figures: share of the
                     unedited model's spire pixels that the segmenter labels tree after the edit (the paper's
                     "correct modification"); collateral outside spire regions; beside fine-tuning.
  speed              seconds per edit against the authors' procedure, implemented here as the reference: Adam on the
                     whole weight, 2001 steps, lr 0.05, L1 on values, projection of ΔW onto span(D) every 10 steps;
                     same request, same constraint loss (the weighted MSE of the layer's output).
  sweep              layer x rank for both edits on --sweep-n seeds.
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dissect import stats
from dissect.hooks import model_device
from dissect.memory import LayerMemory, bounding_boxes
from dissect.models import load
from dissect.models.segmenter import Segmenter, load_segmenter, present
from dissect.models.world import CLASSES
from dissect.rewrite import Context, Copy, Erase, Paste, Rewriter, constraint, constraint_loss, solve

METRIC_SEEDS = 500_000  # headline and sweep figures
REQUEST_SEEDS = 900_000  # images the requests are drawn from
POOL = 400
BATCH = 100
WATERMARK, SPIRE, TREE = CLASSES.index("watermark"), CLASSES.index("spire"), CLASSES.index("tree")


@dataclass
class Rendered:
    images: Tensor  # (N, 3, H, W) in [-1, 1]
    labels: Tensor  # (N, H, W)


@torch.no_grad()
def render(G: nn.Module, sampler, seg: Segmenter, seeds: Sequence[int]) -> Rendered:
    images, labels = [], []
    for start in range(0, len(seeds), BATCH):
        z = sampler(seeds[start : start + BATCH]).to(model_device(G))
        x = G(z).clamp(-1, 1)
        images.append(x.cpu())
        labels.append(seg.segment(x).cpu())
    return Rendered(torch.cat(images), torch.cat(labels))


def dilate(mask: Tensor, px: int = 1) -> Tensor:
    """``mask (N, H, W)`` bool grown by ``px`` pixels."""
    return F.max_pool2d(mask[:, None].float(), 2 * px + 1, 1, px)[:, 0] > 0


def collateral(before: Rendered, after: Rendered, region: Tensor) -> float:
    """Mean |Δ pixel| (in [0, 1] image units) outside ``region (N, H, W)``."""
    diff = (after.images - before.images).abs().mean(dim=1) / 2  # [-1, 1] -> [0, 1] units
    outside = ~region
    return float(diff[outside].mean())


def prevalence(r: Rendered, name: str) -> float:
    return float(present(r.labels, name).float().mean())


# ---------------------------------------------------------------------------------------------------------
# Requests, built from the segmenter's view of fixed request seeds
# ---------------------------------------------------------------------------------------------------------


def watermark_request(sampler, pool: Rendered, seeds: Sequence[int], n_ctx: int,
                      minimum: int | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """Latents and masks ``(n, H, W)`` of the first ``n_ctx`` pool images showing a watermark (at least
    ``minimum``, default all ``n_ctx``): each mask is the bounding box of the segmenter's watermark pixels grown
    by one pixel, the rectangle a user brushes."""
    idx = present(pool.labels, "watermark").nonzero()[:, 0][:n_ctx]
    if len(idx) < (n_ctx if minimum is None else minimum):
        raise RuntimeError(f"Only {len(idx)} watermarked images among {len(seeds)} request seeds.")
    chosen = [seeds[i] for i in idx.tolist()]
    return sampler(chosen), bounding_boxes(dilate(pool.labels[idx] == WATERMARK).float()), chosen


def _compactness(mask: Tensor) -> Tensor:
    """Per image: pixel count over bounding-box area (1 for a filled rectangle), 0 for empty masks."""
    n, h, w = mask.shape
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    ar = torch.arange(h)
    ac = torch.arange(w)
    height = torch.where(rows, ar, -1).amax(1) - torch.where(rows, ar, h).amin(1) + 1
    width = torch.where(cols, ac, -1).amax(1) - torch.where(cols, ac, w).amin(1) + 1
    return mask.sum((1, 2)) / (height.clamp_min(1) * width.clamp_min(1))


def spire_to_tree_request(sampler, pool: Rendered, seeds: Sequence[int], n_ctx: int, rank: int) -> tuple[Paste, Context]:
    """Copy the most compact single tree of the pool, paste it onto a spire (the paste's region is that spire,
    grown by a pixel), context from ``n_ctx`` other spires."""
    tree = pool.labels == TREE
    count = tree.sum((1, 2))
    score = torch.where(count >= 30, _compactness(tree), torch.zeros(()))
    src = int(score.argmax())
    spires = (present(pool.labels, "spire")).nonzero()[:, 0]
    spires = spires[spires != src][: n_ctx + 1]
    if len(spires) < n_ctx + 1:
        raise RuntimeError(f"Only {len(spires)} spire images among {len(seeds)} request seeds.")
    target = int(spires[0])
    ys, xs = (pool.labels[target] == SPIRE).nonzero(as_tuple=True)
    position = (int(ys.float().mean()), int(xs.float().mean()))
    copy_req = Copy(sampler([seeds[src]]), dilate(tree[src : src + 1])[0].float(), seeds=[seeds[src]])
    region = dilate(pool.labels[target : target + 1] == SPIRE)[0].float()
    paste = Paste(sampler([seeds[target]]), copy_req, position=position, seeds=[seeds[target]], region=region)
    ctx_idx = spires[1:]
    ctx_seeds = [seeds[i] for i in ctx_idx.tolist()]
    context = Context(sampler(ctx_seeds), dilate(pool.labels[ctx_idx] == SPIRE).float(), rank=rank, seeds=ctx_seeds)
    return paste, context


# ---------------------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------------------


def dissection_units(memory: LayerMemory, sampler, pool_seeds: Sequence[int], pool: Rendered, n: int) -> Tensor:
    """GAN dissection: key units ranked by IoU of (activation > its 99th percentile) with the watermark masks."""
    keys = torch.cat([memory.keys(sampler(pool_seeds[s : s + BATCH])) for s in range(0, len(pool_seeds), BATCH)])
    q = stats.Quantile()
    q.add(stats.rows(keys))
    thresh = q.quantiles([0.99])[0].to(keys)  # (C,)
    wm = F.interpolate((pool.labels == WATERMARK)[:, None].float(), size=keys.shape[2:], mode="area")[:, 0] > 0.5
    act = keys > thresh[None, :, None, None]
    inter = (act & wm[:, None]).sum((0, 2, 3)).double()
    union = (act | wm[:, None]).sum((0, 2, 3)).double()
    return (inter / union.clamp_min(1)).argsort(descending=True)[:n]


def fine_tune(memory: LayerMemory, target, context, steps: int = 300, lr: float = 0.01) -> Tensor:
    """Unconstrained fine-tuning: Adam on every entry of the weight against the same constraint. Returns ΔW."""
    c, _ = constraint(memory, target, context)
    base = memory.weight.detach()
    weight = base.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    for _ in range(steps):
        loss = constraint_loss(memory, c, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (weight - base).detach()


def authors_reference(memory: LayerMemory, target, context, steps: int = 2001, lr: float = 0.05) -> tuple[Tensor, float]:
    """The authors' insert: Adam on the whole weight with L1 on values, ΔW projected onto span(D) every 10 steps."""
    c, ctx = constraint(memory, target, context)
    directions = memory.directions(ctx.inputs, ctx.masks, ctx.rank)
    # Orthonormal basis of span(D) in key space: the projection keeps only ΔW's components along D.
    basis = torch.linalg.qr(directions.double().T).Q.to(directions)  # (C, r)
    base = memory.weight.detach()
    weight = base.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    key_axis = memory.adapter.key_axis % base.dim()

    def project() -> None:
        with torch.no_grad():
            delta = (weight - base).movedim(key_axis, -1)
            weight.copy_(base + (delta @ basis @ basis.T).movedim(-1, key_axis))

    for it in range(steps):
        loss = constraint_loss(memory, c, weight, l1=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 10 == 0 or it == steps - 1:
            project()
    with torch.no_grad():
        final = float(constraint_loss(memory, c, weight))
    return (weight - base).detach(), final


@contextlib.contextmanager
def weight_delta(memory: LayerMemory, delta: Tensor) -> Iterator[None]:
    """Temporarily add ``delta`` to the layer's weight (restored bitwise)."""
    param = memory.weight
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(delta)
    try:
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


def erase_in_passes(G: nn.Module, memory: LayerMemory, sampler, seg: Segmenter, pool_seeds: Sequence[int], n_ctx: int,
                    passes: int, make_delta: Callable[[Tensor, Tensor, list[int]], Tensor],
                    measure: Callable[[], Rendered]) -> list[Rendered]:
    """Erase as a user iterates: each pass draws its request from the pool images the model *now* marks (up to
    ``n_ctx``; after the first pass, however few remain), adds ``make_delta(z, masks, seeds)`` to the weight and
    measures. The weight is restored bitwise at the end."""
    results = []
    with contextlib.ExitStack() as passes_applied:
        for p in range(passes):
            try:
                now = render(G, sampler, seg, pool_seeds)
                z, masks, chosen = watermark_request(sampler, now, pool_seeds, n_ctx, minimum=None if p == 0 else 1)
            except RuntimeError as err:  # too few watermarks left to draw a request from
                print(f"pass {p + 1} skipped: {err}")
                break
            passes_applied.enter_context(weight_delta(memory, make_delta(z, masks, chosen)))
            results.append(measure())
    return results


# ---------------------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------------------


def with_edit(G, memory: LayerMemory, edit_fn: Callable[[], object], measure: Callable[[], Rendered]) -> tuple[Rendered, float]:
    """Apply the edit made by ``edit_fn`` through a Rewriter, measure, then revert. Returns (render, seconds)."""
    rw = Rewriter(G)
    start = time.perf_counter()
    edit = edit_fn()
    seconds = time.perf_counter() - start
    rw.apply(edit)
    try:
        return measure(), seconds
    finally:
        rw.revert()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spires")
    p.add_argument("--n", type=int, default=2000, help="metric seeds for the headline figures")
    p.add_argument("--sweep-n", type=int, default=500, help="metric seeds per sweep cell")
    p.add_argument("--stats-n", type=int, default=2000, help="samples for each layer's C")
    p.add_argument("--layers", default=",".join(f"synthesis.{b}" for b in ("b8.conv1", "b16.conv0", "b16.conv1",
                                                                           "b32.conv0", "b32.conv1")),
                   help="comma-separated layers of the layer x rank sweep")
    p.add_argument("--ranks", default="1,4,16")
    p.add_argument("--layer", default=None, help="headline layer (default: best of the sweep)")
    p.add_argument("--rank", type=int, default=None, help="headline rank (default: best of the sweep)")
    p.add_argument("--ctx", type=int, default=20, help="context images per request")
    p.add_argument("--units", type=int, default=60, help="erase: key units zeroed in the targets")
    p.add_argument("--passes", type=int, default=2,
                   help="headline erase (and its fine-tuning baseline): passes, each from the pool images still marked")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    G, sampler = load(args.model, args.device)
    seg = load_segmenter(args.device)
    layers = args.layers.split(",")
    ranks = [int(r) for r in args.ranks.split(",")]

    pool_seeds = list(range(REQUEST_SEEDS, REQUEST_SEEDS + POOL))
    pool = render(G, sampler, seg, pool_seeds)
    wm_z, wm_masks, wm_seeds = watermark_request(sampler, pool, pool_seeds, args.ctx)
    memories: dict[str, LayerMemory] = {}

    def memory(layer: str) -> LayerMemory:
        if layer not in memories:
            m = LayerMemory(G, layer)
            m.fit_moment(sampler, args.stats_n, cache_dir=args.cache_dir, batch_size=BATCH)
            memories[layer] = m
        return memories[layer]

    def erase_edit(m: LayerMemory, rank: int, z: Tensor = wm_z, masks: Tensor = wm_masks, seeds: list[int] = wm_seeds):
        return solve(m, Erase(z, masks, units=args.units, seeds=seeds), Context(z, masks, rank, seeds))

    def tree_edit(m: LayerMemory, rank: int):
        paste, ctx = spire_to_tree_request(sampler, pool, pool_seeds, args.ctx, rank)
        return solve(m, paste, ctx)

    # -- sweep: layer x rank on sweep seeds ---------------------------------------------------------------
    sweep_seeds = list(range(METRIC_SEEDS, METRIC_SEEDS + args.sweep_n))
    base_s = render(G, sampler, seg, sweep_seeds)
    wm_region_s = dilate(base_s.labels == WATERMARK, 2)
    spire_s = base_s.labels == SPIRE
    print(f"sweep on {args.sweep_n} seeds: watermark prevalence {prevalence(base_s, 'watermark'):.3f}")
    print(f"{'layer':24s} {'rank':>4s} | {'wm_after':>8s} {'wm_coll':>8s} | {'spire->tree':>11s} {'tree_coll':>9s} | solve_s")
    sweep = []
    for layer in layers:
        m = memory(layer)
        for rank in ranks:
            try:
                r_wm, s_wm = with_edit(G, m, lambda: erase_edit(m, rank), lambda: render(G, sampler, seg, sweep_seeds))
                r_tr, s_tr = with_edit(G, m, lambda: tree_edit(m, rank), lambda: render(G, sampler, seg, sweep_seeds))
            except ValueError as err:  # e.g. a rank above what the context offers at this layer
                print(f"{layer:24s} {rank:4d} | skipped: {err}")
                continue
            row = dict(
                layer=layer, rank=rank, wm_after=prevalence(r_wm, "watermark"),
                wm_coll=collateral(base_s, r_wm, wm_region_s),
                correct=float((r_tr.labels[spire_s] == TREE).float().mean()) if spire_s.any() else 0.0,
                tree_coll=collateral(base_s, r_tr, dilate(spire_s, 2)), seconds=(s_wm + s_tr) / 2,
            )
            sweep.append(row)
            print(f"{layer:24s} {rank:4d} | {row['wm_after']:8.3f} {row['wm_coll']:8.4f} | {row['correct']:11.3f} "
                  f"{row['tree_coll']:9.4f} | {row['seconds']:.2f}")
    best_wm = min(sweep, key=lambda r: (r["wm_after"] >= 0.02, r["wm_coll"] if r["wm_after"] < 0.02 else r["wm_after"]))
    best_tr = max(sweep, key=lambda r: r["correct"] - r["tree_coll"])
    print(f"best for watermark removal: {best_wm['layer']} rank {best_wm['rank']}; "
          f"best for spire->tree: {best_tr['layer']} rank {best_tr['rank']}")

    # -- headline figures on --n seeds ---------------------------------------------------------------------
    seeds = list(range(METRIC_SEEDS, METRIC_SEEDS + args.n))
    base = render(G, sampler, seg, seeds)
    wm_region = dilate(base.labels == WATERMARK, 2)
    spire = base.labels == SPIRE
    measure = lambda: render(G, sampler, seg, seeds)  # noqa: E731

    layer_wm, rank_wm = args.layer or best_wm["layer"], args.rank or best_wm["rank"]
    m = memory(layer_wm)
    print(f"\nremove watermarks at {layer_wm}, rank {rank_wm}, {args.n} seeds")
    rows = [("unchanged", base)]

    def ours(z: Tensor, masks: Tensor, chosen: list[int]) -> Tensor:
        edit = erase_edit(m, rank_wm, z, masks, chosen)
        return m.delta(edit.lam, edit.directions)

    def tuned(z: Tensor, masks: Tensor, chosen: list[int]) -> Tensor:
        return fine_tune(m, Erase(z, masks, units=args.units), Context(z, masks, rank_wm))

    for name, make_delta in ((f"rewrite erase (rank {rank_wm})", ours), ("fine-tune whole layer", tuned)):
        passes = erase_in_passes(G, m, sampler, seg, pool_seeds, args.ctx, args.passes, make_delta, measure)
        rows += [(f"{name}, pass {p + 1}" if args.passes > 1 else name, r) for p, r in enumerate(passes)]
        if make_delta is ours:
            erase_name = rows[-1][0]  # the summary reports our last pass
    for k in (30, 60):
        units = dissection_units(m, sampler, pool_seeds, pool, k)
        with m.ablate(units):
            rows.append((f"ablate top {k} units", measure()))
    print(f"{'method':36s} {'prevalence':>10s} {'collateral':>10s} {'coll_no_wm':>10s}")
    no_wm = ~present(base.labels, "watermark")
    figures = {}
    for name, rr in rows:
        coll = collateral(base, rr, wm_region)
        coll_clean = float((rr.images - base.images)[no_wm].abs().mean() / 2)
        figures[name] = (prevalence(rr, "watermark"), coll)
        print(f"{name:36s} {figures[name][0]:10.3f} {coll:10.4f} {coll_clean:10.4f}")

    layer_tr, rank_tr = args.layer or best_tr["layer"], args.rank or best_tr["rank"]
    m = memory(layer_tr)
    print(f"\nspire -> tree at {layer_tr}, rank {rank_tr}, {args.n} seeds ({int(spire.sum())} base spire pixels)")
    paste, ctx = spire_to_tree_request(sampler, pool, pool_seeds, args.ctx, rank_tr)
    r_tree, _ = with_edit(G, m, lambda: solve(m, paste, ctx), measure)
    with weight_delta(m, fine_tune(m, paste, ctx)):
        r_ft = measure()
    correct = {n: float((rr.labels[spire] == TREE).float().mean()) for n, rr in (("rewrite", r_tree), ("fine-tune", r_ft))}
    tree_coll = {n: collateral(base, rr, dilate(spire, 2)) for n, rr in (("rewrite", r_tree), ("fine-tune", r_ft))}
    for n in correct:
        print(f"{n:12s} correct modification {correct[n]:.3f}  collateral {tree_coll[n]:.4f}")

    # -- speed against the authors' procedure, same request ------------------------------------------------
    target, ctx = Erase(wm_z, wm_masks, units=args.units), Context(wm_z, wm_masks, rank_wm)
    m = memory(layer_wm)
    t0 = time.perf_counter()
    ours = solve(m, target, ctx)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ref_loss = authors_reference(m, target, ctx)
    t_ref = time.perf_counter() - t0
    print(f"\nspeed: ours {t_ours:.2f} s (loss {ours.loss_after:.5f}, solver {ours.solver}); "
          f"authors' 2001-step projected Adam {t_ref:.1f} s (loss {ref_loss:.5f}); speedup {t_ref / t_ours:.1f}x")

    print(
        f"eval_edits: watermark_before={figures['unchanged'][0]:.3f} watermark_after={figures[erase_name][0]:.3f} "
        f"ablation60_after={figures['ablate top 60 units'][0]:.3f} rewrite_collateral={figures[erase_name][1]:.4f} "
        f"ablation60_collateral={figures['ablate top 60 units'][1]:.4f} spire_to_tree={correct['rewrite']:.3f} "
        f"finetune_spire_to_tree={correct['fine-tune']:.3f} speedup_vs_reference={t_ref / t_ours:.1f}"
    )


if __name__ == "__main__":
    main()
