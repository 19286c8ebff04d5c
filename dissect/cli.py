"""The ``dissect`` console script: a model's editable layers, key statistics, key clusters, applying and exporting
edits, and measuring an edit with the segmenter.

Every command loads its model with :func:`dissect.models.loaders.load`: ``--model spires`` (the embedded generator)
or an entry point ``package.module:function`` returning ``(model, sampler)``. Statistics and requests use seeds
``0 .. n-1``; ``eval`` measures on fresh seeds from ``--seed-start``. Errors a user can fix (an unknown model or
layer, a missing or foreign file, a bad request) print one line on stderr and exit with status 2; ``--traceback``
shows the whole trace instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from torch import Tensor, nn
from tqdm.auto import tqdm

from dissect import measure, rewrite
from dissect.appearance import Appearance, paste_by_appearance
from dissect.errors import DissectError, RequestError
from dissect.hooks import call_model, layers, to_device
from dissect.memory import LayerMemory
from dissect.models.loaders import load
from dissect.models.segmenter import WEIGHTS as SEGMENTER_WEIGHTS
from dissect.models.segmenter import Segmenter, load_segmenter
from dissect.models.world import CLASSES
from dissect.stats import DEFAULT_CACHE_DIR
from dissect.visualize import cluster_overlay, image_grid, side_by_side, to_pil

__all__ = ["main", "build_parser", "CliError"]

FRESH_SEEDS = 1_000_000  # eval's default first seed: far from the seeds 0 .. n-1 statistics and requests use


class CliError(DissectError):
    """A problem with the command line or its files that the user can fix; reported as one line."""


# What a user can fix: the library's errors (CliError among them) and files that cannot be read or written.
# Anything else is a bug and keeps its traceback.
_USER_ERRORS = (DissectError, OSError)


# ----------------------------------------------------------------------------------------------------------
# Models, samplers, images
# ----------------------------------------------------------------------------------------------------------


class _OnDevice:
    """A sampler whose batches land on the model's device (samplers draw on the CPU)."""

    def __init__(self, sampler: Any, device: torch.device) -> None:
        self.sampler, self.device = sampler, device
        self.description = sampler.description

    def __call__(self, seeds: Sequence[int]) -> Any:
        return to_device(self.sampler(list(seeds)), self.device)


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, _OnDevice]:
    device = _device(args)
    model, sampler = load(args.model, device)
    return model, _OnDevice(sampler, device)


def _render(model: nn.Module, inputs: Any) -> Tensor:
    """``model(inputs)`` as images ``(N, 3, H, W)`` in [-1, 1]."""
    with torch.no_grad():
        images = call_model(model, inputs)
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise CliError(f"This command needs a model that returns images (N, 3, H, W); it returned {shape}.")
    return images


def _batches(seeds: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(seeds), size):
        yield list(seeds[start : start + size])


def _segmenter(args: argparse.Namespace) -> tuple[Segmenter, tuple[str, ...]]:
    seg = load_segmenter(_device(args), args.segmenter)
    return seg, CLASSES[: seg.num_classes]


def _fit_moment(memory: LayerMemory, sampler: _OnDevice, args: argparse.Namespace) -> Tensor:
    return memory.fit_moment(sampler, args.stats_n, str(args.cache_dir), args.batch_size)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


# ----------------------------------------------------------------------------------------------------------
# Requests (JSON) and edit files
# ----------------------------------------------------------------------------------------------------------

