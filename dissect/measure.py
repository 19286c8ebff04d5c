"""Measuring what an edit does to the images: the one place for prevalence and (perceptual) collateral.

Everything that reports an edit (the CLI's ``dissect eval``, the dashboard, the benchmarks) renders through
:func:`render`, counts a class as shown by :func:`present` (the segmenter's per-class presence rule), and
measures damage with :func:`collateral`:

- **perceptual**: an LPIPS-style distance (Zhang et al. 2018, as the rewriting paper used) on a network we ship,
  the segmenter: its encoder features at four scales (64, 32, 16 and 8 px for 64 px images), each location's
  channel vector scaled to unit length, squared differences averaged over space and summed over scales.
  0 for identical images; about 0.0007 for an invisible noise re-render of the embedded generator and 2.3 for
  two different samples (:func:`calibrate` measures both for any model; :class:`Scale` prints them beside
  every figure).
- **rmse** and **ssim** (Gaussian 11x11 window, sigma 1.5) of the pixels, in [0, 1] image units, and the older
  **mean_abs** (mean |Δ pixel|) kept for continuity.

Every measure can be restricted to the pixels *outside* a region (the edit's target): the second image's
pixels inside the region are replaced by the first's, so a change there is invisible by construction, and
spatial means are weighted by the share of each location that lies outside.

Example::

    from dissect import measure
    G, sampler = load("spires")
    perceptual = measure.Perceptual()                      # the shipped segmenter's features
    scale = measure.calibrate(G, sampler, perceptual=perceptual)   # cached with the key statistics
    result = measure.compare(G, G_edited, sampler, range(500_000, 500_200), classes=["watermark"],
                             target="watermark", perceptual=perceptual, scale=scale)
    print(result.summary())
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ModelError
from .hooks import TraceDict, call_model, eval_mode, model_device, to_device
from .models.segmenter import PRESENCE_PIXELS, Segmenter, load_segmenter, presence_threshold
from .models.segmenter import present as _segmenter_present
from .models.world import CLASSES
from .stats import DEFAULT_CACHE_DIR, fingerprint

__all__ = [
    "PRESENCE_PIXELS",
    "Rendered",
    "render",
    "present",
    "presence_threshold",
    "prevalence",
    "share",
    "region",
    "removed_class",
    "Perceptual",
    "default_perceptual",
    "rmse",
    "ssim",
    "Scale",
    "CALIBRATION_SEEDS",
    "calibrate",
    "relative",
    "format_distance",
    "collateral_per_image",
    "collateral",
    "Comparison",
    "compare",
]

# Gaussian pixel noise (std in [-1, 1] image units, one 8-bit grey level) that stands in for a noise re-render
# when calibrating a model without ``noise_mode``.
PIXEL_NOISE = 2 / 255
CALIBRATION_SEEDS = range(64)  # the default, so every caller of one model shares one cached scale
CALIBRATION_VERSION = "1"  # part of the cache key: bump when the measures change
_SCALES: dict[str, Scale] = {}  # calibrations of this process, by cache key


# ----------------------------------------------------------------------------------------------------------
# Rendering and presence
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """Images a model rendered from seeds, and the segmenter's labels of them.

    images: (N, 3, H, W) float32 in [-1, 1] on the CPU; labels: (N, H, W) int64 class indices, or None
    without a segmenter; seeds: the N seeds.
    """

    images: Tensor
    labels: Tensor | None
    seeds: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Tensor | slice | Sequence[int]) -> Rendered:
        """The samples at ``index`` (a bool mask, indices or a slice)."""
        keep = torch.arange(len(self.images))[index]
        seeds = [self.seeds[i] for i in keep.tolist()] if self.seeds else []
        return Rendered(self.images[keep], None if self.labels is None else self.labels[keep], seeds)


Model = nn.Module | Callable[[Any], Tensor]


def _forward(model: Model, inputs: Any, noise_mode: str | None) -> Tensor:
    """One batch through ``model`` (under no_grad; an ``nn.Module`` in eval mode, on its device)."""
    fn = model if noise_mode is None else functools.partial(model, noise_mode=noise_mode)
    with torch.no_grad():
        if isinstance(model, nn.Module):
            with eval_mode(model):
                images = call_model(fn, to_device(inputs, model_device(model)))
        else:
            images = call_model(fn, inputs)
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ModelError(f"Measuring needs a model that returns images (N, 3, H, W) in [-1, 1]; it returned {shape}.")
    return images.float().clamp(-1, 1).cpu()


def render(
    model: Model,
    sampler: Callable[[list[int]], Any],
    seeds: Iterable[int],
    segmenter: Segmenter | None = None,
    batch: int = 100,
    noise_mode: str | None = None,
    progress: bool = False,
) -> Rendered:
    """Render ``sampler(seeds)`` with ``model`` in batches and label the images with ``segmenter``.

    ``model`` is an ``nn.Module`` (run in eval mode, inputs moved to its device) or any callable taking the
    sampler's batch. ``noise_mode`` is passed as a keyword when given (a StyleGAN-style generator's "const" /
    "random"). Returns :class:`Rendered` with images clamped to [-1, 1] on the CPU.
    """
    seeds = [int(s) for s in seeds]
    starts = range(0, len(seeds), batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="render", unit="batch")
    images, labels = [], []
    for start in starts:
        x = _forward(model, sampler(seeds[start : start + batch]), noise_mode)
        images.append(x)
        if segmenter is not None:
            labels.append(segmenter.segment(x.to(model_device(segmenter))).cpu())
    empty = torch.zeros(0, 3, 0, 0)
    return Rendered(torch.cat(images) if images else empty, torch.cat(labels) if labels else None, seeds)


def present(labels: Tensor, name: str, min_pixels: int | None = None) -> Tensor:
    """``labels (N, H, W) -> (N,)`` bool: the images that show class ``name``.

    The one presence rule of dissect: at least ``PRESENCE_PIXELS[name]`` pixels (of 64x64, scaled by area;
    e.g. 48 for the watermark) labelled ``name``, unless ``min_pixels`` overrides it with a pixel count.
    """
    return _segmenter_present(labels, name, min_pixels)


def share(hits: Tensor) -> float:
    """The share of true entries of the bool tensor ``hits`` (``nan`` if it is empty), as one division of two
    counts: a float32 mean put 36 of 40 at 0.8999999, below a 90% target it meets."""
    return int(hits.sum()) / hits.numel() if hits.numel() else math.nan


def prevalence(labels: Tensor, name: str, min_pixels: int | None = None) -> float:
    """Share of the images ``labels (N, H, W)`` that show class ``name`` by :func:`present`."""
    return share(present(labels, name, min_pixels))


def removed_class(before: Tensor, after: Tensor, masks: Tensor) -> str | None:
    """The class an erase removed: ``before``/``after`` are labels ``(N, H, W)`` of its images without and with the
    edit, ``masks (N, H, W)`` where it was asked (> 0). Each class scores ``gone² / inside``, its pixels inside the
    masks that lost the label over all its pixels there, so the class that was both mostly and largely taken away
    wins (the watermark, not the wall a smeared letter stood on); None when no masked pixel lost its class."""
    if not before.shape == after.shape == masks.shape:
        raise ValueError(f"before, after and masks must have one shape (N, H, W), got {tuple(before.shape)}, "
                         f"{tuple(after.shape)} and {tuple(masks.shape)}.")
    inside = masks > 0
    n = len(CLASSES)
    total = torch.bincount(before[inside].long().flatten(), minlength=n).double()
    gone = torch.bincount(before[inside & (after != before)].long().flatten(), minlength=n).double()
    if not gone.any():
        return None
    return CLASSES[int((gone.square() / total.clamp(min=1)).argmax())]


def region(labels: Tensor, name: str, grow: int = 1) -> Tensor:
    """``labels (N, H, W) -> (N, H, W)`` bool: the pixels labelled ``name``, grown by ``grow`` pixels."""
    if name not in CLASSES:
        raise KeyError(f"Unknown class {name!r}; the classes are {', '.join(CLASSES)}.")
    mask = (labels == CLASSES.index(name)).float()[:, None]
    return (F.max_pool2d(mask, 2 * grow + 1, 1, grow) if grow > 0 else mask)[:, 0] > 0


# ----------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------


def _outside_weights(outside: Tensor | None, like: Tensor) -> Tensor:
    """``(N, 1, H, W)`` float weights: 1 where measured (``outside``, or everywhere when None)."""
    if outside is None:
        return torch.ones_like(like[:, :1])
    if outside.shape != (like.shape[0], *like.shape[2:]):
        raise ValueError(f"outside must be (N, H, W) = {(like.shape[0], *like.shape[2:])}; got {tuple(outside.shape)}.")
    return outside.to(like.device, like.dtype)[:, None]


def _composite(a: Tensor, b: Tensor, outside: Tensor | None) -> Tensor:
    """``b`` with ``a``'s pixels where ``outside`` is False, so changes there are invisible."""
    return b if outside is None else torch.where(outside.to(b.device)[:, None], b, a)


