"""Rewriting what a layer has learned: edit requests, the solver, and a per-model edit stack with save / load.

A rewrite stores new key -> value pairs in a layer's memory (see :mod:`dissect.memory`) with the least change
to everything else: ``W₁ = W₀ + Λ D`` where ``D (r, C)`` are the context directions and only ``Λ`` depends on the
target values. Requests say what to store:

* :class:`Copy` + :class:`Paste`: values copied from a region of one image, pasted into another image;
* :class:`Erase`: the values a region would have without the context's most aligned key units (the authors'
  watermark removal);
* :class:`Context`: where the rule applies (images + masks, or a key cluster), giving ``D`` of rank r.

Every target request subclasses :class:`Request` and turns itself into a :class:`Constraint`; a new kind is one
subclass in one file (it registers itself, for edit files and the CLI's JSON).

:func:`solve` finds ``Λ`` without touching the model. It minimises the paper's objective
``L_constraint + μ · L_smooth``: ``L_smooth = E_k ‖ΔW k‖²`` over the data, which for ``D C Dᵀ = I`` is ``‖Λ‖²``
(per kernel tap), so a rule that needs a huge change everywhere to fit a few request locations is not stored.
``μ`` is chosen by a budget on what users see change: the smallest ``μ`` whose ``E‖ΔW k‖²`` is at most
``budget`` of the layer's own output energy ``E‖W k‖²``. The layer's linear part is solved in closed form (ridge
least squares); a layer with a nonlinear rest (demodulation, noise, bias, activation) is then refined by L-BFGS on
``Λ`` alone through the real layer, on the same objective. :class:`Rewriter` applies edits with bitwise undo /
redo / revert, trials, and saves them as checksummed safetensors (``Λ``, ``D``, the requests, JSON metadata).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Iterator, Protocol, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_model
from torch import Tensor, nn
from torch.func import functional_call

import dissect
from dissect.errors import EditFileError, LayerError, NonFiniteError, RequestError
from dissect.hooks import Trace, call_model, model_device, to_device
from dissect.memory import (
    Inputs,
    KeyClusters,
    LayerMemory,
    Recording,
    bounding_boxes,
    channels_last,
    concat_rows,
    eval_mode,
    num_rows,
    positive_rank,
    rank_by_peak,
    select_rows,
)

__all__ = [
    "Request", "Copy", "Paste", "Context", "Erase", "Constraint", "Edit", "constraint", "constraint_loss", "solve",
    "Rewriter", "load", "read_edits", "weight_sha256", "check_strength", "DEFAULT_BUDGET", "SpecReader",
    "calibrate_strength", "Calibration", "goal_output", "mask_centre", "mask_parts"
]

FORMAT = "dissect-edits/2"  # /2: every tensor carries a SHA-256 in the metadata
MAX_STRENGTH = 20.0  # beyond this a "rule" is a blow-up of the weight, not a stronger rule
# An edit may change the layer's output, averaged over the data, by at most this share of its energy E‖W k‖²: a
# cautious library default. The dashboard's per-kind budgets (dashboard.requests.RECOMMENDED) were chosen on
# simulated user requests (benchmarks/eval_user.py, benchmarks/RESULTS.md).
DEFAULT_BUDGET = 0.02
# calibrate_strength tries these strengths on at most this many held-out context images.
CALIBRATION_STRENGTHS = (0.5, 1.0, 1.5, 2.5, 4.0, 6.0)
CALIBRATION_IMAGES = 8

_PARTS: dict[str, type] = {}  # every dataclass a saved request may hold, by class name (read_edits needs them)


def _part(cls: type) -> type:
    _PARTS[cls.__name__] = cls
    return cls


def check_strength(factor: Any) -> float:
    """``factor`` as a float, or :class:`RequestError` unless it is a number in (0, MAX_STRENGTH]."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
        math.isfinite(factor) and 0 < factor <= MAX_STRENGTH
    ):
        raise RequestError(f"An edit's strength factor must be a positive number up to {MAX_STRENGTH:g} (1 = the "
                           f"solved edit), got {factor!r}.")
    return float(factor)


Buffers = list[tuple[nn.Module, dict[str, Any]]]


def _buffer_slots(module: nn.Module) -> Buffers:
    """Every submodule's buffer slots (a hold adds one), to put back with :func:`_restore_buffers`."""
    return [(m, dict(m._buffers)) for m in module.modules()]


def _restore_buffers(slots: Buffers) -> None:
    for module, state in slots:
        module._buffers.clear()
        module._buffers.update(state)


def _check_finite(what: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} holds NaN or Inf values; nothing was solved. Check the model's weights and "
                             f"inputs (a diverged checkpoint, a sampler returning NaN).")


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------


class SpecReader(Protocol):
    """What a request kind needs to read itself from a JSON request (the CLI implements it)."""

    def inputs(self, seeds: list[int]) -> Inputs: ...
    def seed(self, entry: Any, what: str) -> int: ...
    def mask(self, entry: Any, what: str) -> Tensor: ...
    def regions(self, entry: Any, what: str) -> tuple[list[int], Tensor]: ...


@_part
@dataclass
class Copy:
    """A region of one source image: its values, cropped to the mask's bounding box, with the mask as alpha.

    ``inputs``: one row of model input; ``mask (H, W)`` at image resolution (``None`` for a layer with one key
    per row); ``seeds``: optional provenance, kept in saved files.
    """

    inputs: Inputs
    mask: Tensor | None
    seeds: list[int] | None = None


@_part
@dataclass
class Context:
    """Where a rule applies: images and masks ``(N, H, W)``, giving rank-``rank`` directions ``D``."""

    inputs: Inputs
    masks: Tensor | None
    rank: int = 1
    seeds: list[int] | None = None

    def __post_init__(self) -> None:
        self.rank = positive_rank(self.rank)

    @classmethod
    def from_cluster(cls, clusters: KeyClusters, cluster: int, inputs: Inputs, rank: int = 1,
                     seeds: list[int] | None = None) -> "Context":
        """The context of key cluster ``cluster`` in the rows of ``inputs`` that show it (but not everywhere)."""
        masks = clusters.masks(inputs, cluster)
        cover = masks.reshape(masks.shape[0], -1).mean(dim=1)
        keep = ((cover > 0) & (cover < 1)).nonzero()[:, 0].cpu()
        if len(keep) == 0:
            raise RequestError(f"Cluster {cluster} covers none (or all) of every image given: pass other images.")
        kept_seeds = [seeds[int(i)] for i in keep] if seeds is not None else None
        return cls(select_rows(inputs, keep), masks[keep], rank, kept_seeds)

    def grown(self, memory: LayerMemory, pool: Inputs, n: int = 16, quantile: float = 0.99,
              pool_seeds: Sequence[int] | None = None) -> "Context":
        """This context plus the ``n`` images of ``pool`` whose keys match it best, each masked where its match
        score ``‖D k‖`` passes the ``quantile`` of every score over the pool (what the key-match view outlines):
        a context brushed on a few images, thickened by the model's own matches. ``pool_seeds`` (one per row)
        are kept as provenance; images already in the context (by seed) are skipped."""
        d = memory.directions(self.inputs, self.masks, self.rank)
        keys = memory.keys(pool)
        scores = memory.match_keys(d, keys)  # (N, *grid)
        level = torch.quantile(scores.flatten().float(), quantile)
        taken = set(self.seeds or [])
        order, peak = rank_by_peak(scores)
        chosen = [int(i) for i, p in zip(order, peak) if p > level
                  and (pool_seeds is None or pool_seeds[int(i)] not in taken)][:n]
        if not chosen:
            return self
        hits = (scores[chosen] > level).to(self.masks.dtype if self.masks is not None else torch.float32)
        grid = memory.grid(keys)
        if len(grid) == 2:
            size = memory.mask_size(pool, grid)
            hits = torch.nn.functional.interpolate(hits[:, None], size=tuple(size), mode="nearest")[:, 0]
        index = torch.tensor(chosen)
        seeds = None if self.seeds is None or pool_seeds is None else list(self.seeds) + [pool_seeds[i] for i in chosen]
        masks = torch.cat([self.masks, hits.to(self.masks)]) if self.masks is not None else None
        return Context(concat_rows(self.inputs, select_rows(pool, index)), masks, self.rank, seeds)

    @classmethod
    def from_json(cls, spec: Any, reader: SpecReader) -> "Context":
        seeds, masks = reader.regions(spec, "context")
        return cls(reader.inputs(seeds), masks, rank=spec.get("rank", 1), seeds=seeds)


