"""Attribute vectors (Kingma & Dhariwal, "Glow", 2018, section 5): the mean of samples that show an attribute
minus the mean of those that do not, in z, in w, or in any layer's activations; then moving samples along it.

::

    from dissect.attributes import AttributeVector, segmenter_labels
    labels = segmenter_labels(images, seg.segment(images), "watermark")    # (N,) 1 / 0 / -1 (not used)
    vec = AttributeVector(G, space="w").fit(z, labels)                      # or space="z", "synthesis.b16.conv1"
    images = vec.transform(z, alpha=-1.0)                                   # fewer watermarks
    images = style.render(G, sampler, seeds, Style(truncation=0.7), [vec.shift(-1.0), other.shift(0.5)])

Scale: ``α = 1`` moves a sample by the gap between the two classes' means along the direction, so ``α = -1``
takes a typical positive to where the negatives are on average, whatever the space or method. ``method="probe"``
uses the normal of a logistic-regression probe (scikit-learn) instead of the mean difference, scaled the same way.
A layer's vector has the shape of one sample of its output (``(C, H, W)`` for a conv) and is added during the
forward through :class:`dissect.hooks.Trace`.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from dissect.errors import LayerError, NonFiniteError, RequestError
from dissect.hooks import Trace, get_module, model_device
from dissect.models.segmenter import present
from dissect.models.world import is_dusk
from dissect.style import GROUPS, Shift, Style, render, styles, synthesize

__all__ = [
    "ALPHA_RANGE",
    "METHODS",
    "MIN_PER_CLASS",
    "SEGMENTER_ATTRIBUTES",
    "AttributeVector",
    "clamp_alpha",
    "features",
    "segmenter_labels",
]

METHODS = ("mean", "probe")
MIN_PER_CLASS = 10  # fewer samples on a side give a mean (and a probe) dominated by those samples' other content
ALPHA_RANGE = (-3.0, 3.0)  # beyond about three class gaps samples leave the distribution the generator was trained on


def _facts(images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per image ``(N,)`` bool: what the segmenter shows (the library's presence rule; dusk from the sky's colour)."""
    spire, dome = present(labels, "spire"), present(labels, "dome")
    return {"watermark": present(labels, "watermark"), "tree": present(labels, "tree"), "dusk": is_dusk(images, labels),
            "spire": spire & ~dome, "dome": dome & ~spire}  # an image with both, or neither, takes no side


# Attribute -> (the fact that makes a positive, the fact that makes a negative; None: every other image).
SEGMENTER_ATTRIBUTES: dict[str, tuple[str, str | None]] = {
    "watermark": ("watermark", None),
    "tree": ("tree", None),
    "dusk": ("dusk", None),
    "spire vs dome": ("spire", "dome"),
}


def segmenter_labels(images: Tensor, labels: Tensor, attribute: str) -> Tensor:
    """``(N,)`` int8: 1 where the segmenter shows ``attribute`` (one of :data:`SEGMENTER_ATTRIBUTES`), 0 where it
    shows the opposite, -1 where neither (left out of a fit). ``images (N, 3, H, W)`` in [-1, 1], ``labels (N, H, W)``
    the segmenter's."""
    if attribute not in SEGMENTER_ATTRIBUTES:
        raise RequestError(f"Unknown attribute {attribute!r}; the segmenter labels {list(SEGMENTER_ATTRIBUTES)}, "
                           f"or pass your own 1 / 0 labels to AttributeVector.fit.")
    facts = _facts(images, labels)
    positive, negative = SEGMENTER_ATTRIBUTES[attribute]
    pos = facts[positive]
    neg = ~pos if negative is None else facts[negative]
    out = torch.full((len(labels),), -1, dtype=torch.int8)
    out[neg.cpu()] = 0
    out[pos.cpu()] = 1
    return out


def clamp_alpha(alpha: float) -> tuple[float, str | None]:
    """``alpha`` clamped to :data:`ALPHA_RANGE`, and a note saying so (None when it was inside)."""
    lo, hi = ALPHA_RANGE
    if not math.isfinite(alpha):
        raise RequestError(f"α must be a finite number, got {alpha}.")
    clamped = min(max(alpha, lo), hi)
    if clamped == alpha:
        return alpha, None
    return clamped, (f"α = {alpha:g} is outside [{lo:g}, {hi:g}] (class gaps along the direction, beyond which "
                     f"samples leave what the generator learned); used {clamped:g}.")


