"""Layer dissection: which units of a layer mean what (GAN Dissection, Network Dissection), and what switching them
off or on does.

A *unit* is one channel of a layer's output (``side="output"``, the papers' choice) or of its keys (``side="input"``:
the input of the layer's memory child, the channels :meth:`dissect.memory.LayerMemory.ablate` zeroes). Its activation
map ``(N, h, w)`` is thresholded at a top quantile of its values over the samples (0.99 by default), upsampled
bilinearly to the label maps' resolution, and scored against every class by the IoU of the two regions, summed over
the samples. Everything for all the layers asked comes from two passes over the data (quantiles and top images,
then IoU), each forward serving every layer.

Samples say where the classes come from:

* :class:`GeneratedSamples`: a generator's samples; classes from segmenting its output images with the segmenter
  (``dissect.models.segmenter``), or from label maps you already have.
* :class:`WorldSamples`: world images with their exact label maps, for an image model (Network Dissection proper).
* :class:`LabelledImages`: your own ``(image, label map)`` pairs, checked before any forward.

Causal tests: :func:`ablate` (zero units everywhere) and :func:`insert` (set units to a high value inside a region,
as GANPaint does), measured with the segmenter by :func:`measure_ablation` and :func:`measure_insertion`.
Pictures: :func:`units_per_class_figure`, :func:`iou_figure`, :func:`unit_grid`, and :func:`report_html`, one
self-contained page.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dissect import stats
from dissect.errors import LayerError, ModelError, RequestError
from dissect.hooks import TraceDict, call_model, eval_mode, get_module, key_module_name, model_device, to_device
from dissect.memory import resize_masks
from dissect.models.world import CLASSES, World
from dissect.visualize import image_grid, match_overlay, palette, to_pil

__all__ = [
    "IOU_LEVEL",
    "GeneratedSamples",
    "WorldSamples",
    "LabelledImages",
    "LayerDissection",
    "Dissection",
    "dissect",
    "top_units",
    "ablate",
    "insert",
    "AblationEffect",
    "InsertionEffect",
    "measure_ablation",
    "measure_insertion",
    "units_per_class_figure",
    "iou_figure",
    "unit_grid",
    "report_html",
]

IOU_LEVEL = 0.04  # GAN Dissection's level for an interpretable unit
QUANTILE_VALUES = 2**23  # per layer, values kept for its quantiles (all of them when they fit: exact)
UPSAMPLED_VALUES = 2**23  # upsampled values held at once while counting IoU (32 MiB of float32)
_LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------


def _check_labels(labels: Tensor, n: int, classes: Sequence[str], what: str, size: tuple[int, int] | None = None) -> Tensor:
    """``labels (n, H, W)`` of an integer dtype with values in ``[0, len(classes))``, as int64 (else RequestError)."""
    if not isinstance(labels, Tensor) or labels.dtype not in _LABEL_DTYPES:
        got = f"{labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
        raise RequestError(f"{what}: label maps are integer tensors (N, H, W) of class indices, got {got}; "
                           f"convert them with labels.long() (a float map is not a label map).")
    expected = f"({n}, {size[0]}, {size[1]})" if size else f"({n}, H, W)"
    if labels.dim() != 3 or labels.shape[0] != n or (size is not None and tuple(labels.shape[1:]) != tuple(size)):
        raise RequestError(f"{what}: label maps must have shape {expected}, one per sample at the image's size, got "
                           f"{tuple(labels.shape)}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise RequestError(f"{what}: label values must lie in 0..{len(classes) - 1} (the {len(classes)} classes "
                           f"{', '.join(classes)}), got {int(labels.min())}..{int(labels.max())}; name every class.")
    return labels.long()


class GeneratedSamples:
    """A generator's samples for seeds ``seeds``: ``sampler(seeds)`` are the model's inputs; its output images are
    what the units are seen on. ``labels (N, H, W)``: label maps you already have for these samples (then no
    segmenter runs); without them :func:`dissect` segments the output images.
    """

    generated = True

    def __init__(self, sampler: Callable[[list[int]], Any], seeds: Sequence[int], labels: Tensor | None = None,
                 classes: Sequence[str] = CLASSES) -> None:
        self.sampler, self.seeds, self.classes = sampler, [int(s) for s in seeds], tuple(classes)
        if not self.seeds:
            raise RequestError("GeneratedSamples needs at least one seed.")
        self.labels = None if labels is None else _check_labels(labels, len(self.seeds), self.classes, "GeneratedSamples")

    def __len__(self) -> int:
        return len(self.seeds)

    def batch(self, index: Sequence[int]) -> tuple[Any, Tensor | None]:
        """``(inputs, labels (B, H, W) or None)`` of the samples at positions ``index``."""
        labels = None if self.labels is None else self.labels[list(index)]
        return self.sampler([self.seeds[i] for i in index]), labels


class LabelledImages:
    """Your own images ``(N, C, H, W)`` (as the model takes them) with label maps ``(N, H, W)`` of class indices
    into ``classes``; both are checked here, before any forward. :meth:`from_pairs` takes ``(image, label)`` pairs."""

    generated = False

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str] = CLASSES) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise RequestError(f"LabelledImages: images are float tensors (N, C, H, W), got {got}.")
        self.classes = tuple(classes)
        self.images = images
        self.labels = _check_labels(labels, len(images), self.classes, "LabelledImages", tuple(images.shape[2:]))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[Tensor, Tensor]], classes: Sequence[str] = CLASSES) -> "LabelledImages":
        """``[(image (C, H, W), label (H, W)), ...]`` -> samples (every pair checked before any forward)."""
        if not pairs:
            raise RequestError("LabelledImages.from_pairs needs at least one (image, label) pair.")
        shapes = {(tuple(i.shape), tuple(lab.shape)) for i, lab in pairs}
        if len(shapes) > 1:
            raise RequestError(f"LabelledImages.from_pairs: every pair needs the same shapes, got {sorted(shapes)}.")
        return cls(torch.stack([i for i, _ in pairs]), torch.stack([lab for _, lab in pairs]), classes)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = list(index)
        return self.images[index], self.labels[index]


class WorldSamples:
    """World images for seeds ``seeds`` (``World.sample_latents``) with their exact label maps, rendered per batch."""

    generated = False
    classes = CLASSES

    def __init__(self, seeds: Sequence[int], size: int = 64) -> None:
        self.seeds, self.world = [int(s) for s in seeds], World(size)
        if not self.seeds:
            raise RequestError("WorldSamples needs at least one seed.")

    def __len__(self) -> int:
        return len(self.seeds)

    def batch(self, index: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.world.render(World.sample_latents([self.seeds[i] for i in index]))


Samples = GeneratedSamples | LabelledImages | WorldSamples


# ----------------------------------------------------------------------------------------------------------
# Unit maps of a layer
# ----------------------------------------------------------------------------------------------------------


def _token_side(tokens: int) -> tuple[int, int] | None:
    """``(offset, side)`` when ``tokens`` (or all but a leading class token) form a square grid."""
    for offset in (0, 1):
        side = math.isqrt(tokens - offset)
        if side > 1 and side * side == tokens - offset:
            return offset, side
    return None


def _unit_maps(x: Any, layer: str, side: str) -> Tensor:
    """A layer's activations as unit maps ``(N, U, h, w)``: conv maps as they are, a token grid ``(N, T, C)`` (T a
    square, or a square plus a leading class token) folded to ``(N, C, s, s)``; anything else raises LayerError."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return x
    if isinstance(x, Tensor) and x.dim() == 3 and _token_side(x.shape[1]):
        offset, s = _token_side(x.shape[1])
        return x[:, offset:].transpose(1, 2).reshape(x.shape[0], x.shape[2], s, s)
    got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
    raise LayerError(
        f"Layer {layer!r} has no spatial map on its {side}: it gives {got}. Dissection needs unit maps: a "
        f"convolution's (N, C, h, w), or a Linear over a square token grid (N, T, C). Choose such a layer (list them "
        f"with dissect.layers(model, example_input): those with a 2-D output size)."
    )