class Request:
    """A target request: what a rewrite should store. Subclasses are dataclasses that implement
    :meth:`constraint`; defining one registers it (``Request.kinds``), so edit files can hold it, and a class
    with ``json_key`` can be read from the CLI's JSON by :meth:`from_json`."""

    kinds: ClassVar[dict[str, type["Request"]]] = {}
    json_key: ClassVar[str | None] = None  # the key that names this kind in a JSON request

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Request.kinds[cls.__name__] = cls
        _PARTS[cls.__name__] = cls

    def constraint(self, memory: LayerMemory, context: Context | None) -> tuple["Constraint", Context]:
        """The constraint this request sets at ``memory``'s layer, and its context (``context``, or this kind's
        default)."""
        raise NotImplementedError

    def at(self, inputs: Inputs, mask: Tensor) -> list["Request"]:
        """The same request made on another image: ``inputs`` (one row), where ``mask (H, W)`` marks what the
        request's own region marked in its image; one request per object where the kind acts on one (a paste
        lands on each brushed spire). :func:`calibrate_strength` renders these together as a held-out goal."""
        raise RequestError(f"A {type(self).__name__} request cannot be moved onto other images, so its strength "
                           f"cannot be calibrated on them: pass a strength instead.")

    @classmethod
    def from_json(cls, spec: dict, reader: SpecReader) -> "Request":
        raise NotImplementedError(f"{cls.__name__} cannot be read from a JSON request.")

    @staticmethod
    def from_spec(spec: dict, reader: SpecReader) -> tuple["Request", Context | None]:
        """The target and optional context that one JSON request describes (the kind is the one registered key
        it holds: ``"erase"``, ``"paste"``, …)."""
        kinds = [k for k in Request.kinds.values() if k.json_key and k.json_key in spec]
        if len(kinds) != 1:
            keys = ", ".join(repr(k.json_key) for k in Request.kinds.values() if k.json_key)
            raise RequestError(f"A request names exactly one kind, one of the keys {keys}; got "
                               f"{sorted(spec) if isinstance(spec, dict) else spec!r}.")
        target = kinds[0].from_json(spec, reader)
        context = Context.from_json(spec["context"], reader) if "context" in spec else None
        return target, context


@dataclass
class Constraint:
    """What a rewrite must store: the keys recorded in ``rec`` should make the layer emit ``target`` (and its
    weight emit ``linear_target``) at the output locations where ``weights (N, *grid)`` is positive."""

    rec: Recording
    linear_target: Tensor
    target: Tensor
    weights: Tensor


def _one_row(inputs: Inputs, what: str) -> None:
    if num_rows(inputs) != 1:
        raise RequestError(f"{what} takes one image (one row of inputs), got {num_rows(inputs)}.")


def _record(memory: LayerMemory, inputs: Inputs, zero_units: Tensor | None = None) -> Recording:
    rec = memory.record(inputs, zero_units)
    if not isinstance(rec.values, Tensor):
        raise LayerError(f"Layer {memory.layer!r} returns {type(rec.values).__name__}; a rewrite needs a tensor output.")
    if memory.grid(rec.linear) != memory.grid(rec.values):
        raise LayerError(
            f"Layer {memory.layer!r} emits a {memory.grid(rec.values)} grid from a {memory.grid(rec.linear)} grid of "
            f"its weight {memory.key_layer!r}; rewrite the weight's own module instead."
        )
    return rec


def mask_centre(mask: Tensor) -> tuple[int, int]:
    """The ``(y, x)`` pixel at the centre of mass of ``mask (H, W)``: where a paste onto that region is centred."""
    if not mask.sum() > 0:
        raise RequestError("An empty mask has no centre: brush the region first.")
    ys, xs = torch.meshgrid(torch.arange(mask.shape[0]), torch.arange(mask.shape[1]), indexing="ij")
    m = mask.detach().float().cpu()
    return int((ys * m).sum() / m.sum()), int((xs * m).sum() / m.sum())


def mask_parts(mask: Tensor) -> list[Tensor]:
    """The 8-connected parts of ``mask (H, W)``, largest first, each a bool ``(H, W)``: the separate objects a
    brush marked. (Labels spread as a running max over 3x3 neighbourhoods until they settle.)"""
    m = mask.detach().bool().cpu()
    labels = torch.arange(1, m.numel() + 1, dtype=torch.float32).view(m.shape) * m
    while True:
        spread = torch.nn.functional.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * m
        if torch.equal(spread, labels):
            break
        labels = spread
    parts = [labels == v for v in labels.unique() if v > 0]
    return sorted(parts, key=lambda p: -int(p.sum()))


def _shift(x: Tensor, offsets: Sequence[int]) -> Tensor:
    """``x (N, *grid, ...)`` moved by ``offsets`` cells along the grid axes, zero-filled."""
    out = torch.zeros_like(x)
    src, dst = [slice(None)], [slice(None)]
    for o, g in zip(offsets, x.shape[1:]):
        src.append(slice(max(0, -o), max(0, min(g, g - o))))
        dst.append(slice(max(0, o), max(0, min(g, g + o))))
    out[tuple(dst)] = x[tuple(src)]
    return out


def _blend(alpha: Tensor, new: Tensor, old: Tensor, channel_dim: int) -> Tensor:
    a = alpha.unsqueeze(channel_dim)
    return a * new + (1 - a) * old