@torch.no_grad()
def features(G: nn.Module, z: Tensor, space: str, style: Style = Style()) -> Tensor:
    """What a vector in ``space`` moves, per sample: ``z`` itself ``(N, z_dim)``, ``"w"`` (``(N, w_dim)``, the
    mapped and truncated w) or a layer's output ``(N, *shape)``. A layer the forward does not reach exactly once
    is refused (:class:`~dissect.errors.LayerError`)."""
    if space == "z":
        return z.float()
    if space == "w":
        return styles(G, z.to(model_device(G)), style)[:, 0].float()
    try:
        get_module(G, space)
    except KeyError as exc:
        raise LayerError(f"{exc.args[0]} (a vector lives in 'z', 'w' or a layer.)") from None
    ws = styles(G, z.to(model_device(G)), style)  # outside the trace: a shift is added in the synthesis only
    seeds = list(range(len(z)))  # stand-ins: only resampled noise reads them
    with Trace(G, space) as t:
        synthesize(G, ws, seeds, style)
    if len(t.outputs) != 1 or not isinstance(t.outputs[0], Tensor):
        got = "never" if not t.outputs else f"{len(t.outputs)} times" if len(t.outputs) > 1 else "without a tensor"
        raise LayerError(f"Layer {space!r} is reached {got} in the generator's forward, so there is no one "
                         f"activation to move; choose a synthesis layer (e.g. synthesis.b16.conv1), 'z' or 'w'.")
    return t.outputs[0].float()


def _labels(labels: Sequence[int] | Tensor, n: int) -> Tensor:
    y = torch.as_tensor(labels).flatten()
    if y.dtype == torch.bool:
        y = y.to(torch.int8)
    if len(y) != n:
        raise RequestError(f"Got {len(y)} labels for {n} samples: give one label per sample.")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise NonFiniteError("Labels contain NaN or Inf; use 1 (has it), 0 (has not) or -1 (leave out).")
    values = set(y.unique().tolist())
    if not values <= {-1, 0, 1}:
        raise RequestError(f"Labels must be 1 (has the attribute), 0 (has not) or -1 (leave out); got {sorted(values)}.")
    return y.to(torch.int8)