def _weighted_mean(d: Tensor, w: Tensor) -> Tensor:
    """``d, w (N, 1, h, w) -> (N,)``: the mean of ``d`` weighted by ``w`` (0 where nothing is weighted)."""
    return (d * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1e-12)


def rmse(a: Tensor, b: Tensor, outside: Tensor | None = None) -> Tensor:
    """Root mean squared pixel difference in [0, 1] units, ``a, b (N, 3, H, W)`` in [-1, 1] -> ``(N,)``,
    over the pixels where ``outside (N, H, W)`` bool is True (all when None)."""
    w = _outside_weights(outside, a)
    return _weighted_mean(((b - a) / 2).square().mean(1, keepdim=True), w).sqrt()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(a: Tensor, b: Tensor, outside: Tensor | None = None, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) of ``a, b (N, 3, H, W)`` in [-1, 1] -> ``(N,)``, 1 when equal.

    Gaussian ``window`` (std ``sigma``) statistics on [0, 1] images with reflected borders, per channel; the
    SSIM map is averaged over channels and over the pixels where ``outside (N, H, W)`` is True, after ``b``
    takes ``a``'s pixels elsewhere.
    """
    w = _outside_weights(outside, a)
    x, y = (a + 1) / 2, (_composite(a, b, outside) + 1) / 2
    g = _gaussian_window(window, sigma).to(x.device, x.dtype)
    c, pad = x.shape[1], window // 2

    def blur(t: Tensor) -> Tensor:
        t = F.pad(t, (pad, pad, pad, pad), mode="reflect")
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return _weighted_mean(s.mean(1, keepdim=True), w)


def _segmenter_layers(network: nn.Module) -> list[str]:
    if not isinstance(network, Segmenter):
        raise ValueError(f"Name the feature layers of a {type(network).__name__}: Perceptual(network, layers=[...]).")
    return [f"down.{i}" for i in range(len(network.down))]


class Perceptual(nn.Module):
    """An LPIPS-style perceptual distance on the multi-scale features of a network we ship.

    Args:
        network: maps images (N, 3, H, W) in [-1, 1] through ``layers``; the shipped segmenter by default
            (:func:`dissect.models.segmenter.load_segmenter`).
        layers: names in ``network.named_modules()`` whose outputs (N, C, h, w) are compared; a
            :class:`Segmenter`'s encoder blocks by default (four scales).
        batch: images per forward.

    ``distance(a, b)``: at each layer, each location's channel vector is scaled to unit length, the squared
    difference is summed over channels and averaged over space; the layers' values are summed (LPIPS with
    unit channel weights). Runs on the network's device; gradients flow only when an input requires them.
    """

    def __init__(self, network: nn.Module | None = None, layers: Sequence[str] | None = None, batch: int = 100) -> None:
        super().__init__()
        self.network = load_segmenter() if network is None else network
        self.layers = list(layers) if layers is not None else _segmenter_layers(self.network)
        self.batch = batch

    def fingerprint(self) -> str:
        """SHA-256 of the network's tensors and the compared layers (a calibration's cache key part)."""
        h = hashlib.sha256(f"{type(self.network).__qualname__} {self.layers}".encode())
        for name, t in self.network.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def features(self, images: Tensor) -> list[Tensor]:
        """``images (N, 3, H, W)`` -> the unit-normalised features ``(N, C_l, h_l, w_l)`` of every layer."""
        return self._trace(images, stop=True)[0]

    def features_and_output(self, images: Tensor) -> tuple[list[Tensor], Any]:
        """:meth:`features` and the network's own output (a segmenter's logits), from one whole forward."""
        return self._trace(images, stop=False)

    def _trace(self, images: Tensor, stop: bool) -> tuple[list[Tensor], Any]:
        out = None
        with eval_mode(self.network), TraceDict(self.network, self.layers, stop=stop, detach=not images.requires_grad) as td:
            out = self.network(images.to(model_device(self.network)))
        feats = [td[name].output for name in self.layers]
        return [f / f.square().sum(1, keepdim=True).add(1e-20).sqrt() for f in feats], out

    def forward(self, a: Tensor, b: Tensor, outside: Tensor | None = None) -> Tensor:
        """Alias of :meth:`distance`."""
        return self.distance(a, b, outside)

    def distance(self, a: Tensor, b: Tensor, outside: Tensor | None = None) -> Tensor:
        """``a, b (N, 3, H, W)`` in [-1, 1] -> ``(N,)`` distances (on the CPU when no gradient is needed).

        With ``outside (N, H, W)`` bool, only what changed where it is True counts: ``b`` takes ``a``'s pixels
        elsewhere, and each layer's spatial mean weights a location by the share of its pixels outside.
        """
        if a.shape != b.shape:
            raise ValueError(f"distance compares images of one shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
        grad = a.requires_grad or b.requires_grad
        out = []
        with torch.set_grad_enabled(grad):
            for s in range(0, len(a), self.batch):
                x, y = a[s : s + self.batch], b[s : s + self.batch]
                o = None if outside is None else outside[s : s + self.batch]
                y = _composite(x, y, o)
                w = _outside_weights(o, x).to(model_device(self.network))
                total = 0
                for fa, fb in zip(self.features(x), self.features(y)):
                    d = (fa - fb).square().sum(1, keepdim=True)
                    total = total + _weighted_mean(d, F.interpolate(w, size=d.shape[-2:], mode="area"))
                out.append(total)
        d = torch.cat(out) if out else torch.zeros(0)
        return d if grad else d.detach().cpu()


@functools.lru_cache(maxsize=1)
def default_perceptual() -> Perceptual:
    """The shipped segmenter's :class:`Perceptual`, loaded once per process."""
    return Perceptual()


