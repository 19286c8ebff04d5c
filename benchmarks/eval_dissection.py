"""Layer dissection of the embedded generator, its causal tests, and two image models as references.

    python benchmarks/eval_dissection.py                     # 2000 samples for the generator's dissection
    python benchmarks/eval_dissection.py --n 200 --measure-n 100 --world-n 100   # quick

generator   every synthesis conv layer (conv0 / conv1 of each block; torgb's three RGB channels left out) dissected
            over seeds 0 .. n-1 in one run (two passes over the data shared by all layers), classes from the
            segmenter on the generated images; per layer the units per class at IoU >= 0.04 (GAN Dissection's figure).
ablation    zero the top k tree units of a layer everywhere; the best layer is the one where that removes trees from
            the most images on --select-n selection seeds. There, against k random units of the same layer (seeded),
            on other fresh seeds: the share of the images showing trees (the segmenter's presence rule) that no
            longer do.
insertion   the same units set to their 0.999 quantile inside a box on the ground (GANPaint), on the same fresh seeds:
            the share of the box's pixels, not tree before, that the segmenter labels tree after; beside k random units.
image models  the segmenter dissected as an image model on world images with the world's exact labels (Network
            Dissection proper), and a torchvision resnet18 with random weights as the negative control.
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torchvision

from dissect.dissection import (
    IOU_LEVEL,
    Dissection,
    GeneratedSamples,
    WorldSamples,
    dissect,
    measure_ablation,
    measure_insertion,
)
from dissect.models import load
from dissect.models.segmenter import load_segmenter

GENERATOR_LAYERS = [f"synthesis.b{r}.conv{i}" for r in (4, 8, 16, 32, 64) for i in (0, 1) if (r, i) != (4, 0)]
SEGMENTER_LAYERS = ["down.0", "down.1", "down.2", "down.3", "up.0", "up.1", "up.2"]  # block outputs, after ReLU
RESNET_LAYERS = ["relu", "layer1", "layer2", "layer3", "layer4"]
METRIC_SEEDS = 600_000  # fresh seeds for the causal tests (dissection uses 0 .. n-1)…
SELECTION_SEEDS = 650_000  # …and others to choose the layer they run at
WORLD_SEEDS = 700_000
INSERT_BOX = (36, 8, 60, 28)  # y0, x0, y1, x1 of a 64x64 image: ground at the left, where trees stand


def print_layers(title: str, result: Dissection) -> None:
    print(f"\n{title}: {result.samples} samples, {result.units} units, {result.forward_passes} passes, "
          f"{result.seconds:.1f} s; interpretable (IoU >= {IOU_LEVEL}) {result.interpretable_share():.1%}")
    print(f"{'layer':22s} {'grid':>6s} {'units':>5s} {'interp.':>7s}  units per class at IoU >= {IOU_LEVEL}")
    for layer, d in result.layers.items():
        per_class = ", ".join(f"{c} {n}" for c, n in sorted(d.units_per_class().items(), key=lambda kv: -kv[1]))
        print(f"{layer:22s} {d.grid[0]:>3d}x{d.grid[1]:<2d} {d.units:5d} {d.interpretable_share():7.1%}  {per_class}")


def ground_box() -> torch.Tensor:
    region = torch.zeros(64, 64)
    y0, x0, y1, x1 = INSERT_BOX
    region[y0:y1, x0:x1] = 1
    return region


def best_layer(G, sampler, seg, result: Dissection, name: str, k: int, n: int, batch_size: int) -> str:
    """The layer where ablating the top ``k`` units of class ``name`` removes it from the most images, on ``n``
    selection seeds (disjoint from the seeds the figures are measured on). Candidates hold at least 4k units, so
    the ablation stays a small share of the layer (GAN Dissection zeroes 20 of 512); the others are printed, with
    what inserting the same units in the ground box draws, for reference."""
    selection = GeneratedSamples(sampler, range(SELECTION_SEEDS, SELECTION_SEEDS + n))
    removed = {}
    print(f"\nthe top {k} {name} units, per layer, on {n} selection seeds: ablated, then inserted in {INSERT_BOX}")
    for layer, d in result.layers.items():
        if d.units >= k:
            units = d.top(name, k)
            effect = measure_ablation(G, layer, units, selection, seg, name, batch_size=batch_size)
            drawn = measure_insertion(G, layer, units, d.high[units], ground_box(), selection, seg, name,
                                      batch_size=batch_size)
            if d.units >= 4 * k:
                removed[layer] = effect.removed
            print(f"  {layer:22s} {name} units at IoU >= {IOU_LEVEL}: {d.units_per_class().get(name, 0):3d}; "
                  f"removed from {effect.removed:.1%} of the images showing it; insertion draws {drawn.drawn:.1%} "
                  f"of the box ({drawn.outside:.2%} outside)"
                  + ("" if d.units >= 4 * k else f" ({k} of {d.units} units: not a candidate)"))
    return max(removed, key=removed.get)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="spires")
    p.add_argument("--n", type=int, default=2000, help="generator samples dissected (seeds 0 .. n-1)")
    p.add_argument("--measure-n", type=int, default=500, help="fresh seeds for ablation and insertion")
    p.add_argument("--select-n", type=int, default=100, help="seeds on which the best tree layer is chosen")
    p.add_argument("--world-n", type=int, default=500, help="world images for the image models")
    p.add_argument("--k", type=int, default=20, help="units ablated / inserted")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dissect-only", action="store_true", help="time the generator's dissection alone; skip the rest")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    G, sampler = load(args.model)
    seg = load_segmenter()

    began, cpu = time.perf_counter(), time.process_time()
    result = dissect(G, GENERATOR_LAYERS, GeneratedSamples(sampler, range(args.n)), segmenter=seg,
                     batch_size=args.batch_size)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    print_layers("generator (classes: segmenter on its images)", result)
    print(f"dissecting {len(result.layers)} layers took {seconds:.1f} s wall, {cpu:.1f} s of CPU, on {args.threads} "
          f"thread(s) ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)")

    if args.dissect_only:
        print(f"eval_dissection: layers={len(result.layers)} units={result.units} "
              f"interpretable_share={result.interpretable_share():.3f} forward_passes={result.forward_passes} "
              f"seconds={seconds:.1f} cpu_seconds={cpu:.1f}")
        return
    layer = best_layer(G, sampler, seg, result, "tree", args.k, args.select_n, args.batch_size)
    d = result[layer]
    tree_units = d.top("tree", args.k)
    random_units = torch.randperm(d.units, generator=torch.Generator().manual_seed(0))[: args.k]
    ious = d.iou[tree_units, d.class_index("tree")]
    print(f"\nbest tree layer {layer}: top {args.k} tree units {tree_units.tolist()} (IoU {float(ious.min()):.3f}.."
          f"{float(ious.max()):.3f}); measured on {args.measure_n} fresh seeds")
    fresh = GeneratedSamples(sampler, range(METRIC_SEEDS, METRIC_SEEDS + args.measure_n))
    region = ground_box()
    effects = {}
    for name, units in (("tree", tree_units), ("random", random_units)):
        ablation = measure_ablation(G, layer, units, fresh, seg, "tree", batch_size=args.batch_size)
        insertion = measure_insertion(G, layer, units, d.high[units], region, fresh, seg, "tree",
                                      batch_size=args.batch_size)
        effects[name] = (ablation, insertion)
        print(f"{name:6s} units: ablation: images with trees {ablation.before:.1%} -> {ablation.after:.1%}, "
              f"removed from {ablation.removed:.1%}; insertion in box {INSERT_BOX}: {insertion.drawn:.1%} of the box "
              f"drawn as tree ({insertion.before:.1%} tree before), {insertion.outside:.2%} outside")

    torch.manual_seed(0)  # the random resnet's weights
    controls = {}
    for title, model, layers in (
        ("segmenter as an image model (world labels)", seg, SEGMENTER_LAYERS),
        ("resnet18, random weights (negative control)", torchvision.models.resnet18(weights=None).eval(), RESNET_LAYERS),
    ):
        controls[title] = dissect(model, layers, WorldSamples(range(WORLD_SEEDS, WORLD_SEEDS + args.world_n)),
                                  batch_size=args.batch_size)
        print_layers(title, controls[title])

    print(
        f"eval_dissection: layers={len(result.layers)} units={result.units} "
        f"interpretable_share={result.interpretable_share():.3f} tree_ablation_removed={effects['tree'][0].removed:.3f} "
        f"random_ablation_removed={effects['random'][0].removed:.3f} tree_insertion_drawn={effects['tree'][1].drawn:.3f} "
        f"forward_passes={result.forward_passes} seconds={seconds:.1f}"
    )


if __name__ == "__main__":
    main()