def _edit_maps(x: Tensor, edit: Callable[[Tensor], Tensor]) -> Tensor:
    """``x`` with its unit maps replaced by ``edit(maps)`` (same layout as :func:`_unit_maps` reads)."""
    if x.dim() == 4:
        return edit(x)
    offset, s = _token_side(x.shape[1])
    maps = edit(x[:, offset:].transpose(1, 2).reshape(x.shape[0], x.shape[2], s, s))
    out = x.clone()
    out[:, offset:] = maps.reshape(x.shape[0], x.shape[2], s * s).transpose(1, 2)
    return out


def _unit_index(units: Sequence[int] | Tensor, channels: int, layer: str) -> Tensor:
    units = torch.as_tensor(units, dtype=torch.int64).reshape(-1)
    bad = [int(u) for u in units if not 0 <= int(u) < channels]
    if bad:
        raise RequestError(f"Layer {layer!r} has units 0..{channels - 1}; there is no unit {bad[0]}.")
    return units


def _check_side(side: str) -> None:
    if side not in ("output", "input"):
        raise RequestError(f"side is 'output' (the layer's channels) or 'input' (its keys), got {side!r}.")


def _traced_name(model: nn.Module, layer: str, side: str) -> str:
    """The module whose output (side output) or first input (side input: the layer's keys) holds the units."""
    name = layer if side == "output" else key_module_name(model, layer)
    if isinstance(get_module(model, name), (nn.Conv1d, nn.ConvTranspose1d)):  # (N, C, L) would pass for tokens
        raise LayerError(f"Layer {layer!r} is a 1-D convolution: its maps (N, C, L) have no 2-D grid to score against "
                         f"label maps. Choose a 2-D convolution, or a Linear over a square token grid.")
    return name