# ----------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """What a perceptual distance means for one model: its value for an invisible change and for another image.

    noise: mean distance between two renders of a seed that differ only in noise ("random" against "const"
    noise for a generator with ``noise_mode``; else Gaussian pixel noise of ``PIXEL_NOISE``); different:
    mean distance between renders of two different seeds. ``rmse`` and ``ssim`` hold the same two figures
    (noise, different) for those pixel measures; ``n`` pairs; ``how`` names the noise.
    """

    noise: float
    different: float
    rmse: tuple[float, float] = (math.nan, math.nan)
    ssim: tuple[float, float] = (math.nan, math.nan)
    n: int = 0
    how: str = ""

    def __str__(self) -> str:
        return f"noise re-render {self.noise:.2g}, different image {self.different:.3g}"


def relative(d: float | Tensor, scale: Scale) -> float | Tensor:
    """A perceptual distance as a share of a different image's (``d / scale.different``)."""
    return d / scale.different


def format_distance(d: float, scale: Scale | None = None, digits: int = 3) -> str:
    """``"0.120 (0.05 of a different image; noise re-render 0.0007, different image 2.42)"``: a perceptual
    figure always shown with its scale (the bare number when ``scale`` is None)."""
    text = f"{d:.{digits}f}"
    return text if scale is None else f"{text} ({relative(d, scale):.2g} of a different image; {scale})"


