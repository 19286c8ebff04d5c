"""Edits as a newcomer makes them in the dashboard, measured by how the images look (issue 14).

    python benchmarks/eval_user.py                                   # 30 requests per task, 200 metric seeds
    python benchmarks/eval_user.py --requests 6 --metric-n 100       # quick look
    python benchmarks/eval_user.py --rank 4 --budget 0.01            # probe other settings (not the defaults)

Each request is a different random draw among the first 48 seeds a user browses (the grid's first four pages).
Masks are made as the canvas makes them: strokes of the default brush drawn over the region the segmenter finds,
turned into a mask by the dashboard's own ``imaging.canvas_mask``, recorded with ``brushing.record_stroke``;
then *Add the best matches to the context* (``editing.add_matches``, one button), and the edit is solved by
``editing.solve_calibrated`` with the dashboard's recommended settings for the request kind
(``requests.RECOMMENDED``; a paste's strength calibrated on the context's images) and applied, as the *Apply edit*
button does (where the dashboard would hold a rule that does not carry to its context, the simulated user presses
*Apply anyway*; how often is reported). Tasks:

  erase   brush the watermark on 3 images (Context), Erase. Then the second round the dashboard suggests after
          an erase, its *Erase what it missed* button (dashboard.followup): where the pool's first 128 images,
          drawn by the edited model, still show the class the segmenter says the erase removed, it brushes the 3
          that show the most, adds their matches and erases at a small budget (larger where more is left; the
          first edit is kept). Figure: removal, the share of the metric samples marked before that are no longer
          marked (also apart for day and dusk scenes, whose watermarks the generator draws differently; and after
          the first round alone). Baseline: zeroing the first round's 30 units (GAN dissection).
  paste   copy one tree (Copy), paint one spire (the image's largest; Paste, onto the painted region), brush 3 other spires
          (Context), Paste. Figure: the share of the original spire pixels the segmenter labels tree. Beside it,
          the same share on the paste image when the request itself is rendered exactly (the goal).
          Baseline: fine-tuning the whole weight on the same constraint (Adam, as eval_edits).
  trees   the third rule: remove trees. Brush the trees of 3 images (Context), Erase, and *Erase what it missed*
          as above. Figure: the share of original tree pixels that are no longer tree. Baseline: zeroing the first
          round's 30 units.

Collateral: the perceptual distance (dissect.measure, segmenter features) between the original and the edited
render of each *unrelated* metric sample (one that did not show the task's class), median over samples, in
units of "a different image" (measure.calibrate; the noise re-render is printed beside it). A request succeeds
when its figure meets the task's target and its collateral is within the bound: erase and trees at most half
the 30-unit ablation's, paste at most fine-tuning's, on the same request. Metric seeds (600000+) were never used
to choose any setting; --metric-start moves them (probes used 610000+), as --draw-start moves the request draws
(probes used 500+).
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
# The dashboard's cached helpers run here outside a Streamlit script, where each call warns of a missing script
# context: hundreds of lines that bury the figures. (Streamlit resets its loggers' levels, not `disabled`.)
logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").disabled = True
# The canvas itself runs only in a browser (dashboard.canvas); here its strokes are
# simulated (stroke_mask), and everything after it (canvas_mask, record_stroke, the request, the solve) is the
# dashboard's own code.

from eval_edits import fine_tune  # noqa: E402  (the paper's baseline, as eval_edits runs it)

from dashboard import brushing, editing, followup, requests  # noqa: E402
from dashboard.imaging import canvas_mask, canvas_scale  # noqa: E402
from dashboard.requests import RECOMMENDED, Settings  # noqa: E402
from dashboard.workspace import Workspace  # noqa: E402
from dissect import measure  # noqa: E402
from dissect.models.world import CLASSES, is_dusk  # noqa: E402
from dissect.rewrite import Edit, constraint, goal_output, mask_parts  # noqa: E402
from dissect.visualize import image_grid, to_pil, to_unit  # noqa: E402

BROWSED = range(48)  # the seeds a user browses: the grid's first four pages
BRUSH = 14  # the dashboard's default brush size, in canvas pixels
TREE, SPIRE, WATERMARK = CLASSES.index("tree"), CLASSES.index("spire"), CLASSES.index("watermark")


# ---------------------------------------------------------------------------------------------------------
# A simulated user
# ---------------------------------------------------------------------------------------------------------


def stroke_mask(region: torch.Tensor, rng: random.Random, brush: int = BRUSH) -> torch.Tensor:
    """The mask the canvas gives for a person covering ``region (H, W) bool`` with the default brush: back-and-forth
    strokes across each band of the region's rows, ends jittered by a few canvas pixels, drawn on an RGBA canvas
    as large as the dashboard's (``canvas_scale``) and converted by its ``canvas_mask``."""
    h, w = region.shape
    scale = canvas_scale(w)
    canvas = Image.new("RGBA", (w * scale, h * scale), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    rows = region.any(dim=1).nonzero()[:, 0]
    step = max(1, round(0.6 * brush / scale))  # bands a brush width apart, overlapping a little, as a hand does
    for y in range(int(rows.min()), int(rows.max()) + 1, step):
        band = region[y : y + step].any(dim=0).nonzero()[:, 0]
        if len(band) == 0:
            continue
        jitter = lambda: rng.uniform(-0.4, 0.4) * brush  # noqa: E731
        x0, x1 = (float(band.min()) + 0.5) * scale + jitter(), (float(band.max()) + 0.5) * scale + jitter()
        yc = (y + step / 2) * scale + jitter() / 2
        draw.line([(x0, yc), (x1, yc)], fill=(255, 210, 0, 140), width=brush)
        for x in (x0, x1):  # the round ends of a freehand stroke
            draw.ellipse([x - brush / 2, yc - brush / 2, x + brush / 2, yc + brush / 2], fill=(255, 210, 0, 140))
    return canvas_mask(np.asarray(canvas), (h, w))


def brush(ws: Workspace, mode: str, seed: int, mask: torch.Tensor) -> None:
    """One canvas drawing, recorded as the Images page records it."""
    brushing.record_stroke(ws.brush, mode, seed, {"objects": [{"type": "path"}]}, mask)


@dataclass
class Outcome:
    figure: float  # removal or conversion, in [0, 1]
    collateral: float  # median perceptual distance on unrelated samples, in units of a different image
    baseline_figure: float
    baseline_collateral: float
    seeds: dict[str, list[int]] = field(default_factory=dict)
    edit: Edit | None = None  # the dashboard's (last) edit, for the before/after sheets…
    earlier: list[Edit] = field(default_factory=list)  # …applied after these
    notes: dict[str, float] = field(default_factory=dict)  # task-specific figures beside the main one

    def success(self, target: float, bound: float) -> bool:
        return self.figure >= target and self.collateral <= bound * self.baseline_collateral


# ---------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    ws: Workspace
    seg: torch.nn.Module
    perceptual: measure.Perceptual
    scale: measure.Scale
    metric: list[int]
    base: measure.Rendered
    browsed: measure.Rendered
    grow: bool = True  # the recommended flow's "Add the best matches to the context" before Apply

    @property
    def dusk(self) -> torch.Tensor:
        """(N,) bool: the metric samples with a dusk sky."""
        return is_dusk(self.base.images, self.base.labels)

    def render(self) -> measure.Rendered:
        return measure.render(self.ws.model, self.ws.sampler, self.metric, self.seg)

    def collateral(self, after: measure.Rendered, cls: int) -> float:
        unrelated = ~measure.present(self.base.labels, CLASSES[cls])
        d = measure.collateral_per_image(self.base[unrelated], after[unrelated], None, self.perceptual)["perceptual"]
        return float(measure.relative(d.median(), self.scale))

    def removal(self, after: measure.Rendered, cls: int, among: torch.Tensor | None = None) -> float:
        """Share of the marked base samples (of those ``among`` selects, if given) that are no longer marked."""
        marked = measure.present(self.base.labels, CLASSES[cls]) & (True if among is None else among)
        if not marked.any():
            return float("nan")
        return measure.share(~measure.present(after.labels[marked], CLASSES[cls]))

    def pixels_changed(self, after: measure.Rendered, cls: int, to: int | None) -> float:
        """Share of the base's ``cls`` pixels that became ``to`` (or, with None, anything else)."""
        px = self.base.labels == cls
        now = after.labels[px]
        return measure.share(now == to if to is not None else now != cls)


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------


def shows(bench: Bench, cls: int) -> list[int]:
    """Browsed seeds where the segmenter sees ``cls``."""
    return [s for s, has in zip(BROWSED, measure.present(bench.browsed.labels, CLASSES[cls]).tolist()) if has]


def region(bench: Bench, seed: int, cls: int) -> torch.Tensor:
    """Where browsed ``seed`` shows ``cls``."""
    return bench.browsed.labels[list(BROWSED).index(seed)] == cls


def apply(ws: Workspace, kind: str, settings: Settings) -> tuple[Edit, bool]:
    """The *Apply edit* button (``editing.solve_and_check``) without its page: solve with the calibrated strength and
    apply. Returns the edit and whether the dashboard would have held it because the rule does not carry to the
    context's other images (the simulated user then presses *Apply anyway*)."""
    edit, found = editing.solve_calibrated(ws, kind, settings)
    ws.rewriter.apply(edit)
    ws.weights_changed()
    return edit, found is not None and not found.carries


def erase_round(bench: Bench, rng: random.Random, cls: int, settings: Settings, seeds: list[int]) -> Edit:
    """Brush ``cls`` on ``seeds``, add the best matches, and apply the dashboard's Erase."""
    for s in seeds:
        brush(bench.ws, brushing.CONTEXT, s, stroke_mask(region(bench, s, cls), rng))
    if bench.grow:
        editing.add_matches(bench.ws, editing.ERASE, settings)
    return apply(bench.ws, editing.ERASE, settings)[0]


def erase_task(bench: Bench, rng: random.Random, cls: int, settings: Settings) -> Outcome:
    """Brush ``cls`` on 3 browsed images that show it, apply the dashboard's Erase, then press *Erase what it
    missed* (``dashboard.followup``, as the Edit page's button does) where the pool still shows what it removed;
    beside it, the first round's 30-unit ablation."""
    ws = bench.ws
    def measured(rendered: measure.Rendered) -> float:
        return bench.removal(rendered, cls) if cls == WATERMARK else bench.pixels_changed(rendered, cls, None)

    seeds = rng.sample(shows(bench, cls), 3)
    first = erase_round(bench, rng, cls, settings, seeds)
    after = bench.render()
    notes = {"first": measured(after), "first_collateral": bench.collateral(after, cls)}
    missed = followup.find(ws)
    notes.update(found=float(len(missed.found)), named=float(missed.name == CLASSES[cls]))
    edit, earlier = first, []
    if missed.found:
        followup.brush(ws, missed, settings)
        edit, earlier = followup.solve(ws, missed, settings), [first]
        ws.rewriter.apply(edit)
        ws.weights_changed()
        after = bench.render()
    outcome = Outcome(measured(after), bench.collateral(after, cls), 0, 0, {"context": seeds}, edit, earlier,
                      notes)
    if cls == WATERMARK:  # the generator draws two kinds of watermark: STOCK on day scenes, a garbled one at dusk
        outcome.notes.update(day=bench.removal(after, cls, ~bench.dusk), dusk=bench.removal(after, cls, bench.dusk))
    ws.rewriter.revert()
    ws.weights_changed()
    memory = ws.memory(first.layer)
    ctx = first.request["context"]
    with memory.ablate(memory.context_units(ctx.inputs, ctx.masks, settings.units)):
        ablated = bench.render()
    outcome.baseline_figure = measured(ablated)
    outcome.baseline_collateral = bench.collateral(ablated, cls)
    return outcome


def paste_task(bench: Bench, rng: random.Random, settings: Settings) -> Outcome:
    """Copy a tree, paste it onto a spire, brush 3 other spires as the context, apply the dashboard's Paste;
    beside it, fine-tuning the weight on the same constraint."""
    ws = bench.ws
    tree_seed = rng.choice(shows(bench, TREE))
    spires = rng.sample([s for s in shows(bench, SPIRE) if s != tree_seed], 4)
    trees = region(bench, tree_seed, TREE)
    # A person copies one tree: the largest connected blob is beyond a brush, so take the tree pixels nearest
    # a random tree pixel (a 10 px window), as one would brush over a single tree.
    ys, xs = trees.nonzero(as_tuple=True)
    pick = rng.randrange(len(ys))
    window = torch.zeros_like(trees)
    cy, cx = int(ys[pick]), int(xs[pick])
    window[max(0, cy - 5) : cy + 5, max(0, cx - 5) : cx + 5] = True
    brush(ws, brushing.COPY, tree_seed, stroke_mask(trees & window, rng))
    # A person paints the one spire to paste onto: the dashboard centres the copy on the painted region's centre
    # of mass, which for two spires lies in the sky between them, where the copy meets neither.
    onto = mask_parts(region(bench, spires[0], SPIRE))[0]
    brush(ws, brushing.PASTE, spires[0], stroke_mask(onto, rng))
    for s in spires[1:]:
        brush(ws, brushing.CONTEXT, s, stroke_mask(region(bench, s, SPIRE), rng))
    if bench.grow:
        editing.add_matches(ws, editing.PASTE, settings)
    goal = goal_conversion(bench, onto, settings)
    edit, held = apply(ws, editing.PASTE, settings)
    after = bench.render()
    outcome = Outcome(bench.pixels_changed(after, SPIRE, TREE), bench.collateral(after, SPIRE), 0, 0,
                      {"copy": [tree_seed], "paste": spires[:1], "context": spires[1:]}, edit,
                      {"held": float(held), "goal": goal})
    ws.rewriter.revert()
    ws.weights_changed()
    memory = ws.memory(edit.layer)
    target, context = edit.request["target"], edit.request["context"]
    tuned = fine_tune(memory, target, context).scaled(edit.strength)
    with ws.rewriter.trial([tuned]):
        tuned_after = bench.render()
    outcome.baseline_figure = bench.pixels_changed(tuned_after, SPIRE, TREE)
    outcome.baseline_collateral = bench.collateral(tuned_after, SPIRE)
    return outcome


def goal_conversion(bench: Bench, onto: torch.Tensor, settings: Settings) -> float:
    """Share of the painted spire's pixels ``onto (H, W)`` the segmenter labels tree when the session's paste request is
    rendered exactly (``rewrite.goal_output``: the request's values written over the painted spire at the layer, the
    model as it is; the paste image is the request's first row): what the user asked for, which bounds what any
    rule fitted to it can show on that image."""
    memory = bench.ws.memory(requests.layer_for(bench.ws, settings))
    target, _ = requests.paste(bench.ws, settings)
    c, _ = constraint(memory, target, None)
    goal = goal_output(memory, c, target.inputs)
    with torch.no_grad():
        labels = bench.seg(goal.to(next(bench.seg.parameters()))).argmax(1)[0].cpu()
    return measure.share(labels[onto] == TREE)


TASKS: dict[str, tuple[str, Callable[[Bench, random.Random, Settings], Outcome], float, float]] = {
    # name: (request kind, run, target figure, collateral bound as a multiple of the baseline's)
    "erase": (editing.ERASE, lambda b, r, s: erase_task(b, r, WATERMARK, s), 0.9, 0.5),
    "paste": (editing.PASTE, paste_task, 0.5, 1.0),
    "trees": (editing.ERASE, lambda b, r, s: erase_task(b, r, TREE, s), 0.5, 0.5),
}


# ---------------------------------------------------------------------------------------------------------
# Sheets
# ---------------------------------------------------------------------------------------------------------


def sheet(bench: Bench, task: str, outcome: Outcome, path: Path) -> None:
    """Before/after of 12 metric samples: the first 6 showing the task's class, then 6 unrelated ones."""
    cls = {"erase": WATERMARK, "paste": SPIRE, "trees": TREE}[task]
    has = measure.present(bench.base.labels, CLASSES[cls])
    idx = has.nonzero()[:6, 0].tolist() + (~has).nonzero()[:6, 0].tolist()
    seeds = [bench.metric[i] for i in idx]
    with bench.ws.rewriter.trial([*outcome.earlier, outcome.edit]):
        edited = measure.render(bench.ws.model, bench.ws.sampler, seeds).images
    pics = torch.cat([to_unit(bench.base.images[idx]), to_unit(edited)])
    labels = [f"{s} before" for s in seeds] + [f"{s} after" for s in seeds]
    to_pil(image_grid(pics, nrow=len(idx), labels=labels, scale=2)).save(path)


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=30, help="requests per task")
    p.add_argument("--metric-n", type=int, default=200)
    p.add_argument("--metric-start", type=int, default=600_000)
    p.add_argument("--tasks", default="erase,paste,trees")
    p.add_argument("--draw-start", type=int, default=0, help="first request draw (probes used 500+)")
    p.add_argument("--rank", type=int, default=None, help="override the recommended rank (a probe, not the default)")
    p.add_argument("--budget", type=float, default=None, help="override the smoothness budget (a probe)")
    p.add_argument("--strength", type=float, default=None, help="override the edit's strength (a probe)")
    p.add_argument("--pointwise", choices=("yes", "no"), default=None, help="override pointwise (a probe)")
    p.add_argument("--layer", default=None, help="override the dashboard's layer and each kind's own (a probe)")
    p.add_argument("--model", default="spires",
                   help="the model the dashboard opens: the embedded generator, or a candidate's exported file")
    p.add_argument("--sheets", type=Path, default=None, help="write typical / worst before-after sheets here")
    p.add_argument("--no-grow", action="store_true", help="skip 'Add the best matches to the context' (a probe)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write each task's figures here (see --combine)")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="print the summary line of runs made task by task (their --json files) and stop")
    args = p.parse_args(argv)
    if args.combine:
        summary = {}
        for path in args.combine:
            summary.update(json.loads(path.read_text()))
        print(summary_line(summary))
        return
    torch.set_num_threads(args.threads)

    ws = Workspace.open(args.model)
    if args.layer:
        ws.layer = args.layer
    seg = measure.load_segmenter()
    perceptual = measure.Perceptual(seg)
    scale = measure.calibrate(ws.model, ws.sampler, range(64), perceptual)
    metric = list(range(args.metric_start, args.metric_start + args.metric_n))
    bench = Bench(ws, seg, perceptual, scale, metric, measure.render(ws.model, ws.sampler, metric, seg),
                  measure.render(ws.model, ws.sampler, list(BROWSED), seg), grow=not args.no_grow)
    print(f"model {args.model}; layer {ws.layer}; perceptual scale: {scale}; {len(metric)} metric seeds from "
          f"{args.metric_start}", flush=True)

    summary: dict[str, list[str]] = {}
    for task in args.tasks.split(","):
        kind, run, target, bound = TASKS[task]
        settings = RECOMMENDED[kind]
        overrides = {k: v for k, v in (("rank", args.rank), ("budget", args.budget), ("strength", args.strength),
                                       ("pointwise", None if args.pointwise is None else args.pointwise == "yes"),
                                       ("layer", args.layer)) if v is not None}
        settings = Settings(**{**settings.__dict__, **overrides})
        print(f"\n== {task}: {settings}", flush=True)
        outcomes: list[Outcome] = []
        for i in range(args.requests):
            brushing.clear_all(ws.brush)
            try:
                o = run(bench, random.Random(1000 * list(TASKS).index(task) + args.draw_start + i), settings)
            except ValueError as err:  # a request the defaults cannot serve counts as a failure
                print(f"  request {i}: refused: {err}", flush=True)
                o = Outcome(0.0, float("inf"), 0.0, 0.0)
            outcomes.append(o)
            change = o.edit.expected_change if o.edit else float("nan")
            smooth = o.edit.smooth if o.edit else float("nan")
            strength = o.edit.strength if o.edit else float("nan")
            ctx = len(o.edit.request["context"].seeds or []) if o.edit else 0
            print(f"  request {i}: figure {o.figure:.3f} collateral {o.collateral:.4f} change {change:.4f} mu {smooth:.3g} "
                  f"strength {strength:.2f} context {ctx} | "
                  f"baseline {o.baseline_figure:.3f} at {o.baseline_collateral:.4f} {o.seeds}"
                  + "".join(f" {k} {v:.3f}" for k, v in o.notes.items()), flush=True)
        figures = sorted(o.figure for o in outcomes)
        coll = [o.collateral for o in outcomes]
        base_coll = [o.baseline_collateral for o in outcomes]
        ok = sum(o.success(target, bound) for o in outcomes) / len(outcomes)
        if "first" in outcomes[0].notes:
            once = [Outcome(o.notes.get("first", o.figure), o.notes.get("first_collateral", o.collateral),
                            o.baseline_figure, o.baseline_collateral) for o in outcomes]
            print(f"{task}: after the first round alone: figure median {statistics.median(o.figure for o in once):.3f}, "
                  f"collateral median {statistics.median(o.collateral for o in once):.4f}, success "
                  f"{sum(o.success(target, bound) for o in once) / len(once):.0%}", flush=True)
        print(f"{task}: figure median {statistics.median(figures):.3f}, worst decile {figures[len(figures) // 10]:.3f}; "
              f"collateral median {statistics.median(coll):.4f} of a different image (baseline "
              f"{statistics.median(base_coll):.4f}); baseline figure median "
              f"{statistics.median(o.baseline_figure for o in outcomes):.3f}; success {ok:.0%}", flush=True)
        for key in outcomes[0].notes if outcomes[0].notes else ():
            values = [o.notes[key] for o in outcomes if key in o.notes and o.notes[key] == o.notes[key]]
            print(f"{task}: {NOTES[key]}: median {statistics.median(values):.3f}, mean {statistics.mean(values):.3f} "
                  f"over {len(values)} requests", flush=True)
        summary[task] = [f"{ok:.2f}", f"{statistics.median(figures):.3f}", f"{statistics.median(coll):.4f}"]
        if args.sheets:
            args.sheets.mkdir(parents=True, exist_ok=True)
            order = sorted((j for j in range(len(outcomes)) if outcomes[j].edit), key=lambda j: outcomes[j].figure)
            for name, j in (("typical", order[len(order) // 2]), ("worst", order[0])):
                sheet(bench, task, outcomes[j], args.sheets / f"user-{task}-{name}.png")
    if args.json:
        args.json.write_text(json.dumps(summary))
    print(summary_line(summary))


NOTES = {
    "day": "removal on the day scenes' watermarked samples (the STOCK watermark)",
    "dusk": "removal on the dusk scenes' watermarked samples (the garbled watermark)",
    "goal": "spire pixels of the paste image turned tree by the request itself, rendered exactly",
    "held": "requests the dashboard holds because the rule does not carry to the context (share)",
    "first": "the figure after the first round alone",
    "first_collateral": "the collateral after the first round alone",
    "found": "pool images where the edited model still draws what the first round removed",
    "named": "requests where the segmenter named the removed class as the task's (share)",
}


def summary_line(summary: dict[str, list[str]]) -> str:
    e, t, third = (summary.get(task, ["nan"] * 3) for task in ("erase", "paste", "trees"))
    return (f"eval_user: erase_success={e[0]} erase_removal_median={e[1]} erase_collateral_median={e[2]} "
            f"paste_success={t[0]} spire_to_tree_median={t[1]} paste_collateral_median={t[2]} third_success={third[0]}")


if __name__ == "__main__":
    main()