class _Forwards:
    """Runs batches of samples through the model, tracing every layer at once; counts the passes over the data."""

    def __init__(self, model: nn.Module, layers: Sequence[str], samples: Samples, side: str, batch_size: int,
                 device: torch.device, progress: bool) -> None:
        self.model, self.layers, self.samples, self.side = model, list(layers), samples, side
        self.batch_size, self.device, self.progress = batch_size, device, progress
        self.traced = {layer: _traced_name(model, layer, side) for layer in self.layers}
        self.passes = 0

    def __call__(self, what: str, need_output: bool) -> Iterator[tuple[list[int], dict[str, Tensor], Any, Tensor | None]]:
        """One pass: ``(positions, unit maps per layer, model output or None, labels or None)`` per batch."""
        self.passes += 1
        n = len(self.samples)
        names = list(self.traced.values())
        with tqdm(total=n, unit="sample", desc=what, disable=not self.progress) as bar:
            for start in range(0, n, self.batch_size):
                index = list(range(start, min(n, start + self.batch_size)))
                inputs, labels = self.samples.batch(index)
                with TraceDict(self.model, names, retain_input=self.side == "input",
                               retain_output=self.side == "output", stop=not need_output) as traces:
                    output = call_model(self.model, to_device(inputs, self.device))
                maps = {}
                for layer, name in self.traced.items():
                    calls = traces[name].inputs if self.side == "input" else traces[name].outputs
                    if len(calls) != 1:
                        raise LayerError(f"Layer {layer!r} ran {len(calls)} times in one forward; dissection needs a "
                                         f"layer that runs once per forward (choose one call's own module).")
                    maps[layer] = _unit_maps(calls[0], layer, self.side).float()
                yield index, maps, output if need_output else None, labels
                bar.update(len(index))


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LayerDissection:
    """One layer's units scored against every class.

    ``thresholds (U,)``: each unit's activation at the dissection quantile; ``high (U,)``: at ``high_quantile``
    (what :func:`insert` sets by default). ``iou (U, K)``: IoU of each unit's thresholded, upsampled map with each
    class over the samples. ``top_values``/``top_samples (k, U)``: each unit's highest per-sample peaks and the
    sample positions they come from, best first.
    """

    layer: str
    side: str
    classes: tuple[str, ...]
    quantile: float
    high_quantile: float
    thresholds: Tensor
    high: Tensor
    iou: Tensor
    top_values: Tensor
    top_samples: Tensor
    grid: tuple[int, int]

    @property
    def units(self) -> int:
        return len(self.thresholds)

    @property
    def best_class(self) -> Tensor:
        """``(U,)`` index of each unit's best class."""
        return self.iou.argmax(1)

    @property
    def best_iou(self) -> Tensor:
        """``(U,)`` each unit's IoU with its best class."""
        return self.iou.amax(1)

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise RequestError(f"Unknown class {name!r}; the classes are {', '.join(self.classes)}.")
        return self.classes.index(name)

    def check_units(self, units: Sequence[int] | Tensor) -> Tensor:
        """``units`` as an int64 tensor; a unit outside ``0..U-1`` raises RequestError naming it."""
        return _unit_index(units, self.units, self.layer)

    def ranked(self, name: str) -> Tensor:
        """``(U,)`` every unit, highest IoU with class ``name`` first."""
        return self.iou[:, self.class_index(name)].argsort(descending=True, stable=True)

    def top(self, name: str, k: int) -> Tensor:
        """The ``k`` units with the highest IoU with class ``name``, best first."""
        if int(k) != k or not 1 <= k <= self.units:
            raise RequestError(f"Layer {self.layer!r} has {self.units} units; ask for 1..{self.units}, got {k!r}.")
        return self.ranked(name)[: int(k)]

    def units_per_class(self, level: float = IOU_LEVEL) -> dict[str, int]:
        """How many units have each class as their best, at IoU ``>= level`` (classes without any left out)."""
        keep = self.best_iou >= level
        counts = torch.bincount(self.best_class[keep], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts) if n}

    def share_per_class(self, level: float = IOU_LEVEL) -> dict[str, float]:
        """The share of the layer's units that each class owns at IoU ``>= level`` (:meth:`units_per_class` / U)."""
        return {c: n / self.units for c, n in self.units_per_class(level).items()}

    def interpretable_share(self, level: float = IOU_LEVEL) -> float:
        """Share of the layer's units whose best IoU is ``>= level``."""
        return float((self.best_iou >= level).double().mean())

    def table(self, level: float = 0.0) -> list[tuple[int, str, float]]:
        """``(unit, best class, IoU)`` for the units at IoU ``>= level``, best first."""
        order = self.best_iou.argsort(descending=True, stable=True)
        return [(int(u), self.classes[int(self.best_class[u])], float(self.best_iou[u]))
                for u in order if self.best_iou[u] >= level]