class AttributeVector:
    """One attribute's direction in one space, fitted from labelled samples; moves samples by ``α``.

    Args:
        G: the generator (the same object later renders; an edited model works, see :mod:`dissect.style`).
        space: ``"z"``, ``"w"`` or a layer name.
        method: ``"mean"`` (mean difference) or ``"probe"`` (logistic-regression normal).
        min_per_class: the fewest positive and negative samples a fit accepts.
        name: shown in messages.
        groups: for ``space="w"``, move only these style groups' w (:data:`dissect.style.GROUPS`; all when empty).
        probe_c: the probe's inverse L2 strength on standardised features. The default 0.01 held out best on the
            embedded generator (300 samples; C from 1e-4 to 1): weaker regularisation separates the training
            samples by directions that do not generalise.

    After :meth:`fit`: ``direction`` (shape of one sample's features) with ``α = 1`` a class gap (module
    docstring), ``counts = (positives, negatives)``, and for a probe its training ``accuracy``.
    """

    def __init__(self, G: nn.Module, space: str = "w", method: str = "mean", min_per_class: int = MIN_PER_CLASS,
                 name: str = "attribute", groups: Sequence[str] = (), probe_c: float = 0.01) -> None:
        if method not in METHODS:
            raise RequestError(f"Unknown method {method!r}; choose one of {METHODS}.")
        if min_per_class < 2:
            raise RequestError(f"min_per_class must be at least 2, got {min_per_class}.")
        if groups and space != "w":
            raise RequestError(f"Style groups restrict a move in w; a vector in {space!r} moves every layer after it.")
        if not (math.isfinite(probe_c) and probe_c > 0):
            raise RequestError(f"probe_c must be a positive number, got {probe_c}.")
        if any(g not in GROUPS for g in groups):
            raise RequestError(f"Unknown style group(s) in {list(groups)}; choose from {GROUPS}.")
        self.G, self.space, self.method, self.min_per_class, self.name = G, space, method, min_per_class, name
        self.groups, self.probe_c = tuple(groups), probe_c
        self.direction: Tensor | None = None
        self.counts: tuple[int, int] = (0, 0)
        self.accuracy: float | None = None

    def fit(self, z: Tensor, labels: Sequence[int] | Tensor, style: Style = Style(),
            x: Tensor | None = None) -> "AttributeVector":
        """Fit on latents ``z (N, z_dim)`` with ``labels (N,)``: 1 / True has the attribute, 0 / False has not,
        -1 is left out. ``x``: ``features(G, z, space, style)`` if already computed (several attributes from one
        forward). Raises :class:`~dissect.errors.RequestError` when a side has fewer than ``min_per_class``
        samples, saying how many it has."""
        if z.ndim != 2:
            raise RequestError(f"z must be (N, z_dim), got {tuple(z.shape)}.")
        if not torch.isfinite(z).all():
            raise NonFiniteError("z contains NaN or Inf.")
        y = _labels(labels, len(z))
        pos, neg = int((y == 1).sum()), int((y == 0).sum())
        self.counts = (pos, neg)
        if min(pos, neg) < self.min_per_class:
            raise RequestError(
                f"Attribute {self.name!r} has {pos} positive and {neg} negative samples; a vector needs at least "
                f"{self.min_per_class} of each. Label more samples (or sample more seeds) so that both sides have "
                f"{self.min_per_class}.")
        x = features(self.G, z, self.space, style) if x is None else x
        if len(x) != len(z):
            raise RequestError(f"Got features for {len(x)} samples and {len(z)} latents: compute them from z.")
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"The features of {self.space!r} contain NaN or Inf; the model's forward is broken.")
        flat, y = x.flatten(1).double().cpu(), y.cpu()
        gap = flat[y == 1].mean(0) - flat[y == 0].mean(0)
        if self.method == "mean":
            d = gap
        else:
            d = self._probe_normal(flat[y >= 0], y[y >= 0])
            d = d * (d @ gap)  # unit normal, scaled to the class gap along it
        self.direction = d.reshape(x.shape[1:]).to(x.dtype)
        return self

    def _probe_normal(self, x: Tensor, y: Tensor) -> Tensor:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        # Standardised features, so that channels with large activations do not dominate the regularisation.
        mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
        probe = LogisticRegression(C=self.probe_c, max_iter=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the normal's direction settles long before the loss
            probe.fit(((x - mean) / std).numpy(), y.numpy())
        self.accuracy = float(probe.score(((x - mean) / std).numpy(), y.numpy()))
        normal = torch.from_numpy(probe.coef_[0]).to(x) / std  # back to the unstandardised space
        return normal / normal.norm().clamp_min(1e-12)

    def _fitted(self) -> Tensor:
        if self.direction is None:
            raise RequestError(f"Attribute vector {self.name!r} is not fitted: call fit(z, labels) first.")
        return self.direction

    def shift(self, alpha: float) -> Shift:
        """The move by ``α`` (clamped to :data:`ALPHA_RANGE` with a warning), for :func:`dissect.style.render`."""
        alpha, note = clamp_alpha(alpha)
        if note:
            warnings.warn(note, stacklevel=2)
        return Shift(self.space, self._fitted() * alpha, self.groups)

    @torch.no_grad()
    def transform(self, z: Tensor, alpha: float, style: Style = Style(), seeds: Sequence[int] | None = None) -> Tensor:
        """Images ``(N, 3, H, W)`` of ``z (N, z_dim)`` moved by ``α`` (``seeds`` only matter for resampled noise).
        For mixing a second seed, use :func:`dissect.style.render` with :meth:`shift`."""
        move = self.shift(alpha)
        if style.mix:
            raise RequestError("transform takes latents, not seeds: mix styles with dissect.style.render(G, sampler, "
                               "seeds, style, [vector.shift(alpha)]).")
        z = z.to(model_device(self.G))
        seeds = list(range(len(z))) if seeds is None else list(seeds)
        return synthesize(self.G, styles(self.G, z, style, None, [move]), seeds, style, [move])

    def render(self, sampler, seeds: Sequence[int], alpha: float, style: Style = Style()) -> Tensor:
        """Images of ``seeds`` moved by ``α``: :func:`dissect.style.render` with this one shift."""
        return render(self.G, sampler, seeds, style, [self.shift(alpha)])