def _has_noise_mode(model: Model) -> bool:
    try:
        return "noise_mode" in inspect.signature(model.forward if isinstance(model, nn.Module) else model).parameters
    except (TypeError, ValueError):
        return False


def _cache_key(model: Model, sampler: Any, seeds: list[int], perceptual: Perceptual) -> str | None:
    """SHA-256 of everything a calibration depends on; None when ``model`` is not an ``nn.Module``."""
    if not isinstance(model, nn.Module):
        return None
    weights = fingerprint(model, "", to_device(sampler(seeds[:1]), model_device(model)), side="output")
    text = json.dumps([CALIBRATION_VERSION, weights, perceptual.fingerprint(), getattr(sampler, "description", repr(sampler)),
                       seeds, PIXEL_NOISE])
    return hashlib.sha256(text.encode()).hexdigest()


def calibrate(
    model: Model,
    sampler: Callable[[list[int]], Any],
    seeds: Iterable[int] = CALIBRATION_SEEDS,
    perceptual: Perceptual | None = None,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
    batch: int = 100,
) -> Scale:
    """The :class:`Scale` of ``model``: perceptual, RMSE and SSIM figures for an invisible noise re-render of
    each seed and for a different image (each seed against the next one in ``seeds``).

    Fixed weights give a fixed scale, so it is kept for the process and in a small JSON file in ``cache_dir``
    (the statistics cache by default; None keeps none), keyed by the SHA-256 of the model's weights, the
    perceptual network, the sampler's description and the seeds (a callable that is not an ``nn.Module`` is
    never cached). The default seeds give every caller of one model the same cached scale; calibrate the base
    model, not an edited one (an edit changes the weights, so it would be measured again). At least two seeds
    are needed.
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise ValueError(f"calibrate needs at least two seeds (a different image is the next seed); got {len(seeds)}.")
    perceptual = default_perceptual() if perceptual is None else perceptual
    key = _cache_key(model, sampler, seeds, perceptual)
    path = None if key is None or cache_dir is None else Path(cache_dir).expanduser() / f"scale-{key[:32]}.json"
    scale = _SCALES.get(key) or _read_scale(path) or _measure_scale(model, sampler, seeds, perceptual, batch)
    if key is not None:
        _SCALES[key] = scale
    if path is not None and not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(scale)))
            tmp.replace(path)
        except OSError as e:
            warnings.warn(f"Could not cache the scale in {path.parent} ({e}); it is recomputed next time.", stacklevel=2)
    return scale


def _read_scale(path: Path | None) -> Scale | None:
    """The scale cached at ``path``; None when there is none or it is damaged (then it is measured again)."""
    if path is None or not path.is_file():
        return None
    try:
        return Scale(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(path.read_text()).items()})
    except (OSError, ValueError, TypeError):
        return None


def _measure_scale(model: Model, sampler: Callable[[list[int]], Any], seeds: list[int], perceptual: Perceptual,
                   batch: int) -> Scale:
    if _has_noise_mode(model):
        base = render(model, sampler, seeds, batch=batch, noise_mode="const").images
        device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            noisy = render(model, sampler, seeds, batch=batch, noise_mode="random").images
        how = "the generator's per-pixel noise re-drawn (noise_mode='random' against the const buffers)"
    else:
        base = render(model, sampler, seeds, batch=batch).images
        noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(0)) * PIXEL_NOISE
        noisy = (base + noise).clamp(-1, 1)
        how = f"Gaussian pixel noise of std {PIXEL_NOISE:.4f} (in [-1, 1] units)"
    other = base.roll(-1, 0)  # each seed against the next one

    def pair(b: Tensor) -> tuple[float, float, float]:
        return (float(perceptual.distance(base, b).mean()), float(rmse(base, b).mean()), float(ssim(base, b).mean()))

    (pn, rn, sn), (pd, rd, sd) = pair(noisy), pair(other)
    return Scale(noise=pn, different=pd, rmse=(rn, rd), ssim=(sn, sd), n=len(seeds), how=how)


# ----------------------------------------------------------------------------------------------------------
# Collateral and comparisons
# ----------------------------------------------------------------------------------------------------------


def collateral_per_image(
    before: Rendered | Tensor, after: Rendered | Tensor, exclude: Tensor | None = None, perceptual: Perceptual | None = None
) -> dict[str, Tensor]:
    """Per-image damage between ``before`` and ``after`` (Rendered, or images (N, 3, H, W) in [-1, 1]),
    outside ``exclude (N, H, W)`` bool (the edit's target pixels; everywhere when None).

    Returns ``(N,)`` tensors: "perceptual" (:class:`Perceptual`), "rmse", "ssim", "mean_abs" (mean |Δ pixel|,
    [0, 1] units) and "pixels" (the pixels measured).
    """
    a = before.images if isinstance(before, Rendered) else before
    b = after.images if isinstance(after, Rendered) else after
    if a.shape != b.shape:
        raise ValueError(f"before and after must hold the same images; got {tuple(a.shape)} and {tuple(b.shape)}.")
    perceptual = default_perceptual() if perceptual is None else perceptual
    outside = None if exclude is None else ~exclude.bool()
    w = _outside_weights(outside, a)
    return {
        "perceptual": perceptual.distance(a, b, outside),
        "rmse": rmse(a, b, outside),
        "ssim": ssim(a, b, outside),
        "mean_abs": _weighted_mean(((b - a) / 2).abs().mean(1, keepdim=True), w),
        "pixels": w.flatten(1).sum(1),
    }


def collateral(
    before: Rendered | Tensor, after: Rendered | Tensor, exclude: Tensor | None = None, perceptual: Perceptual | None = None
) -> dict[str, float]:
    """Damage between ``before`` and ``after`` outside ``exclude``, summarised over the images.

    Returns "perceptual" (mean), "perceptual_median", "perceptual_p90" (the worst decile's edge), "rmse" and
    "ssim" (means over images), "mean_abs" (over all measured pixels, as ``eval_edits`` had it) and "n"; the
    figures are NaN for no images. See :func:`collateral_per_image`.
    """
    per = collateral_per_image(before, after, exclude, perceptual)
    d, n = per["perceptual"], len(per["perceptual"])
    if n == 0:
        return {"perceptual": math.nan, "perceptual_median": math.nan, "perceptual_p90": math.nan, "rmse": math.nan,
                "ssim": math.nan, "mean_abs": math.nan, "n": 0}
    return {
        "perceptual": float(d.mean()),
        "perceptual_median": float(d.median()),
        "perceptual_p90": float(d.quantile(0.9)),
        "rmse": float(per["rmse"].mean()),
        "ssim": float(per["ssim"].mean()),
        "mean_abs": float((per["mean_abs"] * per["pixels"]).sum() / per["pixels"].sum().clamp(min=1)),
        "n": n,
    }


@dataclass
class Comparison:
    """A base and an edited model on the same fresh seeds (see :func:`compare`).

    before, after: the renders; prevalence: class -> (before, after) share of images showing it; unrelated:
    (N,) bool, the samples where the target was absent before the edit (all without a target); collateral:
    :func:`collateral` on those samples; scale: the base model's :class:`Scale`, or None.
    """

    before: Rendered
    after: Rendered
    prevalence: dict[str, tuple[float, float]]
    unrelated: Tensor
    collateral: dict[str, float]
    scale: Scale | None = None
    target: str | None = None

    def collateral_summary(self) -> str:
        """Two lines: the perceptual collateral with its scale, and the pixel measures."""
        c = self.collateral
        where = f"{c['n']} samples without {self.target}" if self.target else f"{c['n']} samples"
        return (f"perceptual collateral on {where}: median {format_distance(c['perceptual_median'], self.scale)}; "
                f"mean {c['perceptual']:.3f}, worst decile from {c['perceptual_p90']:.3f}\n"
                f"pixels there: RMSE {c['rmse']:.4f}, SSIM {c['ssim']:.4f}, mean |pixel change| {c['mean_abs']:.4f} "
                "(images in [0, 1])")

    def summary(self) -> str:
        """Several lines: each class's prevalence before and after, then :meth:`collateral_summary`."""
        lines = [f"{name}: {a:.1%} -> {b:.1%} of {len(self.before)} samples" for name, (a, b) in self.prevalence.items()]
        return "\n".join([*lines, self.collateral_summary()])


def _labelled(model: Model | Rendered, sampler: Callable[[list[int]], Any], seeds: list[int], segmenter: Segmenter,
              batch: int, progress: bool) -> Rendered:
    """``model``'s labelled renders of ``seeds``: rendered now, or a :class:`Rendered` of those seeds reused."""
    if not isinstance(model, Rendered):
        return render(model, sampler, seeds, segmenter, batch, progress=progress)
    if model.seeds != seeds:
        raise ValueError(f"A Rendered passed to compare must hold the seeds compared ({len(seeds)} from {seeds[:1]}); "
                         f"it holds {len(model.seeds)} from {model.seeds[:1]}.")
    if model.labels is None:
        labels = [segmenter.segment(x.to(model_device(segmenter))).cpu() for x in model.images.split(batch)]
        return Rendered(model.images, torch.cat(labels), seeds)
    return model


def compare(
    before: Model | Rendered,
    after: Model | Rendered,
    sampler: Callable[[list[int]], Any],
    seeds: Iterable[int],
    segmenter: Segmenter | None = None,
    classes: Sequence[str] = (),
    target: str | None = None,
    perceptual: Perceptual | None = None,
    scale: Scale | None = None,
    batch: int = 100,
    min_pixels: int | None = None,
    progress: bool = False,
) -> Comparison:
    """Render ``seeds`` with the base model ``before`` and the edited ``after`` (models or callables taking
    the sampler's batch; a :class:`Rendered` of exactly ``seeds``, such as a previous comparison's ``before``,
    is reused instead); report each of ``classes``' prevalence before and after, and the collateral on the
    *unrelated* samples, those that did not show ``target`` before the edit (every sample when None).

    ``segmenter`` defaults to ``perceptual``'s network when that is a :class:`Segmenter`, else the shipped
    one. ``scale`` (from :func:`calibrate`) is kept with the result so its summary prints it.
    """
    perceptual = default_perceptual() if perceptual is None else perceptual
    if segmenter is None:
        segmenter = perceptual.network if isinstance(perceptual.network, Segmenter) else load_segmenter()
    seeds = [int(s) for s in seeds]
    r0, r1 = (_labelled(m, sampler, seeds, segmenter, batch, progress) for m in (before, after))
    prev = {name: (prevalence(r0.labels, name, min_pixels), prevalence(r1.labels, name, min_pixels)) for name in classes}
    unrelated = torch.ones(len(seeds), dtype=torch.bool) if target is None else ~present(r0.labels, target, min_pixels)
    coll = collateral(r0[unrelated], r1[unrelated], None, perceptual)
    return Comparison(r0, r1, prev, unrelated, coll, scale, target)