@dataclass
class Paste(Request):
    """Paste a :class:`Copy` into one target image with its centre at ``position (y, x)`` in image pixels.

    The constraint is the target's keys over the pasted box, mapped to the blended values
    ``alpha · copied + (1 - alpha) · own``. ``position=None`` keeps the copied box where it was.
    ``region (H, W)``: paste *onto* this part of the target image only (a mask like the copy's; the constraint
    keeps the box's locations where it is > 0). Pasting a tree onto a spire, the region is the spire: the sky
    around it then need not turn into tree, which would take a far larger edit than the rule itself.
    Default context: the pasted region of the target image, rank 1.
    """

    inputs: Inputs
    copy: Copy
    position: tuple[int, ...] | None = None
    seeds: list[int] | None = None
    region: Tensor | None = None

    json_key: ClassVar[str] = "paste"

    @classmethod
    def from_json(cls, spec: dict, reader: SpecReader) -> "Paste":
        source, dest = spec.get("copy"), spec["paste"]
        if not isinstance(source, dict):
            raise RequestError("A paste request needs a 'copy' object: {\"seed\": …, \"box\" or \"mask\": …}.")
        seed = reader.seed(source, "copy")
        copied = Copy(reader.inputs([seed]), reader.mask(source, "copy"), seeds=[seed])
        center = dest.get("center") if isinstance(dest, dict) else None
        if center is not None and not (isinstance(center, list) and len(center) == 2
                                       and all(isinstance(v, int) and not isinstance(v, bool) for v in center)):
            raise RequestError(f"paste: 'center' is [y, x] in integer image pixels, got {center!r}.")
        seed = reader.seed(dest, "paste")
        region = reader.mask(dest["region"], "paste region") if isinstance(dest, dict) and "region" in dest else None
        return cls(reader.inputs([seed]), copied, tuple(center) if center else None, seeds=[seed], region=region)

    def at(self, inputs: Inputs, mask: Tensor) -> list["Paste"]:
        """The same copy pasted onto each object ``mask (H, W)`` marks in another image (its connected parts: the
        centre of two spires lies in the sky between them), centred on it, and onto it alone when this paste is
        onto a region."""
        return [Paste(inputs, self.copy, mask_centre(part), region=part.to(mask) if self.region is not None else None)
                for part in mask_parts(mask)]

    def constraint(self, memory: LayerMemory, context: Context | None) -> tuple[Constraint, Context]:
        _one_row(self.copy.inputs, "Copy")
        _one_row(self.inputs, "Paste")
        src = _record(memory, self.copy.inputs)
        rec = _record(memory, self.inputs)
        cd = memory.adapter.channel_dim
        grid = memory.grid(rec.values)
        alpha = memory.mask_weights(self.copy.mask, self.copy.inputs, src.values)  # (1, *grid)
        offsets = [0] * len(grid)
        ctx_mask = self.copy.mask
        if self.position is not None:
            if not grid:
                raise RequestError(f"Layer {memory.layer!r} has one key per row: paste with position=None.")
            size = memory.mask_size(self.inputs, grid)
            if len(self.position) != len(grid):
                raise RequestError(f"Paste position must be {len(grid)} image coordinates, got {self.position}.")
            box_idx = bounding_boxes(alpha)[0].nonzero().float()
            centre = (box_idx.amin(0) + box_idx.amax(0) + 1) / 2
            offsets = [round((p + 0.5) * g / s - c) for p, g, s, c in zip(self.position, grid, size, centre.tolist())]
            # The same move at image resolution, for the default context (exact when the image is a multiple of the grid).
            ctx_mask = _shift(self.copy.mask[None], [round(o * s / g) for o, s, g in zip(offsets, size, grid)])[0]
        alpha_t = _shift(alpha, offsets)
        weights = _shift(bounding_boxes(alpha), offsets)
        if weights.sum() == 0:
            raise RequestError(f"Paste position {self.position} puts the copied region outside the image.")
        if self.region is not None:
            weights = weights * (memory.mask_weights(self.region[None], self.inputs, rec.values) > 0)
            if weights.sum() == 0:
                raise RequestError("The paste region does not meet the pasted copy: draw the region where the copy lands, "
                                   "or move the paste position onto it.")
        moved = lambda v: _shift(channels_last(v, cd), offsets).movedim(-1, cd)  # noqa: E731
        c = Constraint(
            rec,
            linear_target=_blend(alpha_t, moved(src.linear), rec.linear, cd),
            target=_blend(alpha_t, moved(src.values), rec.values, cd),
            weights=weights,
        )
        if ctx_mask is not None and ctx_mask.max() == 0:
            raise RequestError(f"Paste position {self.position} moves the copied mask off the image.")
        return c, context or Context(self.inputs, ctx_mask, rank=1, seeds=self.seeds)


def _surround(x: Tensor, hole: Tensor, channel_dim: int, iters: int = 200) -> Tensor:
    """``x`` with its values over ``hole (N, *grid)`` bool replaced by a harmonic fill from the locations around
    it: every hole location the mean of its grid neighbours, iterated (Laplace's equation with the surroundings as
    the boundary), so the surroundings continue smoothly across the hole."""
    v = channels_last(x, channel_dim)
    h = hole[..., None].to(v.dtype)
    dims = tuple(range(1, v.dim() - 1))
    outside = (1 - h).sum(dims, keepdim=True)
    if (outside == 0).any():
        raise RequestError("An erased region covers the whole image, so nothing around it shows what should be "
                           "there: brush only what to remove.")
    known = v * (1 - h)
    v = known + h * known.sum(dims, keepdim=True) / outside
    ones = torch.ones_like(h)
    steps = [[o if a == axis else 0 for a in range(len(dims))] for axis in range(len(dims)) for o in (-1, 1)]
    count = sum(_shift(ones, s) for s in steps)
    for _ in range(iters):
        v = known + h * sum(_shift(v, s) for s in steps) / count
    return v.movedim(-1, channel_dim)


def _dilate(mask: Tensor, reach: Sequence[int]) -> Tensor:
    """``mask (N, *grid)`` bool grown by ``reach[a]`` cells along grid axis ``a`` (a box dilation)."""
    for axis, r in enumerate(reach):
        grown = mask
        for o in (o for step in range(1, r + 1) for o in (-step, step)):
            grown = grown | _shift(mask, [o if a == axis else 0 for a in range(len(reach))])
        mask = grown
    return mask


ERASE_FILLS = ("surround", "units")


@dataclass
class Erase(Request):
    """Remove what the masked regions show.

    ``fill="surround"`` (default): the target values over each mask's bounding box are the layer's values around
    the box continued across it (a harmonic fill at the layer's grid), what the image would show if the brushed
    thing were not there; a sloppy brush that takes in some background does no harm. ``fill="units"``: the
    authors' watermark removal, the layer's output with the ``units`` key channels most aligned with the context
    zeroed in the keys (blended by the mask; the only fill for a layer with one key per row). Either way the
    rank-r insert through ``D`` generalises the removal to every key in the context subspace. Default context:
    the erased regions themselves, rank 1.
    """

    inputs: Inputs
    masks: Tensor | None
    units: int = 30
    seeds: list[int] | None = None
    fill: str = "surround"

    json_key: ClassVar[str] = "erase"

    def __post_init__(self) -> None:
        if self.fill not in ERASE_FILLS:
            raise RequestError(f"An erase fills its region from {' or '.join(map(repr, ERASE_FILLS))}, got {self.fill!r}.")

    @classmethod
    def from_json(cls, spec: dict, reader: SpecReader) -> "Erase":
        seeds, masks = reader.regions(spec["erase"], "erase")
        units = spec["erase"].get("units", 30)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise RequestError(f"erase: 'units' is a positive whole number of key channels, got {units!r}.")
        return cls(reader.inputs(seeds), masks, units=units, seeds=seeds, fill=spec["erase"].get("fill", "surround"))

    def at(self, inputs: Inputs, mask: Tensor) -> list["Erase"]:
        """The same erase on another image: remove what ``mask (H, W)`` marks there, filled the same way."""
        return [Erase(inputs, mask[None], units=self.units, fill=self.fill)]

    def constraint(self, memory: LayerMemory, context: Context | None) -> tuple[Constraint, Context]:
        context = context or Context(self.inputs, self.masks, rank=1, seeds=self.seeds)
        rec = _record(memory, self.inputs)
        alpha = memory.mask_weights(self.masks, self.inputs, rec.values)
        box = bounding_boxes(alpha)
        cd = memory.adapter.channel_dim
        if self.fill == "surround":
            if not memory.grid(rec.values):
                raise RequestError(f"Layer {memory.layer!r} has one key per row, with no surroundings to fill an erased "
                                   f"region from: use Erase(..., fill='units').")
            grown = _dilate(box > 0, [1] * (box.dim() - 1))  # the box's border is brushed too: fill from just outside
            room = (~grown).flatten(1).any(1).view(-1, *[1] * (box.dim() - 1))
            hole = torch.where(room, grown, box > 0)
            linear, values, blend = _surround(rec.linear, hole, cd), _surround(rec.values, hole, cd), box
        else:
            erased = _record(memory, self.inputs, zero_units=memory.context_units(context.inputs, context.masks,
                                                                                   self.units))
            linear, values, blend = erased.linear, erased.values, alpha
        c = Constraint(
            rec,
            linear_target=_blend(blend, linear, rec.linear, cd),
            target=_blend(blend, values, rec.values, cd),
            weights=box,
        )
        return c, context