REQUEST_HELP = """\
A request is a JSON object, or a list of them applied in order:

  {"layer": "synthesis.b16.conv1",
   "copy":    {"seed": 3, "box": [y0, x0, y1, x1]},     values copied from a region of seed 3
   "paste":   {"seed": 7, "center": [y, x],             pasted into seed 7 (no center: where they were),
               "region": {"box": [...]},                only onto this part of it (optional)
               "by": "appearance"},                     optional: instead of the copied values, the value that makes
                                                        the region (and the context's first 7 regions) look like the
                                                        copy to the segmenter (--segmenter; dissect.appearance)
   "context": {"rank": 4, "regions": [{"seed": 1, "box": [...]}, {"seed": 2, "mask": "m.png"}]}}

  {"layer": "...", "erase": {"regions": [{"seed": 5, "box": [...]}]}, "context": {...}}
     the erased regions become what surrounds them ("fill": "surround"), or lose their context's most aligned
     key units ("fill": "units", "units": 30)

  {"layer": "...", "pairs": {"regions": [{"seed": 3, "box": [...]}], "values_from": [5]}}
     the keys in each region get what the layer's weight emits there for its "values_from" seed
  {"layer": "...", "output_target": {"regions": [...], "targets": [2]}}
     the keys in each region get the value that makes the model (a classifier) output class 2 for that seed
     (ROME's v*; "position": t reads logits (N, T, classes) at t). Both need a layer with a 2-D key map that is
     its own weight (a conv; for a composite layer name its weight's module, e.g. "synthesis.b16.conv1.conv").

Regions are a "box" in image pixels (end exclusive) or a "mask": a grayscale PNG at image resolution
(white = inside), relative to the JSON file. "context" is optional (default: the target's own region, rank 1).
Optional on any request: "pointwise": true (change only the kernel's centre), "strength": 2.5 (scale the
solved change; see dissect.rewrite.Edit.scaled) and "budget": 0.02 (the most the edit may change the layer's
output over the data, as a share of its energy: the paper's smoothness term; default 0.02).
C is collected (and cached) over seeds 0 .. --stats-n - 1 first."""


