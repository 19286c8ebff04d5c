"""Feature visualisation: optimise an input so that a named layer of any model does what an objective asks.

After Mordvintsev et al., "Differentiable Image Parameterizations" (Distill, 2018). How the optimised image is
*parameterised* decides whether this works: a Fourier basis scaled by 1/f and a decorrelated colour space make the
optimisation well-conditioned, random transformations make the result robust, shared low-resolution parameters give
aligned interpolations, and a CPPN gives resolution-free images. For a generator the same objectives optimise its
latent (z or w) instead of pixels.

Three pieces compose:

* an :class:`Objective` (``channel``, ``unit``, ``direction``, ``diversity``, …) names layers and returns one score
  per image; objectives add (``a + b``) and scale (``2 * a``);
* a parameterisation (:class:`PixelImage`, :class:`FourierImage`, :class:`CPPNImage`, :class:`AlignedImage`,
  :class:`LatentParam`) makes the model's input from trainable tensors;
* :func:`visualise` runs Adam on the parameterisation, under seeded :func:`standard_transforms` for images.

Example::

    seg = load_segmenter()
    image = FourierImage(1, 3, (64, 64), decorrelate=world_colour_correlation())
    result = visualise(seg, channel("down.2.5", 7), image, steps=128)
    result.images   # (1, 3, 64, 64) in [-1, 1]

Layer names are ``model.named_modules()`` names. An objective reads a layer's *output*, or with ``where="keys"`` the
input of its memory (``hooks.key_module_name``): where a rewrite's context directions ``D (r, C)`` and key-cluster
centroids live. Every check (layer reached, index in range, input accepted) runs on one probe forward before the
first optimisation step; hooks are removed on every exit.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dissect.errors import DissectError, LayerError, ModelError, RequestError
from dissect.hooks import TraceDict, eval_mode, get_module, key_module_name, model_device

__all__ = [
    "Objective",
    "channel",
    "unit",
    "direction",
    "context_direction",
    "key_cluster",
    "diversity",
    "interpolate",
    "match_activations",
    "match_style",
    "colour_correlation",
    "world_colour_correlation",
    "ImageParam",
    "PixelImage",
    "FourierImage",
    "CPPNImage",
    "AlignedImage",
    "LatentParam",
    "Transform",
    "Pad",
    "Jitter",
    "RandomScale",
    "RandomRotate",
    "standard_transforms",
    "Result",
    "visualise",
    "style_transfer",
    "hook_count",
]

Tap = tuple[str, str]  # (layer name, "output" | "keys")
Acts = dict[Tap, Tensor]
Runner = Callable[[nn.Module, Tensor], Any]  # (model, inputs) -> the forward, e.g. ``model(inputs)``
WHERE = ("output", "keys")


# ----------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """A score to maximise, one per image: ``objective(acts) -> (N,)``.

    ``taps`` are the ``(layer, where)`` activations it reads; ``checks`` run once on the probe forward's activations
    and raise :class:`~dissect.errors.RequestError` for an index the layer does not have. Build objectives with
    :func:`channel`, :func:`unit`, :func:`direction`, … and combine them with ``+``, ``-`` and a scalar ``*``.
    """

    taps: tuple[Tap, ...]
    fn: Callable[[Acts], Tensor]
    name: str
    checks: tuple[Callable[[Acts], None], ...] = ()

    def __call__(self, acts: Acts) -> Tensor:
        return self.fn(acts)

    def check(self, acts: Acts) -> None:
        for check in self.checks:
            check(acts)

    def __add__(self, other: "Objective | float") -> "Objective":
        if isinstance(other, (int, float)):
            return Objective(self.taps, lambda a: self.fn(a) + other, f"{self.name} + {other}", self.checks)
        taps = tuple(dict.fromkeys(self.taps + other.taps))
        return Objective(taps, lambda a: self.fn(a) + other.fn(a), f"{self.name} + {other.name}",
                         self.checks + other.checks)

    __radd__ = __add__

    def __mul__(self, scale: float) -> "Objective":
        if not isinstance(scale, (int, float)):
            return NotImplemented
        return Objective(self.taps, lambda a: scale * self.fn(a), f"{scale} * ({self.name})", self.checks)

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return -1.0 * self

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-other)


def _tap(layer: str, where: str) -> Tap:
    if where not in WHERE:
        raise RequestError(f"where must be one of {WHERE}, got {where!r}.")
    return (layer, where)


def _spatial_mean(a: Tensor) -> Tensor:
    """``(N, C, *grid) -> (N, C)``: the mean over locations (a Linear layer's ``(N, C)`` as it is)."""
    return a.flatten(2).mean(2) if a.dim() > 2 else a


def _check_channels(tap: Tap, index: Tensor) -> Callable[[Acts], None]:
    def check(acts: Acts) -> None:
        a = acts[tap]
        n, c = a.shape[0], a.shape[1]
        if index.numel() not in (1, n):
            raise RequestError(f"Give one channel, or one per image ({n}); got {index.numel()} for layer {tap[0]!r}.")
        bad = [int(i) for i in index.reshape(-1) if not 0 <= int(i) < c]
        if bad:
            raise RequestError(f"Unit {bad[0]} is out of range for layer {tap[0]!r} ({tap[1]}), which has {c} "
                               f"channels: choose 0 to {c - 1}.")
    return check


def _pick_channels(a: Tensor, index: Tensor) -> Tensor:
    """``a (N, C, ...)`` -> ``(N, ...)``: channel ``index[i]`` of image i (one index for all when it has one)."""
    idx = index.to(a.device).expand(a.shape[0])
    return a[torch.arange(a.shape[0], device=a.device), idx]


def channel(layer: str, index: int | Sequence[int], where: str = "output") -> Objective:
    """The mean activation of channel ``index`` over the layer's locations (a dissection unit with ``where="keys"``).

    ``index``: one channel for every image, or one per image (a batch of units optimised at once).
    """
    tap = _tap(layer, where)
    idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    return Objective((tap,), lambda a: _pick_channels(_spatial_mean(a[tap]), idx), f"channel({layer}, {index})",
                     (_check_channels(tap, idx),))


def unit(layer: str, index: int, y: int | None = None, x: int | None = None, where: str = "output") -> Objective:
    """Channel ``index`` at one location ``(y, x)`` of a spatial layer (its centre by default)."""
    tap = _tap(layer, where)
    idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)

    def place(a: Tensor) -> tuple[int, int]:
        h, w = a.shape[2], a.shape[3]
        return (h // 2 if y is None else y), (w // 2 if x is None else x)

    def check(acts: Acts) -> None:
        _check_channels(tap, idx)(acts)
        a = acts[tap]
        if a.dim() != 4:
            raise LayerError(f"unit() needs a spatial layer (N, C, H, W); {layer!r} gives {tuple(a.shape)}: use channel().")
        (yy, xx), (h, w) = place(a), a.shape[2:]
        if not (0 <= yy < h and 0 <= xx < w):
            raise RequestError(f"Location ({yy}, {xx}) is outside layer {layer!r}'s {h}x{w} grid.")

    def fn(acts: Acts) -> Tensor:
        a = acts[tap]
        yy, xx = place(a)
        return _pick_channels(a[:, :, yy, xx], idx)

    return Objective((tap,), fn, f"unit({layer}, {index}, {y}, {x})", (check,))


def direction(layer: str, d: Tensor, where: str = "output") -> Objective:
    """Activations along a direction in the layer's channels, averaged over locations.

    ``d (C,)``: the mean of ``dᵀa``. ``d (r, C)`` (a rewrite's context directions ``D``): the mean of ``‖D a‖``,
    the match score that a rewrite through ``D`` acts on (``LayerMemory.match``).
    """
    tap = _tap(layer, where)
    d = d.detach()
    if d.dim() not in (1, 2):
        raise RequestError(f"A direction is (C,) or (r, C); got {tuple(d.shape)}.")

    def check(acts: Acts) -> None:
        c = acts[tap].shape[1]
        if d.shape[-1] != c:
            raise RequestError(f"The direction has {d.shape[-1]} channels but layer {layer!r} ({where}) has {c}.")

    def fn(acts: Acts) -> Tensor:
        a = acts[tap]
        proj = torch.movedim(a, 1, -1) @ d.to(a).reshape(-1, d.shape[-1]).T  # (N, *grid, r)
        score = proj[..., 0] if d.dim() == 1 else proj.norm(dim=-1)
        return score.flatten(1).mean(1) if score.dim() > 1 else score

    return Objective((tap,), fn, f"direction({layer}, {where}, {tuple(d.shape)})", (check,))


def context_direction(memory: Any, directions: Tensor) -> Objective:
    """A rewrite's context: ``‖D k‖`` on the keys of ``memory`` (a ``LayerMemory``), ``D (r, C)`` from
    ``memory.directions(...)``."""
    return direction(memory.layer, directions, where="keys")


def key_cluster(clusters: Any, index: int) -> Objective:
    """Keys pointing at a key cluster's centroid (``clusters``: a fitted ``dissect.memory.KeyClusters``).

    The clustering compares whitened keys ``C^{-1/2} k`` with centroids ``c``, so the key-space direction is
    ``C^{-1/2} c`` (``c`` itself without whitening).
    """
    if clusters.kmeans is None:
        raise RequestError("Fit the key clusters (clusters.fit(sampler, seeds)) before visualising one.")
    centres = torch.as_tensor(clusters.kmeans.cluster_centers_)
    if not 0 <= index < centres.shape[0]:
        raise RequestError(f"Cluster {index} is out of range: choose 0 to {centres.shape[0] - 1}.")
    c = centres[index].float()[None]
    d = clusters.memory.whiten(c.to(clusters.memory.weight))[0] if clusters.whiten else c[0]
    obj = direction(clusters.memory.layer, d, where="keys")
    return Objective(obj.taps, obj.fn, f"key_cluster({clusters.memory.layer}, {index})", obj.checks)


def _gram(a: Tensor) -> Tensor:
    """``(N, C, *grid) -> (N, C, C)``: channel correlations over locations."""
    flat = a.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[2]


def diversity(layer: str, where: str = "output") -> Objective:
    """Minus each image's mean cosine similarity of Gram matrices with the batch's other images (Lucid's
    diversity term): pushes a batch towards different ways of satisfying the rest of the objective."""
    tap = _tap(layer, where)

    def fn(acts: Acts) -> Tensor:
        a = acts[tap]
        n = a.shape[0]
        if n < 2:
            return a.new_zeros(n)
        g = F.normalize(_gram(a).flatten(1), dim=1)
        sim = g @ g.T
        return -(sim.sum(1) - sim.diagonal()) / (n - 1)

    return Objective((tap,), fn, f"diversity({layer})")


def interpolate(first: Objective, second: Objective) -> Objective:
    """Frame i of N scores ``(1 - t) first + t second`` with ``t = i / (N - 1)``: the objective of an
    interpolation (use with :class:`AlignedImage`)."""

    def fn(acts: Acts) -> Tensor:
        a, b = first(acts), second(acts)
        t = torch.linspace(0, 1, a.shape[0], device=a.device, dtype=a.dtype) if a.shape[0] > 1 else a.new_zeros(1)
        return (1 - t) * a + t * b

    return Objective(tuple(dict.fromkeys(first.taps + second.taps)), fn, f"interpolate({first.name}, {second.name})",
                     first.checks + second.checks)


def _check_like(tap: Tap, shape: tuple[int, ...], what: str) -> Callable[[Acts], None]:
    def check(acts: Acts) -> None:
        got = tuple(acts[tap].shape[1:])
        if got != shape:
            raise RequestError(f"The {what} target of layer {tap[0]!r} has shape {shape}; the optimised input gives "
                               f"{got}: use the target image's size.")
    return check


def match_activations(layer: str, target: Tensor, where: str = "output") -> Objective:
    """Minus the mean squared difference to ``target (1 or N, C, *grid)`` activations (content in style transfer)."""
    tap = _tap(layer, where)
    target = target.detach()
    return Objective((tap,), lambda a: -(a[tap] - target.to(a[tap])).square().flatten(1).mean(1),
                     f"match_activations({layer})", (_check_like(tap, tuple(target.shape[1:]), "content"),))


def match_style(layer: str, target: Tensor, where: str = "output") -> Objective:
    """Minus the mean squared difference of Gram matrices to those of ``target`` activations (style)."""
    tap = _tap(layer, where)
    gram = _gram(target.detach())
    channels = target.shape[1]

    def check(acts: Acts) -> None:
        if acts[tap].shape[1] != channels:
            raise RequestError(f"The style target of layer {layer!r} has {channels} channels, the input gives "
                               f"{acts[tap].shape[1]}.")

    return Objective((tap,), lambda a: -(_gram(a[tap]) - gram.to(a[tap])).square().flatten(1).mean(1),
                     f"match_style({layer})", (check,))


# ----------------------------------------------------------------------------------------------------------
# Colour decorrelation
# ----------------------------------------------------------------------------------------------------------


def colour_correlation(images: Tensor) -> Tensor:
    """The square root of the images' channel covariance, ``(C, C)``, its largest column scaled to norm 1.

    ``images (N, C, H, W)``. Parameters multiplied by it have the data's colour correlations: one step moves
    along the colour directions the data varies in (Lucid's ``color_correlation_svd_sqrt``).
    """
    if images.dim() != 4:
        raise RequestError(f"Measure colour correlation on images (N, C, H, W); got {tuple(images.shape)}.")
    x = images.detach().double().movedim(1, -1).reshape(-1, images.shape[1])
    cov = torch.cov(x.T).reshape(images.shape[1], images.shape[1])
    vals, vecs = torch.linalg.eigh(cov)
    root = vecs * vals.clamp_min(0).sqrt()
    return (root / root.norm(dim=0).max().clamp_min(1e-12)).float()


@functools.lru_cache(maxsize=2)
def _world_correlation(n: int, size: int) -> Tensor:
    from dissect.models.world import World

    world = World(size=size)
    images, _ = world.render(World.sample_latents(range(n)))
    return colour_correlation(images)


def world_colour_correlation(n: int = 64, size: int = 64) -> Tensor:
    """:func:`colour_correlation` of ``n`` world images: the colours the embedded models were trained on."""
    return _world_correlation(n, size).clone()


# ----------------------------------------------------------------------------------------------------------
# Parameterisations
# ----------------------------------------------------------------------------------------------------------


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise RequestError(f"An image size is positive (H, W); got {size}.")
    return int(h), int(w)


class ImageParam(nn.Module):
    """Base of the image parameterisations: ``param() -> images (N, C, H, W)`` inside ``value_range``.

    Subclasses make an unconstrained ``raw() (N, C, H, W)``; here it is optionally mixed by a colour correlation
    matrix (``decorrelate``: ``(C, C)`` from :func:`colour_correlation`, or None) and squashed by a sigmoid into
    ``value_range`` (the range the model takes: ``(-1, 1)`` for the embedded models).
    """

    is_image = True

    def __init__(self, n: int, channels: int, size: int | Sequence[int], decorrelate: Tensor | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        if n < 1 or channels < 1:
            raise RequestError(f"Ask for at least one image with at least one channel; got n={n}, channels={channels}.")
        self.n, self.channels, self.size = n, channels, _size(size)
        self.value_range = value_range
        if decorrelate is not None and tuple(decorrelate.shape) != (channels, channels):
            raise RequestError(f"The colour correlation is {tuple(decorrelate.shape)}; this image has {channels} "
                               f"channels: measure it with colour_correlation() on {channels}-channel images.")
        self.register_buffer("colour", None if decorrelate is None else decorrelate.detach().float().clone())

    def raw(self) -> Tensor:
        raise NotImplementedError

    def forward(self) -> Tensor:
        x = self.raw()
        if self.colour is not None:
            x = torch.einsum("nchw,dc->ndhw", x, self.colour.to(x))
        lo, hi = self.value_range
        return lo + (hi - lo) * torch.sigmoid(x)

    def run(self, model: nn.Module, inputs: Tensor) -> Any:
        return model(inputs)


def _normal(shape: Sequence[int], sd: float, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * sd


class PixelImage(ImageParam):
    """One parameter per pixel and channel (the baseline the article improves on)."""

    def __init__(self, n: int, channels: int, size: int | Sequence[int], decorrelate: Tensor | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), sd: float = 0.01, seed: int = 0) -> None:
        super().__init__(n, channels, size, decorrelate, value_range)
        self.pixels = nn.Parameter(_normal((n, channels, *self.size), sd, seed))

    def raw(self) -> Tensor:
        return self.pixels


def _spectrum_scale(h: int, w: int, decay: float) -> Tensor:
    """``(H, W // 2 + 1)``: 1 / f^decay per frequency of a real 2-D FFT, the lowest frequency held at 1 / max(H, W)."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return 1.0 / (fy.square() + fx.square()).sqrt().clamp_min(1.0 / max(h, w)) ** decay


class FourierImage(ImageParam):
    """Parameters are the image's Fourier coefficients, scaled by ``1 / f^decay``.

    Natural images have about 1/f amplitude spectra, so in these coordinates each frequency is equally likely to
    matter, and gradient steps are not dominated by high-frequency noise (the article's first parameterisation).
    """

    def __init__(self, n: int, channels: int, size: int | Sequence[int], decorrelate: Tensor | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), decay: float = 1.0, sd: float = 0.01,
                 seed: int = 0) -> None:
        super().__init__(n, channels, size, decorrelate, value_range)
        h, w = self.size
        self.spectrum = nn.Parameter(_normal((n, channels, h, w // 2 + 1, 2), sd, seed))
        self.register_buffer("scale", _spectrum_scale(h, w, decay))

    def raw(self) -> Tensor:
        h, w = self.size
        spectrum = torch.view_as_complex(self.spectrum.float()) * self.scale
        # Lucid's /4 keeps the first steps' images in the sigmoid's linear range.
        return torch.fft.irfft2(spectrum, s=(h, w), norm="ortho").to(self.spectrum.dtype) / 4


class CPPNImage(ImageParam):
    """A compositional pattern-producing network: a small 1x1-conv net of pixel coordinates, one per image.

    Resolution-free: :meth:`render` draws the same pattern at any size. Composite arctan activations as in the
    article; the output layer starts at zero (a grey image). Adam with a smaller ``lr`` (about 0.005) suits it.
    """

    def __init__(self, n: int, channels: int, size: int | Sequence[int], decorrelate: Tensor | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), hidden: int = 24, layers: int = 8,
                 seed: int = 0) -> None:
        super().__init__(n, channels, size, decorrelate, value_range)
        gen = torch.Generator().manual_seed(seed)
        convs, c_in = [], 2
        for _ in range(layers):
            conv = nn.Conv2d(n * c_in, n * hidden, 1, groups=n)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / math.sqrt(c_in))
                conv.bias.zero_()
            convs.append(conv)
            c_in = 2 * hidden  # the composite activation doubles the channels
        self.hidden = nn.ModuleList(convs)
        self.out = nn.Conv2d(n * c_in, n * channels, 1, groups=n)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def coordinates(self, size: tuple[int, int]) -> Tensor:
        """``(1, n * 2, H, W)`` pixel coordinates, unit variance along the longer side (same for every image)."""
        h, w = size
        r = 3.0**0.5
        side = max(h, w)
        ys = torch.linspace(-r, r, h) * (h / side)
        xs = torch.linspace(-r, r, w) * (w / side)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))[None]
        return grid.repeat(1, self.n, 1, 1).to(self.out.weight)

    def _raw_at(self, size: tuple[int, int]) -> Tensor:
        x = self.coordinates(size)
        for conv in self.hidden:
            x = torch.atan(conv(x))
            x = torch.cat([x.view(1, self.n, -1, *size) / 0.67, x.view(1, self.n, -1, *size).square() / 0.6], 2)
            x = x.view(1, -1, *size)
        return self.out(x).view(self.n, self.channels, *size)

    def raw(self) -> Tensor:
        return self._raw_at(self.size)

    def render(self, size: int | Sequence[int]) -> Tensor:
        """The images at another size ``(N, C, H', W')``: the same pattern, sampled more or less finely."""
        saved = self.size
        self.size = _size(size)
        try:
            return self()
        finally:
            self.size = saved


class AlignedImage(ImageParam):
    """``n`` frames = shared low-resolution parameters + each frame's own Fourier parameters.

    The shared tensors (``shared``, batch 1, or 2 interpolated linearly across frames) are upsampled to the image;
    what they draw appears in every frame at the same place, so frames of an interpolation stay aligned (the
    article's aligned interpolation). The frames' own parameters are a :class:`FourierImage`. ``shared_weight``
    scales the shared part: Adam moves every parameter about as far per step, and a low-resolution pixel moves many
    image pixels at once, so at 1.0 the shared part dominates and 64-pixel frames come out nearly identical; at 0.1
    the segmenter's frames keep their layout and still change along the interpolation.
    """

    def __init__(self, n: int, channels: int, size: int | Sequence[int], decorrelate: Tensor | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), factors: Sequence[int] = (2, 4, 8, 16),
                 shared_weight: float = 0.1, sd: float = 0.01, seed: int = 0) -> None:
        super().__init__(n, channels, size, decorrelate, value_range)
        h, w = self.size
        self.shared_weight = shared_weight
        self.own = FourierImage(n, channels, size, sd=sd, seed=seed)
        shapes = [(1, f) for f in factors] + [(2, f) for f in factors if f >= 8]
        self.shared = nn.ParameterList(
            nn.Parameter(_normal((b, channels, max(1, h // f), max(1, w // f)), sd, seed + 1 + i))
            for i, (b, f) in enumerate(shapes)
        )

    def raw(self) -> Tensor:
        h, w = self.size
        x = self.own.raw()
        t = torch.linspace(0, 1, self.n, device=x.device, dtype=x.dtype)[:, None, None, None]
        for p in self.shared:
            up = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            x = x + self.shared_weight * (up if p.shape[0] == 1 else (1 - t) * up[:1] + t * up[1:])
        return x


class LatentParam(nn.Module):
    """A generator's latent as the optimised input: ``z (N, z_dim)`` or one ``w (N, w_dim)`` for every layer.

    ``start``: the first latents (z rows, e.g. ``sampler(seeds)``); with ``space="w"`` they are mapped by
    ``G.mapping`` first and the forward runs ``G.synthesis``. Needs a generator with ``mapping`` and ``synthesis``
    for ``"w"`` (``dissect.models.stylegan.Generator``); any latent-input model for ``"z"``.
    """

    is_image = False

    def __init__(self, generator: nn.Module, start: Tensor, space: str = "w", truncation_psi: float = 1.0) -> None:
        super().__init__()
        if space not in ("z", "w"):
            raise RequestError(f"space is 'z' or 'w', got {space!r}.")
        if space == "w" and not (hasattr(generator, "mapping") and hasattr(generator, "synthesis")):
            raise ModelError(f"{type(generator).__name__} has no mapping and synthesis networks: optimise z "
                             "(space='z') instead of w.")
        self.space = space
        with torch.no_grad():
            start = start.detach()
            latent = generator.mapping(start, truncation_psi) if space == "w" else start
        self.latent = nn.Parameter(latent.clone())
        self.n = latent.shape[0]

    def forward(self) -> Tensor:
        return self.latent

    def run(self, model: nn.Module, inputs: Tensor) -> Any:
        if self.space == "z":
            return model(inputs)
        return model.synthesis(inputs[:, None].expand(-1, model.num_ws, -1))


# ----------------------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------------------


def _choice(options: Sequence[Any], gen: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (1,), generator=gen))]


class Transform:
    """``transform(images (N, C, H, W), generator) -> images``: one random, differentiable change per step."""

    def __call__(self, images: Tensor, gen: torch.Generator) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Pad(Transform):
    """Pad every side by ``width`` pixels (reflected), so jitter and rotation do not always cut the border."""

    width: int
    mode: str = "reflect"

    def __call__(self, images: Tensor, gen: torch.Generator) -> Tensor:
        return F.pad(images, [self.width] * 4, mode=self.mode)


@dataclass(frozen=True)
class Jitter(Transform):
    """A random crop ``d`` pixels smaller on each axis: a random shift of up to ``d`` pixels."""

    d: int

    def __call__(self, images: Tensor, gen: torch.Generator) -> Tensor:
        h, w = images.shape[-2:]
        d = min(self.d, h - 1, w - 1)
        if d < 1:
            return images
        dy, dx = _choice(range(d + 1), gen), _choice(range(d + 1), gen)
        return images[..., dy : dy + h - d, dx : dx + w - d]


def _affine(images: Tensor, scale: float, angle: float) -> Tensor:
    """Zoom by ``scale`` and rotate by ``angle`` degrees about the centre, keeping the size (bilinear)."""
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    theta = images.new_tensor([[cos, -sin, 0.0], [sin, cos, 0.0]]).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class RandomScale(Transform):
    """Zoom by a factor drawn from ``scales``."""

    scales: tuple[float, ...]

    def __call__(self, images: Tensor, gen: torch.Generator) -> Tensor:
        return _affine(images, _choice(self.scales, gen), 0.0)


@dataclass(frozen=True)
class RandomRotate(Transform):
    """Rotate by an angle (degrees) drawn from ``angles``."""

    angles: tuple[float, ...]

    def __call__(self, images: Tensor, gen: torch.Generator) -> Tensor:
        return _affine(images, 1.0, _choice(self.angles, gen))


def standard_transforms(size: int | Sequence[int] = 64) -> list[Transform]:
    """Lucid's standard robustness transforms, their pixel amounts scaled to the image's size (Lucid's are for
    about 128-224 pixels): pad, jitter, scale 0.9-1.1, rotate ±10 degrees, a little more jitter."""
    side = max(_size(size))
    px = lambda p: max(1, round(p * side / 128))  # noqa: E731
    return [
        Pad(px(12)),
        Jitter(px(8)),
        RandomScale(tuple(1 + (i - 5) / 50 for i in range(11))),
        RandomRotate(tuple(range(-10, 11)) + (0,) * 5),
        Jitter(px(4)),
    ]


# ----------------------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------------------


def hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks registered on ``model``'s modules: 0 after every visualisation."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _resolve(model: nn.Module, objective: Objective) -> dict[Tap, str]:
    """Each tap's module name: the layer, or for ``"keys"`` the module whose input its keys are."""
    names = {}
    for layer, where in objective.taps:
        try:
            name = key_module_name(model, layer) if where == "keys" else layer
            get_module(model, name)
        except KeyError as exc:
            raise LayerError(exc.args[0]) from None
        names[(layer, where)] = name
    return names


def _activations(model: nn.Module, run: Runner, inputs: Tensor, names: dict[Tap, str]) -> Acts:
    """``run(model, inputs)`` stopped once every tapped layer has run; the taps' tensors (with their graph)."""
    with TraceDict(model, set(names.values()), retain_input=True, retain_output=True, stop=True, detach=False) as traces:
        run(model, inputs)
    acts = {}
    for (layer, where), name in names.items():
        trace = traces[name]
        found = trace.inputs if where == "keys" else trace.outputs
        if not found:
            raise LayerError(f"Layer {name!r} never ran in the forward of {type(model).__name__}: the input does not "
                             "reach it. Choose a layer on the path from the input to the output.")
        if not isinstance(found[-1], Tensor):
            raise LayerError(f"Layer {name!r} {'takes' if where == 'keys' else 'gives'} {type(found[-1]).__name__}, "
                             "not a tensor: choose one of its tensor-valued submodules.")
        acts[(layer, where)] = found[-1]
    return acts


def _probe(model: nn.Module, objective: Objective, run: Runner, inputs: Tensor, names: dict[Tap, str],
           is_image: bool = True) -> Acts:
    """The checks before any step: the model takes the inputs, reaches every layer, has every index."""
    try:
        acts = _activations(model, run, inputs, names)
    except DissectError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        kind = "images" if is_image else "latents"
        hint = (" If the model does not take images (a generator takes latents), optimise its latent with "
                "LatentParam; otherwise give the size, channels and value range it takes." if is_image else "")
        raise ModelError(f"{type(model).__name__} failed on {kind} of shape {tuple(inputs.shape)}: "
                         f"{type(exc).__name__}: {exc}.{hint}") from exc
    objective.check(acts)
    return acts


@dataclass
class Result:
    """What :func:`visualise` found.

    ``images``: ``(N, C, H, W)`` the optimised images (for a latent, the generator's images of it); ``inputs``: what
    the model took (images, z or w); ``values (N,)``: the objective of the final inputs without transformations;
    ``history``: the batch's mean objective at each step (under that step's transformations); ``steps``: steps run
    (fewer when a callback stopped it); ``seconds``: wall time.
    """

    images: Tensor
    inputs: Tensor
    values: Tensor
    history: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def visualise(
    model: nn.Module,
    objective: Objective,
    param: nn.Module,
    steps: int = 128,
    lr: float = 0.05,
    transforms: Sequence[Transform] | None = (),
    seed: int = 0,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[int, float, Tensor], bool | None] | None = None,
) -> Result:
    """Maximise ``objective`` of ``model`` over ``param``'s tensors with Adam for ``steps`` steps.

    Args:
        model: any ``nn.Module``; run in eval mode, its weights untouched (no gradients accumulate in it).
        objective: what to maximise (its per-image scores are summed).
        param: an :class:`ImageParam` (its size and channels must be what the model takes) or a :class:`LatentParam`.
            Moved to the model's device; float parameters take the model's dtype when that is float32 or float64.
        transforms: random :class:`Transform` s applied to images each step (e.g. :func:`standard_transforms`),
            drawn from a generator seeded by ``seed``; images are resized back to the parameterisation's size after.
        preprocess: applied to images last (e.g. a classifier's normalisation).
        callback: ``callback(step, mean objective, images)`` after each step; returning False stops early.

    Raises (before any step): :class:`~dissect.errors.LayerError` for a layer the model lacks or the input does not
    reach, :class:`~dissect.errors.RequestError` for an index out of range, :class:`~dissect.errors.ModelError` when
    the model does not take the parameterisation's inputs.
    """
    if steps < 0:
        raise RequestError(f"steps must be >= 0, got {steps}.")
    transforms = list(transforms or ())
    if transforms and not param.is_image:
        raise RequestError("Transformations apply to images; a latent parameterisation takes none (transforms=None).")
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None and ref.dtype in (torch.float32, torch.float64) else torch.float32
    param = param.to(device=model_device(model), dtype=dtype)
    names = _resolve(model, objective)
    gen = torch.Generator().manual_seed(seed)
    in_dtype = ref.dtype if ref is not None else dtype

    def model_input(x: Tensor, transform: bool) -> Tensor:
        if param.is_image:
            if transform and transforms:
                size = x.shape[-2:]
                for t in transforms:
                    x = t(x, gen)
                if x.shape[-2:] != size:
                    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
            if preprocess is not None:
                x = preprocess(x)
        return x.to(in_dtype)

    start = time.perf_counter()
    history: list[float] = []
    tensors = [p for p in param.parameters() if p.requires_grad]
    with eval_mode(model):
        with torch.no_grad():
            _probe(model, objective, param.run, model_input(param(), False), names, param.is_image)
        optimiser = torch.optim.Adam(tensors, lr=lr)
        done = 0
        for step in range(steps):
            score = objective(_activations(model, param.run, model_input(param(), True), names))
            grads = torch.autograd.grad(-score.sum(), tensors, allow_unused=True)
            for p, g in zip(tensors, grads):
                p.grad = g
            optimiser.step()
            done = step + 1
            history.append(float(score.detach().float().mean()))
            if callback is not None and callback(step, history[-1], param().detach()) is False:
                break
        with torch.no_grad():
            inputs = param()
            values = objective(_activations(model, param.run, model_input(inputs, False), names)).float()
            images = inputs if param.is_image else param.run(model, inputs)
    return Result(images.detach(), inputs.detach(), values.detach().cpu(), history, done, time.perf_counter() - start)


def style_transfer(
    model: nn.Module,
    content: Tensor,
    style: Tensor,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    param: ImageParam | None = None,
    style_weight: float = 10.0,
    steps: int = 256,
    lr: float = 0.05,
    transforms: Sequence[Transform] | None = (),
    seed: int = 0,
) -> Result:
    """Paint ``content (1, C, H, W)`` in the style of ``style (1, C, H', W')`` through ``model``'s features.

    The objective matches ``content_layers``' activations of the content image and the Gram matrices of
    ``style_layers`` of the style image. By default the image is a decorrelated :class:`FourierImage` (colour
    correlation of the content and style images), which the article shows makes style transfer work on networks
    other than VGG.
    """
    if content.dim() != 4 or style.dim() != 4 or content.shape[1] != style.shape[1]:
        raise RequestError(f"content and style are images (1, C, H, W) with the same C; got {tuple(content.shape)} "
                           f"and {tuple(style.shape)}.")
    if param is None:
        both = torch.cat([content.flatten(2), style.flatten(2)], 2)[..., None]
        param = FourierImage(1, content.shape[1], content.shape[-2:], decorrelate=colour_correlation(both), seed=seed)
    if not content_layers or not style_layers:
        raise RequestError("Name at least one content layer and one style layer.")
    layers = list(dict.fromkeys([*content_layers, *style_layers]))
    probe = channel(layers[0], 0)
    names = _resolve(model, Objective(tuple((name, "output") for name in layers), probe.fn, "style"))
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        content_acts = _probe(model, probe, nn.Module.__call__, content.to(device), names)
        style_acts = _probe(model, probe, nn.Module.__call__, style.to(device), names)
    content_term = functools.reduce(operator.add, [match_activations(n, content_acts[(n, "output")]) for n in content_layers])
    style_term = functools.reduce(operator.add, [match_style(n, style_acts[(n, "output")]) for n in style_layers])
    return visualise(model, content_term + style_weight * style_term, param, steps=steps, lr=lr, transforms=transforms,
                     seed=seed)