# ----------------------------------------------------------------------------------------------------------
# Solving
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Edit:
    """A solved rewrite: ``W₁ = W₀ + Λ D`` at ``layer``'s memory weight.

    ``lam (out, r, *kernel)``, ``directions (r, C)``; losses are the weighted mean squared error of the layer's
    output on the constraint, before (``Λ = 0``), after the closed form, and final (of the solve, at strength 1);
    ``base_sha256`` names the weight it was solved against (see :func:`weight_sha256`); ``request`` holds the
    requests that made it; ``pointwise``: ``Λ`` was confined to the kernel's centre; ``strength``: the factor
    :meth:`scaled` has already multiplied ``lam`` by; ``smooth``: the weight μ of ``L_smooth`` in the solve;
    ``output_energy``: the layer's ``E‖W₀ k‖²`` per output channel, the scale of :attr:`expected_change`;
    ``key_basis``: an orthonormal basis of the keys the edit stored values for, which a later solve at the same
    layer protects (``solve(..., protect=...)``).
    """

    layer: str
    lam: Tensor
    directions: Tensor
    solver: str
    base_sha256: str
    loss_before: float
    loss_closed_form: float
    loss_after: float
    seconds: float = 0.0
    request: dict[str, Any] = field(default_factory=dict)
    pointwise: bool = False
    strength: float = 1.0
    smooth: float = 0.0
    output_energy: float = 0.0
    key_basis: Tensor | None = None  # (m, C) orthonormal: the keys this edit stored values for, kept by later solves

    @property
    def rank(self) -> int:
        return self.directions.shape[0]

    @property
    def expected_change(self) -> float:
        """``E‖ΔW k‖² / E‖W₀ k‖²`` over the data the layer's C was fitted on (at this edit's strength): the share of
        the layer's output energy the edit moves on an average location (``nan`` when unknown)."""
        if not self.output_energy > 0:
            return math.nan
        return float(self.lam.double().square().sum() / self.lam.shape[0] / self.output_energy)

    def scaled(self, factor: float) -> "Edit":
        """The same rule at ``factor`` times its strength (``Λ`` scaled; ``D`` and the base are unchanged).

        The solve fits the request's own keys; another key in the context changes by ``Λ D k``, less where it
        projects less onto ``D``. A factor above 1 carries the rule to those weaker matches, at proportionally
        more change everywhere else; below 1 it tones the edit down.
        """
        factor = check_strength(factor)
        if self.strength * factor > MAX_STRENGTH:
            raise RequestError(f"This edit is already at strength {self.strength:g}; {factor:g} times that passes "
                               f"{MAX_STRENGTH:g}.")
        return dataclasses.replace(self, lam=self.lam * factor, strength=self.strength * factor)