@dataclass
class Dissection:
    """Every dissected layer (``result[layer]``), with what it cost: ``forward_passes`` over the data and seconds."""

    layers: dict[str, LayerDissection]
    samples: int
    forward_passes: int
    seconds: float
    classes: tuple[str, ...]

    def __getitem__(self, layer: str) -> LayerDissection:
        if layer not in self.layers:
            raise LayerError(f"Layer {layer!r} was not dissected; these were: {', '.join(self.layers)}.")
        return self.layers[layer]

    @property
    def units(self) -> int:
        return sum(d.units for d in self.layers.values())

    def interpretable_share(self, level: float = IOU_LEVEL) -> float:
        """Share of all dissected units whose best IoU is ``>= level``."""
        return sum(d.interpretable_share(level) * d.units for d in self.layers.values()) / max(self.units, 1)


# ----------------------------------------------------------------------------------------------------------
# Dissection
# ----------------------------------------------------------------------------------------------------------


class _Levels:
    """Each unit's values at given quantiles. Exact while a layer's values over all samples fit in
    :data:`QUANTILE_VALUES`; else from a seeded uniform sample of locations, the same share of every batch, as many
    as fit (at least 2^15 locations: the 0.99 quantile then selects 1% +- 0.06% of the locations, one standard
    error). Selection by ``topk`` on the sample: ``stats.Quantile``'s compaction sorts cost about a microsecond per
    value on a CPU, many times the forward itself."""

    def __init__(self, first: Tensor, n: int, seed: int = 0) -> None:
        rows, units = n * first.shape[2] * first.shape[3], first.shape[1]
        self.rate = min(1.0, max(QUANTILE_VALUES // units, 2**15) / rows)
        self.rng = torch.Generator().manual_seed(seed)
        self.kept: list[Tensor] = []

    @property
    def exact(self) -> bool:
        return self.rate == 1.0

    def add(self, maps: Tensor) -> None:
        x = stats.rows(maps)
        if not self.exact:
            pick = torch.randperm(len(x), generator=self.rng)[: math.ceil(len(x) * self.rate)]
            x = x[pick.to(x.device)]
        self.kept.append(x)

    def quantiles(self, q: Sequence[float]) -> Tensor:
        """``(len(q), U)``: per unit, the value of rank ``ceil(q m)`` (ascending, 1-based) of its ``m`` values."""
        values = torch.cat(self.kept).T
        m = values.shape[1]
        above = [m - max(1, math.ceil(p * m)) for p in q]  # values ranked above each quantile's
        top = values.topk(max(above) + 1, dim=1).values  # (U, max+1), largest first
        return torch.stack([top[:, a] for a in above]).double()


def _labels_of(samples: Samples, labels: Tensor | None, output: Any, segmenter: nn.Module | None) -> Tensor:
    if labels is not None:
        return labels
    if not (isinstance(output, Tensor) and output.dim() == 4 and output.shape[1] == 3):
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ModelError(f"The segmenter labels images (N, 3, H, W), but the model returned {got}: give label maps "
                         f"(GeneratedSamples(..., labels=...)) or dissect an image model with LabelledImages.")
    return segmenter.segment(output.clamp(-1, 1))


def _linear_resize(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """``(n_out, n_in)``: the weights of ``F.interpolate(..., mode="linear", align_corners=False)`` along one axis."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


def _count_overlaps(maps: Tensor, thresholds: Tensor, labels: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """For unit maps ``(B, U, h, w)`` and labels ``(B, H, W)``: per unit and class, the pixels where the bilinearly
    upsampled map is above the unit's threshold and the label is the class (``(U, K)``), and per unit the pixels
    above threshold (``(U,)``).

    An upsampled value never exceeds its map's maximum, so only the (sample, unit) maps that reach their threshold
    somewhere are upsampled: at a top quantile that is a small share of the low-resolution maps.
    """
    b, u = maps.shape[:2]
    size = tuple(labels.shape[1:])
    pixels = size[0] * size[1]
    flat_labels = labels.reshape(b, pixels)
    limit = thresholds.to(maps)[None, :]
    active = (maps.amax(dim=(2, 3)) > limit).nonzero()  # (P, 2): sample, unit
    inter = torch.zeros(u * classes, dtype=torch.float64, device=maps.device)
    area = torch.zeros(u, dtype=torch.float64, device=maps.device)
    chunk = max(1, UPSAMPLED_VALUES // pixels)
    for start in range(0, len(active), chunk):
        sample, unit = active[start : start + chunk].unbind(1)
        part = maps[sample, unit]  # (P, h, w)
        if part.shape[1:] != size:  # bilinear upsampling is separable: rows, then columns (as BLAS products)
            part = _linear_resize(part.shape[1], size[0], part) @ part @ _linear_resize(part.shape[2], size[1], part).T
        row, pixel = (part.reshape(len(unit), pixels) > thresholds.to(maps)[unit, None]).nonzero().unbind(1)
        hit_unit = unit[row]
        inter += torch.bincount(hit_unit * classes + flat_labels[sample[row], pixel], minlength=u * classes)
        area += torch.bincount(hit_unit, minlength=u)
    return inter.view(u, classes), area


def dissect(
    model: nn.Module,
    layers: Sequence[str],
    samples: Samples,
    *,
    segmenter: nn.Module | None = None,
    side: str = "output",
    quantile: float = 0.99,
    high_quantile: float = 0.999,
    top_k: int = 12,
    batch_size: int = 50,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Dissection:
    """Score every unit of ``layers`` against every class over ``samples``, in two passes over the data.

    Pass 1 streams each unit's values into a quantile sketch (exact when they fit) and its per-sample peaks into a
    top-k; pass 2 upsamples each unit's map to the labels' size, thresholds it at the unit's ``quantile`` and counts
    its overlap with every class. Each forward traces every layer, and stops after the last one when no output is
    needed (labels given); a generator's output is segmented in pass 2 by ``segmenter`` (default: the shipped one).

    Args:
        model: any module; ``layers`` are ``named_modules()`` names with a spatial map on ``side``.
        samples: :class:`GeneratedSamples`, :class:`WorldSamples` or :class:`LabelledImages`.
        side: ``"output"`` (the layer's channels) or ``"input"`` (its keys, as ``LayerMemory`` sees them).
        quantile: the top quantile each unit's map is thresholded at; ``high_quantile``: the value kept for insertion.
        top_k: top-activating samples kept per unit.
    """
    _check_side(side)
    if not layers:
        raise RequestError("Name at least one layer to dissect.")
    if not (0 < quantile < 1 and 0 < high_quantile < 1):
        raise RequestError(f"quantile and high_quantile lie in (0, 1), got {quantile!r} and {high_quantile!r}.")
    if int(batch_size) != batch_size or batch_size < 1 or int(top_k) != top_k or top_k < 1:
        raise RequestError(f"batch_size and top_k are positive integers, got {batch_size!r} and {top_k!r}.")
    device = model_device(model) if device is None else torch.device(device)
    needs_segmenter = getattr(samples, "labels", None) is None and samples.generated
    if needs_segmenter and segmenter is None:
        from dissect.models.segmenter import load_segmenter

        segmenter = load_segmenter(device)
    classes = CLASSES[: segmenter.num_classes] if needs_segmenter else samples.classes
    forwards = _Forwards(model, layers, samples, side, batch_size, device, progress)
    n = len(samples)
    began = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        sketches: dict[str, _Levels] = {}
        grids: dict[str, tuple[int, int]] = {}
        peaks = {layer: stats.TopK(min(top_k, n)) for layer in forwards.layers}
        for _, maps, _, _ in forwards("dissect: quantiles", need_output=False):
            for layer, m in maps.items():
                sketches.setdefault(layer, _Levels(m, n)).add(m)
                grids[layer] = tuple(m.shape[2:])
                peaks[layer].add(m.amax(dim=(2, 3)))
        levels = {layer: q.quantiles([quantile, high_quantile]) for layer, q in sketches.items()}
        inter: dict[str, Tensor] = {}
        area: dict[str, Tensor] = {}
        class_area = torch.zeros(len(classes), dtype=torch.float64, device=device)
        for _, maps, output, labels in forwards("dissect: IoU", need_output=needs_segmenter):
            labels = _labels_of(samples, labels, output, segmenter).to(device)
            class_area += torch.bincount(labels.reshape(-1), minlength=len(classes))
            for layer, m in maps.items():
                i, a = _count_overlaps(m, levels[layer][0], labels, len(classes))
                inter[layer] = inter[layer] + i if layer in inter else i
                area[layer] = area[layer] + a if layer in area else a
    seconds = time.perf_counter() - began
    result = {}
    for layer in forwards.layers:
        union = area[layer][:, None] + class_area[None] - inter[layer]
        values, ids = peaks[layer].topk()
        result[layer] = LayerDissection(
            layer=layer, side=side, classes=tuple(classes), quantile=quantile, high_quantile=high_quantile,
            thresholds=levels[layer][0].cpu(), high=levels[layer][1].cpu(),
            iou=(inter[layer] / union.clamp_min(1)).cpu(), top_values=values.cpu(), top_samples=ids.cpu(),
            grid=grids[layer],
        )
    return Dissection(result, n, forwards.passes, seconds, tuple(classes))


def top_units(model: nn.Module, layer: str, name: str, k: int, samples: Samples, *, side: str = "output",
              **options: Any) -> Tensor:
    """GAN Dissection's unit choice: the ``k`` units of ``layer`` with the highest IoU with class ``name``, best
    first (``options`` go to :func:`dissect`). For the ablation baseline of a rewrite, ``side="input"`` ranks the
    key channels that ``LayerMemory.ablate`` (or :func:`ablate` with ``side="input"``) zeroes."""
    return dissect(model, [layer], samples, side=side, progress=False, **options)[layer].top(name, k)


# ----------------------------------------------------------------------------------------------------------
# Causal tests
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _on_units(model: nn.Module, layer: str, side: str, edit: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block every forward replaces the unit maps of ``layer`` (its output, or its keys) by ``edit(maps)``."""
    _check_side(side)
    module = get_module(model, _traced_name(model, layer, side))

    def check(x: Any) -> Tensor:
        _unit_maps(x, layer, side)
        return x

    if side == "output":
        handle = module.register_forward_hook(lambda m, args, out: _edit_maps(check(out), edit))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: (_edit_maps(check(args[0]), edit), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def ablate(model: nn.Module, layer: str, units: Sequence[int] | Tensor,
           side: str = "output") -> contextlib.AbstractContextManager:
    """Within the block, ``units`` of ``layer`` are zero everywhere, in every forward (GAN Dissection's ablation).
    With ``side="input"`` they are key channels, as :meth:`dissect.memory.LayerMemory.ablate` zeroes them."""

    def zero(maps: Tensor) -> Tensor:
        index = _unit_index(units, maps.shape[1], layer).to(maps.device)
        return maps.index_fill(1, index, 0.0)

    return _on_units(model, layer, side, zero)


def insert(model: nn.Module, layer: str, units: Sequence[int] | Tensor, region: Tensor, value: float | Tensor,
           side: str = "output") -> contextlib.AbstractContextManager:
    """Within the block, ``units`` of ``layer`` are set to ``value`` (a float, or one per unit) inside ``region``
    (GANPaint): ``region`` is ``(H, W)`` or ``(N, H, W)`` in [0, 1] at any resolution, area-resized to the layer's
    grid, where it blends each unit's own activation (0) with ``value`` (1)."""
    if not isinstance(region, Tensor) or region.dim() not in (2, 3) or not region.is_floating_point():
        raise RequestError("insert: region is a float mask (H, W) or (N, H, W) in [0, 1].")
    if not torch.isfinite(region).all() or region.min() < 0 or region.max() > 1 or region.max() == 0:
        raise RequestError("insert: region holds values in [0, 1] and is not empty; draw where the units go.")
    region = region if region.dim() == 3 else region[None]

    def paint(maps: Tensor) -> Tensor:
        index = _unit_index(units, maps.shape[1], layer).to(maps.device)
        target = torch.as_tensor(value, dtype=maps.dtype, device=maps.device).reshape(-1)
        if len(target) not in (1, len(index)):
            raise RequestError(f"insert: give one value, or one per unit ({len(index)}), got {len(target)}.")
        weights = resize_masks(region.to(maps), maps.shape[2:])[:, None]  # (N or 1, 1, h, w)
        out = maps.clone()
        chosen = out[:, index]
        out[:, index] = chosen * (1 - weights) + target.expand(len(index))[None, :, None, None] * weights
        return out

    return _on_units(model, layer, side, paint)


@dataclass(frozen=True)
class AblationEffect:
    """How ablating units changed class ``name`` on ``samples`` images: the share of images showing it before and
    after, and ``removed``, the share of the images showing it before that no longer do."""

    name: str
    samples: int
    before: float
    after: float
    removed: float


@dataclass(frozen=True)
class InsertionEffect:
    """How inserting units drew class ``name``: ``drawn`` is the share of the region's pixels, not of the class
    before, that the segmenter labels with it after; ``outside`` the same share outside the region."""

    name: str
    samples: int
    before: float
    drawn: float
    outside: float


def _segment_runs(model: nn.Module, samples: GeneratedSamples, segmenter: nn.Module, edit: Callable[[], Any],
                  batch_size: int) -> tuple[Tensor, Tensor]:
    """Segmenter labels of ``samples``' images without and with ``edit()`` (a context manager factory)."""
    device = model_device(model)
    runs: list[list[Tensor]] = [[], []]
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(samples), batch_size):
            inputs, _ = samples.batch(range(start, min(len(samples), start + batch_size)))
            inputs = to_device(inputs, device)
            for i, ctx in enumerate((contextlib.nullcontext, edit)):
                with ctx():
                    runs[i].append(segmenter.segment(call_model(model, inputs).clamp(-1, 1)).cpu())
    return torch.cat(runs[0]), torch.cat(runs[1])


def measure_ablation(model: nn.Module, layer: str, units: Sequence[int] | Tensor, samples: GeneratedSamples,
                     segmenter: nn.Module, name: str, side: str = "output", batch_size: int = 50) -> AblationEffect:
    """Ablate ``units`` and count, with the segmenter's presence rule, the images of ``samples`` that show class
    ``name`` before and after."""
    from dissect.models.segmenter import present

    before, after = _segment_runs(model, samples, segmenter, lambda: ablate(model, layer, units, side), batch_size)
    shown, still = present(before, name), present(after, name)
    removed = float((shown & ~still).sum()) / max(int(shown.sum()), 1)
    return AblationEffect(name, len(samples), float(shown.double().mean()), float(still.double().mean()), removed)


def measure_insertion(model: nn.Module, layer: str, units: Sequence[int] | Tensor, value: float | Tensor,
                      region: Tensor, samples: GeneratedSamples, segmenter: nn.Module, name: str,
                      side: str = "output", batch_size: int = 50) -> InsertionEffect:
    """Insert ``units`` at ``value`` inside ``region (H, W)`` (image resolution) and measure where class ``name``
    appears: inside the region (``drawn``) and outside it, among pixels that did not show it before."""
    if name not in CLASSES:
        raise RequestError(f"Unknown class {name!r}; the classes are {', '.join(CLASSES)}.")
    c = CLASSES.index(name)
    before, after = _segment_runs(model, samples, segmenter,
                                  lambda: insert(model, layer, units, region, value, side), batch_size)
    inside = resize_masks(region.float()[None].cpu(), before.shape[1:])[0] >= 0.5
    fresh = before != c
    new = (after == c) & fresh
    share = lambda where: float(new[:, where].sum()) / max(int(fresh[:, where].sum()), 1)  # noqa: E731
    return InsertionEffect(name, len(samples), float((before == c)[:, inside].double().mean()), share(inside),
                           share(~inside))


# ----------------------------------------------------------------------------------------------------------
# Pictures and the report
# ----------------------------------------------------------------------------------------------------------


def units_per_class_figure(result: Dissection, level: float = IOU_LEVEL) -> go.Figure:
    """Stacked bars: per layer, how many units have each class as their best at IoU ``>= level``."""
    layers = list(result.layers)
    colors = palette(len(result.classes))  # a class keeps its colour whichever classes have units
    fig = go.Figure()
    for name, color in zip(result.classes, colors):
        counts = [result[layer].units_per_class(level).get(name, 0) for layer in layers]
        if any(counts):
            fig.add_trace(go.Bar(x=layers, y=counts, name=name, marker_color="rgb({},{},{})".format(*color)))
    fig.update_layout(barmode="stack", title=f"Units per class at IoU >= {level:g} ({result.samples} samples)",
                      xaxis_title="layer", yaxis_title="units")
    return fig


def iou_figure(result: Dissection, level: float = IOU_LEVEL) -> go.Figure:
    """Each layer's distribution of best IoU per unit (box plots), with the interpretability level."""
    fig = go.Figure()
    for layer, d in result.layers.items():
        fig.add_trace(go.Box(y=d.best_iou.tolist(), name=layer, boxpoints="outliers"))
    fig.add_hline(y=level, line_dash="dash", line_color="red", annotation_text=f"IoU {level:g}")
    fig.update_layout(title="Best IoU per unit", yaxis_title="IoU", showlegend=False)
    return fig


def unit_grid(model: nn.Module, samples: Samples, d: LayerDissection, units: Sequence[int], k: int = 6,
              scale: int = 1) -> Tensor:
    """Each unit's ``k`` top-activating images in a row, the region above its threshold kept and outlined, the
    rest dimmed: one picture ``(3, H', W')`` in [0, 1]. A generator's images are its outputs, an image model's
    its inputs (taken as [-1, 1])."""
    units = d.check_units(units)
    k = min(k, len(d.top_samples))
    positions = d.top_samples[:k, units].T.reshape(-1).tolist()  # unit-major
    inputs, _ = samples.batch(positions)
    name = _traced_name(model, d.layer, d.side)
    with eval_mode(model), torch.no_grad(), TraceDict(model, [name], retain_input=d.side == "input",
                                                      retain_output=d.side == "output",
                                                      stop=not samples.generated) as traces:
        output = call_model(model, to_device(inputs, model_device(model)))
    calls = traces[name].inputs if d.side == "input" else traces[name].outputs
    maps = _unit_maps(calls[-1], d.layer, d.side).float().cpu()
    images = (output if samples.generated else inputs).float().cpu()
    unit_of = units.repeat_interleave(k)
    scores = maps[torch.arange(len(positions)), unit_of]
    pictures = match_overlay(images, scores, d.thresholds[unit_of].float())
    labels = [f"u{int(u)} {d.classes[int(d.best_class[u])]} {float(d.best_iou[u]):.2f}" if j == 0 else f"#{j + 1}"
              for u in units for j in range(k)]
    return image_grid(pictures, nrow=k, labels=labels, scale=scale)


def _png(picture: Tensor) -> str:
    buffer = io.BytesIO()
    to_pil(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def report_html(model: nn.Module, samples: Samples, result: Dissection, level: float = IOU_LEVEL, shown: int = 8,
                k: int = 6, scale: int = 2) -> str:
    """A self-contained HTML page (plotly's script and every picture embedded; nothing fetched when opened): the
    summary charts, then per layer its units per class, a table of units at IoU ``>= level`` and a grid of the top
    images of its ``shown`` best units."""
    figures = [units_per_class_figure(result, level), iou_figure(result, level)]
    charts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dissect: layer dissection</title>",
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left} img{image-rendering:pixelated}</style>",
        "</head><body><h1>Layer dissection</h1>",
        f"<p>{result.samples} samples, {len(result.layers)} layer(s), {result.units} units; "
        f"{result.forward_passes} passes over the data in {result.seconds:.1f} s. A unit's region is where its "
        f"upsampled activation exceeds its {next(iter(result.layers.values())).quantile:g} quantile; its class is "
        f"the one of highest IoU with that region. {result.interpretable_share(level):.1%} of the units reach IoU "
        f"{level:g}.</p>",
        *charts,
    ]
    for layer, d in result.layers.items():
        per_class = ", ".join(f"{html.escape(c)} {n}" for c, n in d.units_per_class(level).items()) or "none"
        rows = "".join(f"<tr><td>{u}</td><td>{html.escape(c)}</td><td>{iou:.3f}</td></tr>" for u, c, iou in d.table(level))
        parts += [f"<h2>{html.escape(layer)} ({d.side}, {d.units} units, grid {d.grid[0]}x{d.grid[1]})</h2>",
                  f"<p>Units per class at IoU &ge; {level:g}: {per_class}.</p>"]
        best = [u for u, _, _ in d.table()][:shown]
        if best:
            grid = unit_grid(model, samples, d, best, k, scale)
            parts.append(f"<p>Top images of the {len(best)} best units (the unit's region kept and outlined):</p>"
                         f"<img alt='top images of {html.escape(layer)}' src='data:image/png;base64,{_png(grid)}'>")
        parts.append("<table><tr><th>unit</th><th>class</th><th>IoU</th></tr>" + rows + "</table>" if rows else
                     f"<p>No unit reaches IoU {level:g}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