def _field(entry: Any, key: str, what: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise CliError(f"{what} needs a {key!r} field (see `dissect rewrite --help`), got {json.dumps(entry)}.")
    return entry[key]


def _integer(entry: Any, key: str, what: str, default: int | None = None) -> int:
    """``entry[key]`` (or ``default`` when absent), refused by name unless it is a JSON integer; ``what`` is where
    ``entry`` sits, e.g. ``request.json copy``."""
    value = entry.get(key, default) if default is not None and isinstance(entry, dict) else _field(entry, key, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CliError(f"{key} {value!r} in {what}.{key} is not an integer.")
    return value


def _mask(region: dict, size: tuple[int, int], base_dir: Path, what: str) -> Tensor:
    """A region's mask ``(H, W)`` in [0, 1] at image resolution ``size``."""
    height, width = size
    if "box" in region:
        box = region["box"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
            raise CliError(f"{what}: a box is [y0, x0, y1, x1] in integer pixels, got {box!r}.")
        y0, x0, y1, x1 = box
        if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
            raise CliError(f"{what}: box {box} is empty or leaves the {height}x{width} image (end exclusive).")
        mask = torch.zeros(height, width)
        mask[y0:y1, x0:x1] = 1
        return mask
    path = base_dir / _field(region, "mask", f"{what} (a 'box' or a 'mask')")
    if not path.is_file():
        raise CliError(f"{what}: no mask image at {path}.")
    image = Image.open(path).convert("L")
    if image.size != (width, height):
        raise CliError(f"{what}: mask {path} is {image.size[0]}x{image.size[1]}; draw it at the image's {width}x{height}.")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)


def _regions(entry: dict, size: tuple[int, int], base_dir: Path, what: str) -> tuple[list[int], Tensor]:
    """Seeds and masks ``(n, H, W)`` of ``entry["regions"]``."""
    regions = _field(entry, "regions", what)
    if not isinstance(regions, list) or not regions:
        raise CliError(f"{what}: 'regions' is a non-empty list of {{'seed', 'box' | 'mask'}}.")
    seeds = [_integer(r, "seed", f"{what}.regions[{i}]") for i, r in enumerate(regions)]
    masks = torch.stack([_mask(r, size, base_dir, f"{what}.regions[{i}]") for i, r in enumerate(regions)])
    return seeds, masks


class _Reader:
    """How request kinds (``rewrite.Request.from_spec``) read their JSON here: seeds through the model's sampler,
    masks from boxes or mask images beside the JSON file, every field named by where it sits."""

    def __init__(self, sampler: _OnDevice, size: tuple[int, int], base_dir: Path, where: str) -> None:
        self.sampler, self.size, self.base_dir, self.where = sampler, size, base_dir, where

    def inputs(self, seeds: list[int]) -> Any:
        return self.sampler(seeds)

    def seed(self, entry: Any, what: str) -> int:
        return _integer(entry, "seed", f"{self.where} {what}")

    def mask(self, entry: Any, what: str) -> Tensor:
        if not isinstance(entry, dict):
            raise CliError(f"{self.where} {what}: a region is {{'box': [y0, x0, y1, x1]}} or {{'mask': 'file.png'}}, "
                           f"got {entry!r}.")
        return _mask(entry, self.size, self.base_dir, f"{self.where} {what}")

    def regions(self, entry: Any, what: str) -> tuple[list[int], Tensor]:
        return _regions(entry, self.size, self.base_dir, f"{self.where} {what}")


def _request(
    spec: dict, sampler: _OnDevice, size: tuple[int, int], base_dir: Path, where: str
) -> tuple[rewrite.Request, rewrite.Context | None]:
    """The target and context requests one JSON request describes (any registered kind); ``where`` names it
    (``request.json``)."""
    if not isinstance(spec, dict):
        raise CliError(f"{where}: a request is a JSON object, got {json.dumps(spec)}.")
    if "context" in spec and isinstance(spec["context"], dict):
        _integer(spec["context"], "rank", f"{where} context", default=1)
    try:
        return rewrite.Request.from_spec(spec, _Reader(sampler, size, base_dir, where))
    except RequestError as err:
        raise CliError(f"{where}: {err}") from err


def _by_appearance(spec: dict, where: str) -> bool:
    """Whether a paste request asks to paste by appearance (``"paste": {..., "by": "appearance"}``)."""
    by = spec["paste"].get("by", "values") if isinstance(spec.get("paste"), dict) else "values"
    if by not in ("values", "appearance"):
        raise CliError(f"{where}: 'by' in 'paste' is \"values\" (the default: the copied values) or \"appearance\", "
                       f"got {by!r}.")
    if by == "appearance" and "region" not in spec["paste"]:
        raise CliError(f"{where}: a paste by appearance needs \"region\" in \"paste\": the part of the image that "
                       f"should look like the copy.")
    return by == "appearance"


def _check_request(memory: LayerMemory, target: rewrite.Request, context: rewrite.Context | None,
                   where: str) -> None:
    """Refuse what can be refused before C is collected: the layer's weight, the context's rank against the key
    dimension and its keys (or the erase's own region, its default context), the erase's unit count, and what a
    kind with a ``check(memory)`` method refuses (value targets: their shapes, targets outside the outputs)."""
    memory.check_finite_weight()
    check = getattr(target, "check", None)
    if callable(check):
        check(memory)
    if isinstance(target, rewrite.Erase) and not 1 <= target.units <= memory.key_channels:
        raise CliError(f"units {target.units} in {where} erase.units is not between 1 and the key dimension of layer "
                       f"{memory.layer!r} ({memory.key_channels}).")
    if context is not None:
        memory.context_keys(context.inputs, context.masks, context.rank)
    elif isinstance(target, rewrite.Erase):
        memory.context_keys(target.inputs, target.masks)


def _solver_options(spec: dict, what: str) -> tuple[bool, float, float]:
    """A request's optional ``pointwise``, ``strength`` and ``budget``."""
    pointwise, strength = spec.get("pointwise", False), spec.get("strength", 1.0)
    budget = spec.get("budget", rewrite.DEFAULT_BUDGET)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
        raise CliError(f"{what}: 'budget' is a positive share of the layer's output energy (e.g. 0.02), got {budget!r}.")
    if not isinstance(pointwise, bool):
        raise CliError(f"{what}: 'pointwise' is true or false, got {pointwise!r}.")
    try:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError
        rewrite.check_strength(strength)
    except ValueError:
        raise CliError(f"{what}: 'strength' is a positive number up to {rewrite.MAX_STRENGTH:g} (1 = the solved edit), "
                       f"got {strength!r}.") from None
    return pointwise, float(strength), float(budget)


def _region_size(memory: LayerMemory, sampler: _OnDevice, where: str) -> tuple[int, int]:
    """The image size ``(H, W)`` a request's regions are drawn at: the one the library draws this layer's masks at
    (a generator's output image, a classifier's input image)."""
    example = sampler([0])
    grid = memory.grid(memory.keys(example))
    if len(grid) != 2:
        raise CliError(f"{where}: layer {memory.layer!r} has no 2-D key map (its key grid is {grid}), so image regions "
                       "cannot select its keys; choose a convolution layer, or use the Python API.")
    return memory.mask_size(example, grid)


def _apply_edits(model: nn.Module, sampler: _OnDevice, args: argparse.Namespace) -> rewrite.Rewriter:
    """Apply ``args.edit`` to ``model``: an edit file saved by dissect, or a request JSON solved here."""
    path = Path(args.edit)
    if not path.is_file():
        raise CliError(f"No edit file at {path}: give an edit file saved by dissect (.safetensors) or a request (.json).")
    if path.suffix != ".json":
        try:
            return rewrite.load(str(path), model)
        except SafetensorError as err:
            raise CliError(f"{path} is not a safetensors edit file ({err}); give one saved by dissect, or a .json request.")
    try:
        specs = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CliError(f"{path} is not valid JSON: {err}.") from err
    wheres = [f"{path.name} [{i}]" for i in range(len(specs))] if isinstance(specs, list) else [path.name]
    specs = specs if isinstance(specs, list) else [specs]
    # Every request is read and checked before the slow part (collecting C, solving).
    plans = []
    for i, (spec, where) in enumerate(zip(specs, wheres)):
        memory = LayerMemory(model, str(_field(spec, "layer", f"Request {i}")))
        size = _region_size(memory, sampler, where)
        plans.append((memory, *_request(spec, sampler, size, path.parent, where), *_solver_options(spec, f"Request {i}")))
    looks = [_by_appearance(spec, where) for spec, where in zip(specs, wheres)]
    for (memory, target, context, *_), where in zip(plans, wheres):
        _check_request(memory, target, context, where)
    look = Appearance(measure.Perceptual(_segmenter(args)[0])) if any(looks) else None
    rewriter = rewrite.Rewriter(model)
    for (memory, target, context, pointwise, strength, budget), by_look in zip(plans, looks):
        if by_look:
            target = paste_by_appearance(memory, target, context, look)
        _fit_moment(memory, sampler, args)
        edit = rewrite.solve(memory, target, context, refine=not args.no_refine, pointwise=pointwise, budget=budget)
        rewriter.apply(edit.scaled(strength))
    return rewriter


def _describe(rewriter: rewrite.Rewriter) -> None:
    for edit in rewriter.history:
        how = f"rank {edit.rank}, {edit.solver}" + (", pointwise" if edit.pointwise else "")
        print(f"{edit.layer}: {how}, strength {edit.strength:g}; constraint loss {edit.loss_before:.4g} -> "
              f"{edit.loss_after:.4g} (closed form {edit.loss_closed_form:.4g}; at strength 1); moves "
              f"{edit.expected_change:.1%} of the layer's output energy")


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------


def cmd_layers(args: argparse.Namespace) -> None:
    model, sampler = _load_model(args)
    rows = [
        (info.name, info.type, info.in_channels, info.out_channels, "x".join(map(str, info.kernel_size)) or "-",
         "not reached" if info.output_size is None else "x".join(map(str, info.output_size)) or "-")
        for info in layers(model, sampler([0]))
    ]
    _print_table(("layer", "type", "in", "out", "kernel", "output"), rows)


def cmd_stats(args: argparse.Namespace) -> None:
    model, sampler = _load_model(args)
    memory = LayerMemory(model, args.layer)
    moment = memory.fit_moment(sampler, args.n, str(args.cache_dir), args.batch_size)
    c = moment.shape[0]
    print(f"{args.layer}: C = E[k k^T] is {c}x{c} over the keys of seeds 0-{args.n - 1}, trace {float(moment.trace()):.4g}; "
          f"cached in {args.cache_dir}")


def cmd_clusters(args: argparse.Namespace) -> None:
    model, sampler = _load_model(args)
    memory = LayerMemory(model, args.layer)
    if args.whiten:
        _fit_moment(memory, sampler, args)
    seeds = list(range(args.n))
    clusters = memory.cluster_keys(sampler, seeds, args.k, whiten=args.whiten, per_image=args.per_image,
                                   batch_size=args.batch_size)
    seg, classes = _segmenter(args)
    maps, labels, shown = [], [], []
    for batch in tqdm(list(_batches(seeds, args.batch_size)), desc="name clusters", unit="batch"):
        inputs = sampler(batch)
        images = _render(model, inputs)
        maps.append(clusters.predict(inputs).cpu())
        labels.append(seg.segment(images).cpu())
        shown.append(images[: max(0, args.show - sum(len(s) for s in shown))].cpu())
    maps_all = torch.cat(maps)
    named = clusters.name(maps_all, torch.cat(labels), classes)
    share = torch.bincount(maps_all.flatten(), minlength=args.k).double() / maps_all.numel()
    rows = [(c.cluster, c.name, f"{c.iou:.2f}", f"{float(share[c.cluster]):.1%}")
            for c in sorted(named, key=lambda c: -float(share[c.cluster]))]
    _print_table(("cluster", "class", "IoU", "locations"), rows)

    images = torch.cat(shown)
    overlays, legend = cluster_overlay(images, maps_all[: len(images)], [c.name for c in named], [c.iou for c in named])
    grid = image_grid(overlays, nrow=min(6, len(images)), labels=[f"seed {s}" for s in seeds[: len(images)]],
                      scale=args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(side_by_side([grid, legend.image])).save(args.out)
    print(f"wrote {args.out}")


def cmd_rewrite(args: argparse.Namespace) -> None:
    if args.export is None and args.save_edit is None:
        raise CliError("Nothing to write: give --export OUT.safetensors (edited weights) and/or --save-edit FILE.")
    model, sampler = _load_model(args)
    rewriter = _apply_edits(model, sampler, args)
    _describe(rewriter)
    if args.save_edit is not None:
        rewriter.save(str(args.save_edit))
        print(f"wrote edits to {args.save_edit}")
    if args.export is not None:
        rewriter.export(str(args.export))
        print(f"wrote edited weights to {args.export}")


def cmd_eval(args: argparse.Namespace) -> None:
    model, sampler = _load_model(args)
    base = copy.deepcopy(model)
    rewriter = _apply_edits(model, sampler, args)
    _describe(rewriter)
    seg, classes = _segmenter(args)
    wanted = list(classes) if args.classes is None else [c.strip() for c in args.classes.split(",")]
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise CliError(f"Unknown class(es) {', '.join(unknown)}; the segmenter knows {', '.join(classes)}.")
    if args.unrelated is not None and args.unrelated not in classes:
        raise CliError(f"Unknown class {args.unrelated!r} for --unrelated; the segmenter knows {', '.join(classes)}.")
    perceptual = measure.Perceptual(seg)
    scale = measure.calibrate(base, sampler, perceptual=perceptual, cache_dir=args.cache_dir, batch=args.batch_size)
    seeds = list(range(args.seed_start, args.seed_start + args.n))
    result = measure.compare(base, model, sampler, seeds, seg, wanted, args.unrelated, perceptual, scale,
                             args.batch_size, args.min_pixels, progress=True)
    rule = ", ".join(f"{c} {n}" for c, n in measure.PRESENCE_PIXELS.items())
    rule = f"at least {args.min_pixels} pixels" if args.min_pixels else f"the presence rule ({rule}, else 16 pixels of 64x64)"
    print(f"{args.n} images (seeds {seeds[0]}-{seeds[-1]}); an image shows a class by {rule}")
    shares = [torch.bincount(r.labels.flatten(), minlength=len(classes)) / r.labels.numel()
              for r in (result.before, result.after)]
    rows = [(name, f"{a:.1%}", f"{b:.1%}", *(f"{float(share[classes.index(name)]):.2%}" for share in shares))
            for name, (a, b) in result.prevalence.items()]
    _print_table(("class", "images before", "images after", "pixels before", "pixels after"), rows)
    print(result.collateral_summary())


def cmd_units(args: argparse.Namespace) -> None:
    """Layer dissection (issue 18): every unit of the layers scored against the classes, and an HTML report."""
    from dissect import dissection

    model, sampler = _load_model(args)
    layers_asked = [name.strip() for text in args.layer for name in text.split(",") if name.strip()]
    if args.data == "world":
        samples: Any = dissection.WorldSamples(range(args.n))
        segmenter = None
    else:
        samples, segmenter = dissection.GeneratedSamples(sampler, range(args.n)), _segmenter(args)[0]
    result = dissection.dissect(model, layers_asked, samples, segmenter=segmenter, side=args.side,
                                quantile=args.quantile, batch_size=args.batch_size, device=_device(args))
    print(f"{result.samples} samples, {result.units} units, {result.forward_passes} passes over the data, "
          f"{result.seconds:.1f} s; {result.interpretable_share(args.iou):.1%} of the units reach IoU {args.iou:g}")
    rows = [(layer, d.units, f"{d.interpretable_share(args.iou):.1%}",
             ", ".join(f"{c} {n}" for c, n in sorted(d.units_per_class(args.iou).items(), key=lambda kv: -kv[1])) or "-")
            for layer, d in result.layers.items()]
    _print_table(("layer", "units", f"IoU >= {args.iou:g}", "units per class"), rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dissection.report_html(model, samples, result, args.iou, shown=args.shown))
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``dissect`` argument parser; each subcommand stores its function in ``run``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="spires",
                        help="an embedded model (spires) or an entry point package.module:function returning "
                             "(model, sampler) (default: %(default)s)")
    common.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    common.add_argument("--batch-size", type=_positive, default=32, help="samples per forward (default: %(default)s)")
    common.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    moment = argparse.ArgumentParser(add_help=False)
    moment.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="statistics cache (default: %(default)s)")
    moment.add_argument("--stats-n", type=_positive, default=2000,
                        help="samples (seeds 0 .. N-1) for the key second moment C (default: %(default)s)")
    segment = argparse.ArgumentParser(add_help=False)
    segment.add_argument("--segmenter", type=Path, default=SEGMENTER_WEIGHTS,
                         help="segmenter weights (default: the shipped ones, %(default)s)")
    edit = argparse.ArgumentParser(add_help=False)
    edit.add_argument("--edit", required=True, type=Path,
                      help="an edit file saved by dissect (.safetensors) or a request (.json, see `dissect rewrite --help`)")
    edit.add_argument("--no-refine", action="store_true",
                      help="for a .json request: keep the closed form, skip the nonlinear refinement")

    parser = argparse.ArgumentParser(prog="dissect", description="Open a generator's layers and rewrite what one has learned.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("layers", parents=[common], help="list the editable layers",
                       description="The layers whose weight can be edited: name, type, channels in and out, kernel, "
                                   "output size.")
    p.set_defaults(run=cmd_layers)

    p = sub.add_parser("stats", parents=[common], help="collect and cache a layer's key second moment C",
                       description="Collect C = E[k k^T] of a layer's keys over seeds 0 .. n-1 and cache it; later "
                                   "commands with the same model, layer, sampler and n load it.")
    p.add_argument("--layer", required=True, help="a layer name (see `dissect layers`)")
    p.add_argument("--n", type=_positive, default=2000, help="samples (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="statistics cache (default: %(default)s)")
    p.set_defaults(run=cmd_stats)

    p = sub.add_parser("clusters", parents=[common, moment, segment], help="cluster a layer's keys and name them",
                       description="k-means on a layer's (whitened) keys; each cluster is named by the segmenter "
                                   "class it overlaps best, with that IoU. Writes an overlay grid with its legend.")
    p.add_argument("--layer", required=True, help="a layer name (see `dissect layers`)")
    p.add_argument("--k", type=_positive, required=True, help="number of clusters")
    p.add_argument("--n", type=_positive, default=200, help="images (seeds 0 .. n-1) to fit and name (default: %(default)s)")
    p.add_argument("--per-image", type=_positive, default=64, help="key locations per image to fit on (default: %(default)s)")
    p.add_argument("--no-whiten", dest="whiten", action="store_false",
                   help="cluster normalised keys without whitening by C (skips collecting C)")
    p.add_argument("--show", type=_positive, default=12, help="images in the overlay grid (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("clusters.png"), help="overlay grid PNG (default: %(default)s)")
    p.add_argument("--scale", type=_positive, default=2, help="enlarge each image in the PNG (default: %(default)s)")
    p.set_defaults(run=cmd_clusters)

    p = sub.add_parser("rewrite", parents=[common, moment, edit, segment], help="apply an edit file or a request, export weights",
                       description="Apply a saved edit file (refused for a model it was not made for) or solve a\n"
                                   "request JSON, then export the edited weights and/or save the edits.",
                       epilog=REQUEST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, default=None, help="write the edited model's weights (safetensors)")
    p.add_argument("--save-edit", type=Path, default=None, help="write the edits (safetensors edit file)")
    p.set_defaults(run=cmd_rewrite)

    p = sub.add_parser("eval", parents=[common, moment, edit, segment], help="segment-class prevalence before and after an edit",
                       description="Render fresh seeds with and without the edit; report, per segmenter class (e.g. "
                                   "watermark), the share of images showing it and of pixels labelled with it, and "
                                   "the damage: a perceptual distance beside its scale (a noise re-render, a different "
                                   "image) and pixel RMSE / SSIM.")
    p.add_argument("--n", type=_positive, default=200, help="images (default: %(default)s)")
    p.add_argument("--seed-start", type=int, default=FRESH_SEEDS, help="first seed (default: %(default)s)")
    p.add_argument("--min-pixels", type=_positive, default=None,
                   help="pixels of a class that make an image show it (default: the segmenter's presence rule per "
                        "class, e.g. 48 of 64x64 for the watermark, as the dashboard and benchmarks count)")
    p.add_argument("--unrelated", default=None, metavar="CLASS",
                   help="measure the collateral only on images that did not show CLASS before the edit (e.g. "
                        "watermark for an erase; default: every image)")
    p.add_argument("--classes", default=None, help="comma-separated classes to report (default: all)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("units", parents=[common, segment], help="dissect layers: what each unit means (HTML report)",
                       description="Layer dissection: each unit's map, thresholded at a top quantile over seeds "
                                   "0 .. n-1 and upsampled, scored by IoU against every class (of the segmenter on a "
                                   "generator's images, or of the world's exact labels for an image model); all "
                                   "layers in two passes. Prints units per class; writes a self-contained HTML report.")
    p.add_argument("--layer", required=True, action="append",
                   help="a layer with a spatial map (see `dissect layers`); repeat it or separate names with commas")
    p.add_argument("--n", type=_positive, default=500, help="samples (default: %(default)s)")
    p.add_argument("--data", choices=("generated", "world"), default="generated",
                   help="generated: the model's samples, labelled by the segmenter; world: world images with their "
                        "exact labels, for a model that takes images (default: %(default)s)")
    p.add_argument("--side", choices=("output", "input"), default="output",
                   help="units are the layer's output channels, or its keys (default: %(default)s)")
    p.add_argument("--quantile", type=float, default=0.99, help="top quantile a unit is thresholded at (default: %(default)s)")
    p.add_argument("--iou", type=float, default=0.04, help="IoU that makes a unit interpretable (default: %(default)s)")
    p.add_argument("--shown", type=_positive, default=8, help="units per layer with their top images (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("dissection.html"), help="HTML report (default: %(default)s)")
    p.set_defaults(run=cmd_units)
    return parser


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dissect`` command line; returns the exit status (0, or 2 for a problem the user can fix)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except _USER_ERRORS as err:
        if args.traceback:
            raise
        print(f"dissect {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