def weight_sha256(weight: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (so a reshaped or recast weight does not match)."""
    t = weight.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def constraint(memory: LayerMemory, target: Request, context: Context | None = None) -> tuple[Constraint, Context]:
    """The constraint a request sets, and its context (``context``, or the target's default). :func:`solve` uses
    this; baselines that fit the same constraint another way can too."""
    if not isinstance(target, Request):
        kinds = ", ".join(Request.kinds)
        raise RequestError(f"A rewrite target is a Request ({kinds}), got {type(target).__name__}.")
    if context is not None and not isinstance(context, Context):
        raise RequestError(f"A context is a Context request, got {type(context).__name__}.")
    return target.constraint(memory, context)


def constraint_loss(memory: LayerMemory, c: Constraint, weight: Tensor, l1: bool = False) -> Tensor:
    """The constraint loss with ``weight`` as the layer's memory (the layer runs alone, model untouched): the
    weighted mean over locations of the channel-mean squared error (absolute error with ``l1=True``).

    The layer is held first (:meth:`LayerMemory.hold`; no output changes at the current weight), so every
    solver, baseline or not, fits the layer as a rewrite will leave it."""
    memory.hold()
    with eval_mode(memory.module):
        out = functional_call(memory.module, {memory.weight_name: weight}, c.rec.args, c.rec.kwargs)
    diff = channels_last(out - c.target, memory.adapter.channel_dim)
    err = (diff.abs() if l1 else diff.square()).mean(dim=-1)
    return (err * c.weights).sum() / c.weights.sum()


def output_energy(memory: LayerMemory) -> float:
    """``E‖W k‖²`` per output channel under C, summed over kernel taps (taps taken as independent): the scale
    the smoothness budget is a share of."""
    w = memory.weight.detach().double().cpu().movedim((memory.adapter.out_axis, memory.adapter.key_axis), (0, 1))
    w = w.reshape(w.shape[0], w.shape[1], -1)  # (out, C, taps)
    c = memory.moment.double().cpu()
    return float(torch.einsum("oit,ij,ojt->", w, c, w) / w.shape[0])


def _taps(memory: LayerMemory, pointwise: bool) -> Tensor:
    """Which kernel positions ``Λ`` may use: ``(*kernel)`` of 0 / 1; with ``pointwise`` the centre alone."""
    kernel = memory.kernel_shape
    taps = torch.ones(kernel, dtype=memory.weight.dtype, device=memory.weight.device)
    if pointwise and kernel:
        if any(k % 2 == 0 for k in kernel):
            raise RequestError(f"Layer {memory.layer!r} has an even {kernel} kernel, without a centre: solve it with "
                               f"pointwise=False.")
        taps.zero_()[tuple(k // 2 for k in kernel)] = 1
    return taps


@dataclass
class _Normal:
    """The closed form's normal equations per output channel, eigendecomposed once: ``A = V diag(s) Vᵀ``
    (``J x J``, the weighted Gram matrix of the design) and ``Vᵀ B`` (``J x out``), so that the ridge solution
    ``Λ(μ) = V diag(1 / (s + μ)) Vᵀ B`` costs nothing for any μ."""

    s: Tensor
    v: Tensor
    vtb: Tensor
    cols: Tensor  # which of the r · taps unknowns are free

    def solution(self, mu: float) -> Tensor:
        tol = self.s.max().clamp_min(1e-300) * 1e-12
        inv = torch.where(self.s > tol, 1 / (self.s + mu), torch.zeros_like(self.s)) if mu == 0 else 1 / (self.s + mu)
        return self.v @ (inv[:, None] * self.vtb)  # (J, out)


def _normal(memory: LayerMemory, c: Constraint, directions: Tensor, taps: Tensor) -> _Normal:
    """Normal equations of the weighted least squares for the linear output on the constraint (float64, CPU)."""
    cd = memory.adapter.channel_dim
    u = memory.design(c.rec.keys, directions)
    u = channels_last(u, cd).reshape(-1, u.shape[cd])  # (L, J): J = (r, kernel position)
    res = channels_last(c.linear_target - c.rec.linear, cd).reshape(-1, c.rec.linear.shape[cd])  # (L, out)
    w = c.weights.reshape(-1)
    used = w > 0
    cols = (taps.reshape(1, -1) > 0).expand(directions.shape[0], -1).reshape(-1).cpu()
    wu = w[used].double().cpu()[:, None] / w[used].double().sum().cpu()
    uu = u[used][:, cols.to(u.device)].double().cpu()
    a = uu.T @ (uu * wu)
    s, v = torch.linalg.eigh((a + a.T) / 2)
    return _Normal(s.clamp_min(0), v, v.T @ (uu.T @ (res[used].double().cpu() * wu)), cols)


def _lam(memory: LayerMemory, normal: _Normal, mu: float, r: int) -> Tensor:
    """``Λ (out, r, *kernel)`` float64 for ridge weight ``mu``, zero outside the free taps."""
    lam = torch.zeros(memory.out_channels, len(normal.cols), dtype=torch.float64)
    lam[:, normal.cols] = normal.solution(mu).T
    return lam.reshape(memory.out_channels, r, *memory.kernel_shape)


def _choose_smooth(memory: LayerMemory, normal: _Normal, budget: float, energy: float, r: int) -> float:
    """The smallest μ whose ridge solution changes at most ``budget`` of the output energy (``0`` if the plain
    least squares already does): bisection in log μ, on which the change decreases monotonically."""
    change = lambda mu: float(_lam(memory, normal, mu, r).square().sum()) / memory.out_channels / energy  # noqa: E731
    if change(0.0) <= budget:
        return 0.0
    top = float(normal.s.max())
    lo, hi = top * 1e-12, top * 1e6
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if change(mid) > budget else (lo, mid)
    return hi


PROTECT_ENERGY = 0.99999  # an edit's protected keys: the principal directions holding this share of their energy…
PROTECT_SHARE = 0.5  # …at most this share of the key dimension, so later edits keep room
PROTECT_MODES = ("soft", "hard")
# Soft protection: each earlier edit's keys weigh this many times more than the data's C gives them, so a later
# edit moves them about 1 + PROTECT_WEIGHT times less (in C's metric) than an unprotected edit through the same context.
PROTECT_WEIGHT = 10.0


def _key_basis(memory: LayerMemory, c: Constraint) -> Tensor:
    """``(m, C)`` orthonormal rows spanning the keys a constraint stores values for (those within a kernel's reach
    of its locations, for a convolution): their top principal directions holding :data:`PROTECT_ENERGY` of the
    energy, at most :data:`PROTECT_SHARE` of the key dimension."""
    weights = _dilate(c.weights > 0, [k // 2 for k in memory.kernel_shape])
    keys = memory.flat_keys(c.rec.keys)[weights.reshape(-1)].double().cpu()
    _, sv, vh = torch.linalg.svd(keys, full_matrices=False)
    energy = sv.square().cumsum(0) / sv.square().sum().clamp_min(1e-300)
    m = min(int((energy < PROTECT_ENERGY).sum()) + 1, max(1, int(PROTECT_SHARE * memory.key_channels)))
    return vh[:m].to(memory.weight)


def _protected_bases(memory: LayerMemory, protect: Any, mode: Any) -> list[Tensor]:
    """The ``key_basis`` of each edit of ``protect`` made at ``memory``'s layer, float64 on the CPU; refuses (before
    any solve) a mode not in :data:`PROTECT_MODES`, a ``protect`` that is not a sequence of edits, a basis of
    another key width, and protection with no C to protect in."""
    if mode not in PROTECT_MODES:
        raise RequestError(f"protect_mode is one of {', '.join(map(repr, PROTECT_MODES))}, got {mode!r}.")
    if isinstance(protect, Edit) or not isinstance(protect, Sequence) or not all(isinstance(e, Edit) for e in protect):
        raise RequestError(f"protect is a sequence of earlier Edits (e.g. Rewriter.history), got "
                           f"{type(protect).__name__}.")
    bases = [e.key_basis.double().cpu() for e in protect if e.layer == memory.layer and e.key_basis is not None]
    for b in bases:
        if b.dim() != 2 or b.shape[1] != memory.key_channels:
            raise RequestError(f"An edit to protect at layer {memory.layer!r} has a key basis of shape {tuple(b.shape)}, "
                               f"for keys of another width than the layer's {memory.key_channels}: it was made for "
                               f"another model.")
    if bases:
        try:
            memory.moment
        except RuntimeError:
            raise RequestError(f"Protecting earlier edits at layer {memory.layer!r} needs its C (what the data's keys "
                               f"look like): call memory.fit_moment(sampler, n) first, or solve with protect=().") from None
    return bases


def _c_normalised(memory: LayerMemory, d: Tensor, fail: str) -> Tensor:
    """``G^{-1/2} D`` with ``G = D C Dᵀ``, so that ``D C Dᵀ = I`` (float64); ``fail`` when a row has lost almost
    all of its C-norm."""
    gram = d @ memory.regularised_moment() @ d.T
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    if evals.min() < 1e-6:
        raise RequestError(fail)
    return (evecs * evals.rsqrt()) @ evecs.T @ d


def _protected(memory: LayerMemory, context: Context, bases: list[Tensor], mode: str) -> Tensor:
    """The context directions ``D (r, C)`` of a new edit that leaves alone what earlier edits stored for the keys
    spanned by ``bases`` (their ``key_basis``, from :func:`_protected_bases`); ``D C Dᵀ = I`` either way.

    ``"hard"``: ``D``'s rows made orthogonal to the span of every earlier edit's keys, so ``ΔW k`` is zero there
    (AlphaEdit's null-space projection, Fang et al. 2025, applied to D); refused once the context lies in that span.
    ``"soft"``: ``D`` drawn from the context in the metric ``C_p = C + ω Σ_e L Q_e Q_eᵀ Lᵀ`` instead of C (``C =
    L Lᵀ``; ``Q_e`` an orthonormal basis of edit e's whitened keys ``L⁻¹ K_e``; ω = :data:`PROTECT_WEIGHT`): the
    rank-one least change ``d ∝ C_p⁻¹ k`` when the earlier keys count as extra rows of the preserved second moment
    (AlphaEdit's ``K_p K_pᵀ`` term, MEMIT's running covariance). It moves keys in an earlier edit's span about
    1 + ω times less, and never runs out of room: a key edited again (a new fact about the same subject) keeps its own
    direction, and the smoothness budget charges what it costs elsewhere."""
    if not bases:
        return memory.directions(context.inputs, context.masks, context.rank)
    if mode == "hard":
        q = torch.linalg.qr(torch.cat(bases).T).Q  # (C, m): the protected keys' span
        d = memory.directions(context.inputs, context.masks, context.rank).double().cpu()
        d = _c_normalised(memory, d - (d @ q) @ q.T, f"The context at layer {memory.layer!r} lies within the keys that "
                          f"earlier edits protect: choose another context, lower the rank, solve with "
                          f"protect_mode='soft', or with protect=() to overwrite them.")
        return d.to(memory.weight)
    # Whitened, C_p is A = I + ω Z Zᵀ (Z: every Q_e side by side); with T = L A^{-1/2} L⁻¹ the directions in C_p of
    # the keys are the C-metric directions of the keys T k, mapped back by T (T is never formed: it is I - L U s Uᵀ L⁻¹).
    factor = memory.cholesky()
    z = torch.cat([torch.linalg.qr(torch.linalg.solve_triangular(factor, b.T, upper=False)).Q for b in bases], dim=1)
    u, sv, _ = torch.linalg.svd(z, full_matrices=False)
    shrink = 1 - (1 + PROTECT_WEIGHT * sv.square()).rsqrt()
    left = factor @ (u * shrink)  # (C, n): T = I - left @ rightᵀ
    right = torch.linalg.solve_triangular(factor.T, u, upper=True)
    keys, weights = memory.context_keys(context.inputs, context.masks, context.rank)
    k = keys.double().cpu()
    d = memory.directions_from_keys((k - (k @ right) @ left.T).to(keys), weights, context.rank).double().cpu()
    d = _c_normalised(memory, d - (d @ left) @ right.T, f"The context at layer {memory.layer!r} has no direction left "
                      f"to edit.")
    return d.to(memory.weight)


def _objective(memory: LayerMemory, c: Constraint, base: Tensor, lam: Tensor, directions: Tensor, mu: float) -> Tensor:
    """``L_constraint + μ · L_smooth`` with ``L_smooth = ‖Λ‖² / out`` (``E‖ΔW k‖²`` per channel, ``D C Dᵀ = I``)."""
    loss = constraint_loss(memory, c, base + memory.delta(lam, directions))
    return loss + mu * lam.square().sum() / lam.shape[0] if mu else loss


def _refine(memory: LayerMemory, c: Constraint, directions: Tensor, lam: Tensor, base: Tensor, taps: Tensor,
            max_iter: int, mu: float) -> Tensor:
    """L-BFGS on ``Λ`` alone (within ``taps``) through the real layer, from ``lam``, on the same objective as the
    closed form; ``W = W₀ + Λ D`` by construction."""
    with torch.no_grad():
        scale = _objective(memory, c, base, lam, directions, mu).clamp_min(1e-30)
    lam = lam.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([lam], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> Tensor:
        loss = _objective(memory, c, base, lam * taps, directions, mu) / scale
        (grad,) = torch.autograd.grad(loss, lam)  # grads of Λ only: the model's .grad stay untouched
        lam.grad = grad.contiguous()
        return loss

    opt.step(closure)
    return (lam * taps).detach()


def solve(memory: LayerMemory, target: Request, context: Context | None = None, refine: bool = True,
          max_iter: int = 50, pointwise: bool = False, budget: float | None = DEFAULT_BUDGET,
          smooth: float | None = None, protect: Sequence[Edit] = (), protect_mode: str = "soft") -> Edit:
    """Solve a rewrite of ``memory``'s layer; the model (weights and buffers) is not changed: apply the result
    with :class:`Rewriter`.

    Minimises ``L_constraint + μ · L_smooth`` (see the module docstring). The closed form fits the layer's
    linear part (exact for Conv / ConvTranspose / Linear layers). A layer with a nonlinear rest is then refined by
    L-BFGS on Λ through the real layer, started from the closed form, or from Λ = 0 where the closed form fits
    the real layer worse than no edit. ``Edit.solver`` says which ran: ``"closed_form"``, ``"closed_form+lbfgs"``
    or ``"lbfgs"``; the final objective is never above either start.

    Args:
        target: a :class:`Request` (:class:`Paste`, :class:`Erase`, or a registered kind).
        context: where the rule applies; default: the target's own region at rank 1.
        refine: run L-BFGS for a layer with a nonlinear rest.
        max_iter: L-BFGS iterations.
        pointwise: for a convolution, change only the kernel's centre, so that each location's new value depends
            on its own key alone (``ΔW k`` exactly as in the key → value view) instead of on its neighbours' keys
            too.
        budget: choose μ as the smallest weight whose edit moves at most this share of the layer's output
            energy over the data (``Edit.expected_change``); ``None`` with ``smooth=None``: plain least squares.
        smooth: μ itself (overrides ``budget``); ``0`` for plain least squares.
        protect: earlier edits (of any layer; those of this layer count) whose stored keys (``Edit.key_basis``)
            this edit must leave alone; :meth:`Rewriter.rewrite` passes its history. Needs C (a
            :class:`RequestError` before any solve otherwise).
        protect_mode: how ``protect`` holds them (both keep ``D C Dᵀ = I``, so ``budget`` means the same):

            * ``"soft"`` (default): ``D`` is drawn in the metric of C plus the earlier edits' keys, each weighing
              :data:`PROTECT_WEIGHT` times what the data gives them (AlphaEdit's and MEMIT's earlier keys as extra
              rows of the preserved second moment): a later edit moves them about ``1 + PROTECT_WEIGHT`` times less, and
              edits are accepted however many came before (a subject edited again keeps its own direction). What
              the data loses is held by C's metric and ``budget``: sequential edits need a budget (exact storage,
              ``budget=None``, lets each edit grow without bound where keys crowd, and a hundred of them break the
              layer; ``docs/sequential.md``);
            * ``"hard"``: ``D`` orthogonal to the earlier edits' key span, so they are kept exactly; refused once
              a context lies within that span (each edit takes up to :data:`PROTECT_SHARE` of the key dimension).
    """
    start = time.perf_counter()
    buffers = _buffer_slots(memory.module)
    try:
        return _solve(memory, target, context, refine, max_iter, pointwise, budget, smooth, protect, protect_mode, start)
    finally:
        _restore_buffers(buffers)  # the layer is held while solving; Rewriter.apply holds it again


def _solve(memory: LayerMemory, target: Request, context: Context | None, refine: bool, max_iter: int,
           pointwise: bool, budget: float | None, smooth: float | None, protect: Sequence[Edit], protect_mode: str,
           start: float) -> Edit:
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget < math.inf):
        raise RequestError(f"budget is a positive share of the layer's output energy (e.g. 0.02), got {budget!r}.")
    if smooth is not None and not (isinstance(smooth, (int, float)) and 0 <= smooth < math.inf):
        raise RequestError(f"smooth (μ) is a non-negative number, got {smooth!r}.")
    bases = _protected_bases(memory, protect, protect_mode)
    base = memory.weight.detach()
    _check_finite(f"The weight of layer {memory.layer!r}", base)
    _check_finite(f"C of layer {memory.layer!r}", memory.moment)
    c, context = constraint(memory, target, context)
    for what, x in (("keys", c.rec.keys), ("values", c.rec.values), ("target values", c.target)):
        _check_finite(f"The request's {what} at layer {memory.layer!r}", x)
    taps = _taps(memory, pointwise)
    directions = _protected(memory, context, bases, protect_mode)
    r = directions.shape[0]
    energy = output_energy(memory)
    with torch.no_grad():
        before = float(constraint_loss(memory, c, base))
        normal = _normal(memory, c, directions, taps)
        if float(normal.s.max()) <= 1e-12:  # D k = 0 on every constrained key: no Λ can change them
            why = "lie within the keys that earlier edits protect" if bases else "have no component along the context"
            raise RequestError(f"The request's keys at layer {memory.layer!r} {why}, so no edit through this context "
                               f"can change them: choose another context"
                               + (", or solve with protect=() to overwrite the earlier edits." if bases else "."))
        mu = float(smooth) if smooth is not None else (
            _choose_smooth(memory, normal, budget, energy, r) if budget is not None else 0.0)
        lam = _lam(memory, normal, mu, r).to(base)
        closed = float(constraint_loss(memory, c, base + memory.delta(lam, directions)))
        objective = float(_objective(memory, c, base, lam, directions, mu))
    after, solver = closed, "closed_form"
    if refine and memory.key_layer != memory.layer:
        # A large linear step can fit the real layer worse than no edit (demodulation rescales it): then
        # L-BFGS starts from Λ = 0 instead.
        if objective > before:
            lam, after, objective, solver = torch.zeros_like(lam), before, before, "lbfgs"
        refined = _refine(memory, c, directions, lam, base, taps, max_iter, mu)
        with torch.no_grad():
            # At μ = 0 nothing holds L-BFGS to the budget the closed form met: scale it back onto the budget.
            moved = float(refined.double().square().sum()) / memory.out_channels / energy
            if smooth is None and budget is not None and moved > budget:
                refined = refined * math.sqrt(budget / moved)
            refined_objective = float(_objective(memory, c, base, refined, directions, mu))
            if refined_objective < objective:
                after = float(constraint_loss(memory, c, base + memory.delta(refined, directions)))
                lam, solver = refined, "closed_form+lbfgs" if solver == "closed_form" else "lbfgs"
    if not (torch.isfinite(lam).all() and torch.isfinite(directions).all()):
        raise NonFiniteError(f"The rewrite of layer {memory.layer!r} came out non-finite; check the request.")
    return Edit(
        layer=memory.layer, lam=lam, directions=directions, solver=solver, base_sha256=weight_sha256(base),
        loss_before=before, loss_closed_form=closed, loss_after=after, seconds=time.perf_counter() - start,
        request={"target": target, "context": context}, pointwise=pointwise, smooth=mu, output_energy=energy,
        key_basis=_key_basis(memory, c),
    )


def goal_output(memory: LayerMemory, c: Constraint | Sequence[Constraint], inputs: Inputs) -> Any:
    """The model's output for ``inputs`` (the rows the constraint ``c`` was recorded on) with ``memory``'s layer
    emitting the target values where the constraint holds (``weights > 0``) and its own values elsewhere: what a
    request asks for, rendered exactly. Several constraints on the same rows (a request on each of several
    objects) hold together, a later one winning where they overlap."""
    cs = [c] if isinstance(c, Constraint) else list(c)

    def emit(output: Tensor, name: str) -> Tensor:
        for part in cs:
            held = (part.weights > 0).unsqueeze(memory.adapter.channel_dim % part.target.dim())
            output = torch.where(held.to(output.device), part.target.to(output), output)
        return output

    model = memory.model
    with eval_mode(model), torch.no_grad(), Trace(model, memory.layer, retain_output=False, edit_output=emit):
        return call_model(model, to_device(inputs, model_device(model)))


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate_strength` found: the mean squared distance between the renders of ``images``
    held-out context images and the request made on each of them, per strength tried (``losses``) and with no
    edit (``unedited``); ``edit`` at the chosen strength."""

    edit: Edit
    losses: dict[float, float]
    unedited: float
    images: int

    @property
    def carries(self) -> bool:
        """Whether some strength brings the held-out images closer to the request than no edit does. False: the
        rule does not generalise through this context (at every strength they end farther from what was asked),
        so ``edit`` is left at its own strength."""
        return self.images == 0 or min(self.losses.values()) < self.unedited


def calibrate_strength(rewriter: "Rewriter", memory: LayerMemory, edit: Edit,
                       strengths: Sequence[float] = CALIBRATION_STRENGTHS, images: int = CALIBRATION_IMAGES
                       ) -> Calibration:
    """Choose ``edit``'s strength, among ``strengths``, by how close its renders of the context's other images
    come to what the request asks for on them.

    The solve fits the request's own keys; the context's other images are held out from that fit. On each (the
    first ``images``: brushed ones come before grown matches), the request moved there (:meth:`Request.at`) and
    rendered exactly (:func:`goal_output`) is the goal; the chosen strength minimises the mean squared distance
    between the model's output under the scaled edit and that goal over the whole output, so what a stronger edit
    breaks elsewhere in those images counts too. Where no strength beats leaving the model alone
    (:attr:`Calibration.carries` is False), or the context shows no other image, ``edit`` keeps its strength.
    Renders run in ``rewriter.trial``: weights and history are as before afterwards.
    """
    target, context = edit.request["target"], edit.request["context"]
    own = set(getattr(target, "seeds", None) or [])
    rows = [i for i in range(num_rows(context.inputs))
            if context.masks is not None and context.masks[i].sum() > 0
            and not (context.seeds is not None and context.seeds[i] in own)][:images]
    if not rows or not strengths:
        return Calibration(edit, {}, math.nan, 0)
    goals, together = [], None
    for i in rows:
        row = select_rows(context.inputs, torch.tensor([i]))
        parts = [constraint(memory, moved, None)[0] for moved in target.at(row, context.masks[i])]
        goals.append(goal_output(memory, parts, row))
        together = row if together is None else concat_rows(together, row)
    goal = torch.cat(goals)

    def loss(edits: list[Edit]) -> float:
        with rewriter.trial(edits), eval_mode(memory.model), torch.no_grad():
            out = call_model(memory.model, to_device(together, model_device(memory.model)))
        return float((out.to(goal) - goal).square().mean())

    losses = {float(s): loss([edit.scaled(s / edit.strength)]) for s in sorted(strengths)}
    found = Calibration(edit, losses, loss([]), len(rows))
    if not found.carries:
        return found
    best = min(losses, key=losses.get)
    return dataclasses.replace(found, edit=edit.scaled(best / edit.strength))


# ----------------------------------------------------------------------------------------------------------
# The edit stack
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Applied:
    edit: Edit
    parameter: nn.Parameter
    before: Tensor  # exact copies, so undo and redo are bitwise
    after: Tensor
    buffers_before: Buffers  # the layer's buffer slots either side (a hold adds one), likewise
    buffers_after: Buffers


PathOrFile = str | os.PathLike | IO[bytes]


class Rewriter:
    """The edits applied to one model, in order: apply, undo, redo, revert, trial, save, export.

    The Rewriter is the only thing that should change a model's weights: undo and redo refuse to run over
    weights changed behind its back, and previews use :meth:`trial` instead of copies of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._done: list[_Applied] = []
        self._undone: list[_Applied] = []

    @property
    def history(self) -> list[Edit]:
        """The applied edits, oldest first."""
        return [a.edit for a in self._done]

    @property
    def redoable(self) -> list[Edit]:
        """The undone edits that :meth:`redo` would apply again, next first."""
        return [a.edit for a in reversed(self._undone)]

    def rewrite(self, memory: LayerMemory, target: Request, context: Context | None = None, **solve_args: Any) -> Edit:
        """:func:`solve` then :meth:`apply`; the edits applied so far are protected unless ``protect`` is given."""
        if memory.model is not self.model:
            raise RequestError("This LayerMemory views another model than this Rewriter's.")
        solve_args.setdefault("protect", self.history)
        return self.apply(solve(memory, target, context, **solve_args))

    def apply(self, edit: Edit) -> Edit:
        """Add ``edit``'s ``Λ D`` to its layer's weight. Checks everything first; on any failure the model is
        exactly as before (weights and buffers)."""
        return self.apply_all([edit])[0]

    def apply_all(self, edits: Sequence[Edit]) -> list[Edit]:
        """Apply ``edits`` in order, all or none: on any refusal the model (weights, held buffers) and this
        Rewriter's history are exactly as before."""
        done, undone = len(self._done), list(self._undone)
        buffers = _buffer_slots(self.model)
        try:
            for edit in edits:
                self._apply_one(edit)
        except BaseException:
            while len(self._done) > done:
                applied = self._done.pop()
                self._write(applied.parameter, applied.before)
            self._undone = undone
            _restore_buffers(buffers)
            raise
        return list(edits)

    def _apply_one(self, edit: Edit) -> None:
        memory = LayerMemory(self.model, edit.layer)
        param = memory.weight
        r = edit.directions.shape[0] if edit.directions.dim() == 2 else -1
        want = (memory.out_channels, r, *memory.kernel_shape)
        if edit.directions.shape != (r, memory.key_channels) or tuple(edit.lam.shape) != want:
            raise RequestError(
                f"Edit shapes do not fit layer {edit.layer!r}: Λ {tuple(edit.lam.shape)} and D "
                f"{tuple(edit.directions.shape)}, expected {want} and ({r}, {memory.key_channels})."
            )
        current = weight_sha256(param)
        if current != edit.base_sha256:
            raise RequestError(
                f"The edit of layer {edit.layer!r} was made for a base weight with sha256 {edit.base_sha256}, but "
                f"this model's weight there has sha256 {current}: a different model, or one edited since. Solve "
                f"the edit again on this model, or apply it to the model it was made for."
            )
        with torch.no_grad():
            before = param.detach().clone()
            after = before + memory.delta(edit.lam.to(param), edit.directions.to(param))
        if not torch.isfinite(after).all():
            raise NonFiniteError(f"The edit of layer {edit.layer!r} gives non-finite weights; not applied.")
        buffers = _buffer_slots(memory.module)
        memory.hold()  # as when it was solved: an edit read from a file may meet a fresh model
        self._write(param, after)
        self._done.append(_Applied(edit, param, before, after, buffers, _buffer_slots(memory.module)))
        self._undone.clear()

    @contextlib.contextmanager
    def trial(self, edits: Sequence[Edit] = ()) -> Iterator["Rewriter"]:
        """Within the block, ``edits`` are applied on top of this Rewriter's (previews, measurements); after it,
        whatever happened inside, the weights, held buffers, the history and the redo stack are bitwise as
        before."""
        done, undone, buffers = len(self._done), list(self._undone), _buffer_slots(self.model)
        self.apply_all(edits)
        try:
            yield self
        finally:
            while len(self._done) > done:
                self.undo()
            while len(self._done) < done and self._undone:
                self.redo()
            self._undone = undone
            _restore_buffers(buffers)

    @staticmethod
    def _write(param: nn.Parameter, value: Tensor) -> None:
        backup = param.detach().clone()
        try:
            with torch.no_grad():
                param.copy_(value)
        except BaseException:
            with torch.no_grad():
                param.copy_(backup)
            raise

    def _check_untouched(self, applied: _Applied, expected: Tensor) -> None:
        if not torch.equal(applied.parameter.detach(), expected):
            raise RuntimeError(
                f"The weight of layer {applied.edit.layer!r} changed outside this Rewriter; undo/redo would lose "
                f"that change. Keep all weight changes in one Rewriter."
            )

    def undo(self) -> Edit:
        """Take back the last edit; the weight is bitwise what it was before it."""
        if not self._done:
            raise IndexError("Nothing to undo.")
        applied = self._done[-1]
        self._check_untouched(applied, applied.after)
        self._write(applied.parameter, applied.before)
        _restore_buffers(applied.buffers_before)
        self._undone.append(self._done.pop())
        return applied.edit

    def redo(self) -> Edit:
        """Apply the last undone edit again (bitwise the same weight)."""
        if not self._undone:
            raise IndexError("Nothing to redo.")
        applied = self._undone[-1]
        self._check_untouched(applied, applied.before)
        self._write(applied.parameter, applied.after)
        _restore_buffers(applied.buffers_after)
        self._done.append(self._undone.pop())
        return applied.edit

    def revert(self) -> None:
        """Undo every edit: the model is bitwise as it was before the first."""
        while self._done:
            self.undo()

    def save(self, dest: PathOrFile) -> None:
        """The applied edits as safetensors: ``Λ`` and ``D`` per edit, the requests' tensors, a SHA-256 of every
        tensor, and JSON metadata. A path is written atomically (a crash leaves the old file or none)."""
        tensors: dict[str, Tensor] = {}
        edits = []
        for i, a in enumerate(self._done):
            e, prefix = a.edit, f"edits.{i}"
            tensors[f"{prefix}.lambda"] = e.lam.detach().cpu().contiguous().clone()
            tensors[f"{prefix}.directions"] = e.directions.detach().cpu().contiguous().clone()
            if e.key_basis is not None:
                tensors[f"{prefix}.key_basis"] = e.key_basis.detach().cpu().contiguous().clone()
            edits.append({
                "layer": e.layer, "rank": e.rank, "solver": e.solver, "base_sha256": e.base_sha256,
                "weight_dtype": str(a.before.dtype), "weight_shape": list(a.before.shape),
                "loss_before": e.loss_before, "loss_closed_form": e.loss_closed_form, "loss_after": e.loss_after,
                "seconds": e.seconds, "pointwise": e.pointwise, "strength": e.strength, "smooth": e.smooth,
                "output_energy": e.output_energy, "request": _encode(e.request, f"{prefix}.request", tensors),
            })
        meta = {"format": FORMAT, "version": dissect.__version__, "edits": edits,
                "sha256": {k: weight_sha256(t) for k, t in tensors.items()}}
        _write_bytes(dest, save_safetensors(tensors, metadata={"dissect": json.dumps(meta)}))

    def export(self, path: str | os.PathLike) -> None:
        """The edited model's weights as a safetensors state_dict (``safetensors.torch.load_model`` reads it)."""
        summary = [{"layer": e.layer, "rank": e.rank, "solver": e.solver} for e in self.history]
        save_model(self.model, str(path), metadata={"dissect": json.dumps({"version": dissect.__version__,
                                                                           "edits": summary})})


def _write_bytes(dest: PathOrFile, data: bytes) -> None:
    if hasattr(dest, "write"):
        dest.write(data)
        return
    path = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_bytes(source: PathOrFile) -> tuple[bytes, str]:
    """The file's bytes and a name for messages."""
    if hasattr(source, "read"):
        return source.read(), str(getattr(source, "name", "the uploaded file"))
    path = Path(source)
    if path.is_dir():
        raise EditFileError(f"{path} is a directory; give the edit file (.safetensors) saved by dissect inside it.")
    if not path.is_file():
        raise EditFileError(f"No edit file at {path}.")
    return path.read_bytes(), str(path)


_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, and torch.save's zip archive


def read_edits(source: PathOrFile) -> list[Edit]:
    """The edits saved in ``source`` (a path or a binary file object), requests included, without applying them.

    Refuses, with :class:`EditFileError` naming the file: a directory or missing file, a pickle or torch.save
    file (never unpickled), a truncated or non-safetensors file, another format, a missing field, and any
    tensor whose SHA-256 does not match the one saved with it."""
    data, name = _read_bytes(source)
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len]).get("__metadata__", {}).get("dissect", "{}"))
    except (SafetensorError, ValueError, UnicodeDecodeError) as err:
        # Only now: a safetensors header's length may itself start with a pickle's magic byte.
        if data.startswith(_PICKLE_MAGIC):
            raise EditFileError(f"{name} is a pickle / torch.save file; dissect reads only the safetensors edit files "
                                f"it saves (and never unpickles).") from None
        raise EditFileError(f"{name} is not a complete safetensors edit file (truncated or another format: {err}). "
                            f"Give a file saved with dissect's Rewriter.save or the dashboard's download.") from err
    if meta.get("format") != FORMAT:
        raise EditFileError(f"{name} is not a dissect edit file of format {FORMAT!r} (it says "
                            f"{meta.get('format')!r}); save it again with this version of dissect.")
    sums = meta.get("sha256", {})
    for key, t in tensors.items():
        if sums.get(key) != weight_sha256(t):
            raise EditFileError(f"{name}: tensor {key!r} does not match its saved checksum (the file is corrupted "
                                f"or was changed by hand); nothing was applied.")
    try:
        return [
            Edit(layer=e["layer"], lam=tensors[f"edits.{i}.lambda"], directions=tensors[f"edits.{i}.directions"],
                 solver=e["solver"], base_sha256=e["base_sha256"], loss_before=e["loss_before"],
                 loss_closed_form=e["loss_closed_form"], loss_after=e["loss_after"], seconds=e["seconds"],
                 request=_decode(e["request"], tensors), pointwise=e["pointwise"], strength=e["strength"],
                 smooth=e["smooth"], output_energy=e["output_energy"], key_basis=tensors.get(f"edits.{i}.key_basis"))
            for i, e in enumerate(meta["edits"])
        ]
    except KeyError as err:
        raise EditFileError(f"{name} lacks the field {err.args[0]!r}; it was not saved by this version of "
                            f"dissect.") from None


def load(source: PathOrFile, model: nn.Module) -> Rewriter:
    """Apply the edits saved in ``source`` to ``model``, all or none, refusing a model whose base weight differs.

    On any refusal the model is left exactly as it was, held buffers included."""
    edits = read_edits(source)
    rewriter = Rewriter(model)
    try:
        rewriter.apply_all(edits)
    except RequestError as err:
        name = str(getattr(source, "name", source))
        raise EditFileError(f"Cannot load {name}: {err}") from err
    return rewriter


# ----------------------------------------------------------------------------------------------------------
# Requests <-> JSON + tensors
# ----------------------------------------------------------------------------------------------------------


def _encode(obj: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """JSON for ``obj``; its tensors go into ``tensors`` under names starting with ``name``."""
    if isinstance(obj, Tensor):
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if dataclasses.is_dataclass(obj):
        fields = {f.name: _encode(getattr(obj, f.name), f"{name}.{f.name}", tensors) for f in dataclasses.fields(obj)}
        return {"request": type(obj).__name__, "fields": fields}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return {"dict": {k: _encode(v, f"{name}.{k}", tensors) for k, v in obj.items()}}
    if obj is None or isinstance(obj, (bool, int, float, str)) or (
        isinstance(obj, list) and all(isinstance(v, (bool, int, float, str)) for v in obj)
    ):
        return obj
    raise TypeError(f"Cannot save {type(obj).__name__} in a request ({name}); use tensors, numbers and strings.")


def _decode(node: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(node, dict):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "request" in node:
            if node["request"] not in _PARTS:
                importlib.import_module("dissect.valuetargets")  # dissect's other request kinds register on import
            if node["request"] not in _PARTS:
                raise EditFileError(f"The edit file holds a request of kind {node['request']!r}, which this "
                                    f"dissect does not know; import the module that defines it first.")
            return _PARTS[node["request"]](**{k: _decode(v, tensors) for k, v in node["fields"].items()})
        if "tuple" in node:
            return tuple(_decode(v, tensors) for v in node["tuple"])
        return {k: _decode(v, tensors) for k, v in node["dict"].items()}
    return node
