"""Rewriting what a layer has learned: edit requests, the solver, and a per-model edit stack with save / load.

A rewrite stores new key -> value pairs in a layer's memory (see :mod:`dissect.memory`) with the least change
to everything else: ``W₁ = W₀ + Λ D`` where ``D (r, C)`` are the context directions and only ``Λ`` depends on the
target values. Requests say what to store:

* :class:`Copy` + :class:`Paste`: values copied from a region of one image, pasted into another image;
* :class:`Erase`: the values a region would have without the context's most aligned key units (the authors'
  watermark removal);
* :class:`Context`: where the rule applies (images + masks, or a key cluster), giving ``D`` of rank r.

:func:`solve` finds ``Λ`` without touching the model: the layer's linear part in closed form (weighted least
squares, exact within span(D)), then, for a layer with a nonlinear rest (demodulation, noise, bias, activation),
L-BFGS on ``Λ`` alone through the real layer, started from the closed form (or from no edit, if that fits
better), so ``W = W₀ + Λ D`` holds throughout. :class:`Rewriter` applies edits with bitwise undo / redo / revert
and saves them as safetensors (``Λ``, ``D``, the requests, and JSON metadata).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import Tensor, nn
from torch.func import functional_call

import dissect
from dissect.memory import (
    Inputs,
    KeyClusters,
    LayerMemory,
    Recording,
    bounding_boxes,
    channels_last,
    eval_mode,
    num_rows,
    select_rows,
)

__all__ = [
    "Copy", "Paste", "Context", "Erase", "Constraint", "Edit", "constraint", "constraint_loss", "solve", "Rewriter",
    "load", "read_edits", "weight_sha256",
]

FORMAT = "dissect-edits/1"


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Copy:
    """A region of one source image: its values, cropped to the mask's bounding box, with the mask as alpha.

    ``inputs``: one row of model input; ``mask (H, W)`` at image resolution (``None`` for a layer with one key
    per row); ``seeds``: optional provenance, kept in saved files.
    """

    inputs: Inputs
    mask: Tensor | None
    seeds: list[int] | None = None


@dataclass
class Paste:
    """Paste a :class:`Copy` into one target image with its centre at ``position (y, x)`` in image pixels.

    The constraint is the target's keys over the pasted box, mapped to the blended values
    ``alpha · copied + (1 - alpha) · own``. ``position=None`` keeps the copied box where it was.
    ``region (H, W)``: paste *onto* this part of the target image only (a mask like the copy's; the constraint
    keeps the box's locations where it is > 0). Pasting a tree onto a spire, the region is the spire: the sky
    around it then need not turn into tree, which would take a far larger edit than the rule itself.
    """

    inputs: Inputs
    copy: Copy
    position: tuple[int, ...] | None = None
    seeds: list[int] | None = None
    region: Tensor | None = None


@dataclass
class Context:
    """Where a rule applies: images and masks ``(N, H, W)``, giving rank-``rank`` directions ``D``."""

    inputs: Inputs
    masks: Tensor | None
    rank: int = 1
    seeds: list[int] | None = None

    @classmethod
    def from_cluster(cls, clusters: KeyClusters, cluster: int, inputs: Inputs, rank: int = 1,
                     seeds: list[int] | None = None) -> "Context":
        """The context of key cluster ``cluster`` in the rows of ``inputs`` that show it (but not everywhere)."""
        masks = clusters.masks(inputs, cluster)
        cover = masks.reshape(masks.shape[0], -1).mean(dim=1)
        keep = ((cover > 0) & (cover < 1)).nonzero()[:, 0].cpu()
        if len(keep) == 0:
            raise ValueError(f"Cluster {cluster} covers none (or all) of every image given: pass other images.")
        kept_seeds = [seeds[int(i)] for i in keep] if seeds is not None else None
        return cls(select_rows(inputs, keep), masks[keep], rank, kept_seeds)


@dataclass
class Erase:
    """Remove what the masked regions show (the authors' watermark removal).

    Target values are the layer's output with the ``units`` key channels most aligned with the context zeroed in
    the keys (blended by the mask over each mask's bounding box); the rank-r insert through ``D`` generalises the
    removal to every key in the context subspace.
    """

    inputs: Inputs
    masks: Tensor | None
    units: int = 30
    seeds: list[int] | None = None


_REQUESTS = {cls.__name__: cls for cls in (Copy, Paste, Context, Erase)}


# ----------------------------------------------------------------------------------------------------------
# Constraints: what the solver fits
# ----------------------------------------------------------------------------------------------------------


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
        raise ValueError(f"{what} takes one image (one row of inputs), got {num_rows(inputs)}.")


def _record(memory: LayerMemory, inputs: Inputs, zero_units: Tensor | None = None) -> Recording:
    rec = memory.record(inputs, zero_units)
    if not isinstance(rec.values, Tensor):
        raise TypeError(f"Layer {memory.layer!r} returns {type(rec.values).__name__}; a rewrite needs a tensor output.")
    if memory.grid(rec.linear) != memory.grid(rec.values):
        raise NotImplementedError(
            f"Layer {memory.layer!r} emits a {memory.grid(rec.values)} grid from a {memory.grid(rec.linear)} grid of "
            f"its weight {memory.key_layer!r}; rewrite the weight's own module instead."
        )
    return rec


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


def _paste_constraint(memory: LayerMemory, paste: Paste) -> tuple[Constraint, Context]:
    """The paste's constraint, and its default context: the pasted region of the target image."""
    _one_row(paste.copy.inputs, "Copy")
    _one_row(paste.inputs, "Paste")
    src = _record(memory, paste.copy.inputs)
    rec = _record(memory, paste.inputs)
    cd = memory.adapter.channel_dim
    grid = memory.grid(rec.values)
    alpha = memory.mask_weights(paste.copy.mask, paste.copy.inputs, src.values)  # (1, *grid)
    offsets = [0] * len(grid)
    ctx_mask = paste.copy.mask
    if paste.position is not None:
        if not grid:
            raise ValueError(f"Layer {memory.layer!r} has one key per row: paste with position=None.")
        size = memory.mask_size(paste.inputs, grid)
        if len(paste.position) != len(grid):
            raise ValueError(f"Paste position must be {len(grid)} image coordinates, got {paste.position}.")
        box_idx = bounding_boxes(alpha)[0].nonzero().float()
        centre = (box_idx.amin(0) + box_idx.amax(0) + 1) / 2
        offsets = [round((p + 0.5) * g / s - c) for p, g, s, c in zip(paste.position, grid, size, centre.tolist())]
        # The same move at image resolution, for the default context (exact when the image is a multiple of the grid).
        ctx_mask = _shift(paste.copy.mask[None], [round(o * s / g) for o, s, g in zip(offsets, size, grid)])[0]
    alpha_t = _shift(alpha, offsets)
    weights = _shift(bounding_boxes(alpha), offsets)
    if weights.sum() == 0:
        raise ValueError(f"Paste position {paste.position} puts the copied region outside the image.")
    if paste.region is not None:
        weights = weights * (memory.mask_weights(paste.region[None], paste.inputs, rec.values) > 0)
        if weights.sum() == 0:
            raise ValueError("The paste region does not meet the pasted copy: draw the region where the copy lands, "
                             "or move the paste position onto it.")
    moved = lambda v: _shift(channels_last(v, cd), offsets).movedim(-1, cd)  # noqa: E731
    c = Constraint(
        rec,
        linear_target=_blend(alpha_t, moved(src.linear), rec.linear, cd),
        target=_blend(alpha_t, moved(src.values), rec.values, cd),
        weights=weights,
    )
    if ctx_mask is not None and ctx_mask.max() == 0:
        raise ValueError(f"Paste position {paste.position} moves the copied mask off the image.")
    return c, Context(paste.inputs, ctx_mask, rank=1, seeds=paste.seeds)


def _erase_constraint(memory: LayerMemory, erase: Erase, context: Context) -> Constraint:
    rec = _record(memory, erase.inputs)
    alpha = memory.mask_weights(erase.masks, erase.inputs, rec.values)
    units = memory.context_units(context.inputs, context.masks, erase.units)
    erased = _record(memory, erase.inputs, zero_units=units)
    cd = memory.adapter.channel_dim
    return Constraint(
        rec,
        linear_target=_blend(alpha, erased.linear, rec.linear, cd),
        target=_blend(alpha, erased.values, rec.values, cd),
        weights=bounding_boxes(alpha),
    )


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
    :meth:`scaled` has already multiplied ``lam`` by.
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

    @property
    def rank(self) -> int:
        return self.directions.shape[0]

    def scaled(self, factor: float) -> "Edit":
        """The same rule at ``factor`` times its strength (``Λ`` scaled; ``D`` and the base are unchanged).

        The solve fits the request's own keys; another key in the context changes by ``Λ D k``, less where it
        projects less onto ``D``. A factor above 1 carries the rule to those weaker matches, at proportionally
        more change everywhere else; below 1 it tones the edit down.
        """
        check_strength(factor)
        return dataclasses.replace(self, lam=self.lam * factor, strength=self.strength * factor)


def check_strength(factor: float) -> None:
    """Refuse a strength factor that is not a finite positive number (ValueError naming it)."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"An edit's strength factor must be a positive number, got {factor}.")


def weight_sha256(weight: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (so a reshaped or recast weight does not match)."""
    t = weight.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def constraint(memory: LayerMemory, target: Paste | Erase, context: Context | None = None) -> tuple[Constraint, Context]:
    """The constraint a request sets, and its context (``context``, or the default: the target's own region at
    rank 1). :func:`solve` uses this; baselines that fit the same constraint another way can too."""
    if isinstance(target, Paste):
        c, default = _paste_constraint(memory, target)
        return c, context or default
    if isinstance(target, Erase):
        context = context or Context(target.inputs, target.masks, rank=1, seeds=target.seeds)
        return _erase_constraint(memory, target, context), context
    raise TypeError(f"A rewrite target is a Paste or an Erase request, got {type(target).__name__}.")


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


def _taps(memory: LayerMemory, pointwise: bool) -> Tensor:
    """Which kernel positions ``Λ`` may use: ``(*kernel)`` of 0 / 1; with ``pointwise`` the centre alone."""
    kernel = memory.kernel_shape
    taps = torch.ones(kernel, dtype=memory.weight.dtype, device=memory.weight.device)
    if pointwise and kernel:
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"Layer {memory.layer!r} has an even {kernel} kernel, without a centre: solve it with "
                             f"pointwise=False.")
        taps.zero_()[tuple(k // 2 for k in kernel)] = 1
    return taps


def _closed_form(memory: LayerMemory, c: Constraint, directions: Tensor, taps: Tensor) -> Tensor:
    """Least-squares ``Λ (out, r, *kernel)`` for the linear output on the constraint (float64, CPU, gelsd), zero
    outside ``taps``."""
    cd = memory.adapter.channel_dim
    u = memory.design(c.rec.keys, directions)
    u = channels_last(u, cd).reshape(-1, u.shape[cd])  # (L, J): J = (r, kernel position)
    res = channels_last(c.linear_target - c.rec.linear, cd).reshape(-1, c.rec.linear.shape[cd])  # (L, out)
    w = c.weights.reshape(-1)
    used = w > 0
    cols = (taps.reshape(1, -1) > 0).expand(directions.shape[0], -1).reshape(-1).cpu()
    root = w[used].double().sqrt().cpu()[:, None]
    sol = torch.linalg.lstsq(u[used][:, cols.to(u.device)].double().cpu() * root, res[used].double().cpu() * root,
                             driver="gelsd").solution
    lam = torch.zeros(memory.out_channels, len(cols), dtype=torch.float64)
    lam[:, cols] = sol.T
    return lam.reshape(memory.out_channels, directions.shape[0], *memory.kernel_shape).to(memory.weight)


def _refine(memory: LayerMemory, c: Constraint, directions: Tensor, lam: Tensor, base: Tensor, taps: Tensor,
            max_iter: int) -> Tensor:
    """L-BFGS on ``Λ`` alone (within ``taps``) through the real layer, from ``lam``; ``W = W₀ + Λ D`` by
    construction."""
    with torch.no_grad():
        scale = constraint_loss(memory, c, base + memory.delta(lam, directions)).clamp_min(1e-30)
    lam = lam.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([lam], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> Tensor:
        loss = constraint_loss(memory, c, base + memory.delta(lam * taps, directions)) / scale
        (grad,) = torch.autograd.grad(loss, lam)  # grads of Λ only: the model's .grad stay untouched
        lam.grad = grad.contiguous()
        return loss

    opt.step(closure)
    return (lam * taps).detach()


def solve(memory: LayerMemory, target: Paste | Erase, context: Context | None = None, refine: bool = True,
          max_iter: int = 50, pointwise: bool = False) -> Edit:
    """Solve a rewrite of ``memory``'s layer; the model's weights and outputs are not changed (apply the result
    with :class:`Rewriter`), though its layer is held (:meth:`LayerMemory.hold`) once the request is valid.

    The closed form fits the layer's linear part (exact for Conv / ConvTranspose / Linear layers). A layer with
    a nonlinear rest is then refined by L-BFGS on Λ through the real layer, started from the closed form, or
    from Λ = 0 where the closed form fits the real layer worse than no edit. ``Edit.solver`` says which ran:
    ``"closed_form"``, ``"closed_form+lbfgs"`` or ``"lbfgs"``; the final loss is never above either start.

    Args:
        target: a :class:`Paste` or an :class:`Erase`.
        context: where the rule applies; default: the target's own region at rank 1.
        refine: run L-BFGS for a layer with a nonlinear rest.
        max_iter: L-BFGS iterations.
        pointwise: for a convolution, change only the kernel's centre, so that each location's new value depends
            on its own key alone (``ΔW k`` exactly as in the key → value view) instead of on its neighbours' keys
            too. Fewer unknowns: a paste onto a small object then generalises by what the other objects' keys
            are, not by how their neighbourhoods happen to resemble the target's.
    """
    start = time.perf_counter()
    c, context = constraint(memory, target, context)
    taps = _taps(memory, pointwise)
    directions = memory.directions(context.inputs, context.masks, context.rank)
    base = memory.weight.detach()
    with torch.no_grad():
        before = float(constraint_loss(memory, c, base))
        lam = _closed_form(memory, c, directions, taps)
        closed = float(constraint_loss(memory, c, base + memory.delta(lam, directions)))
    after, solver = closed, "closed_form"
    if refine and memory.key_layer != memory.layer:
        # A large linear step can fit the real layer worse than no edit (demodulation rescales it): then
        # L-BFGS starts from Λ = 0 instead.
        if closed > before:
            lam, after, solver = torch.zeros_like(lam), before, "lbfgs"
        refined = _refine(memory, c, directions, lam, base, taps, max_iter)
        with torch.no_grad():
            refined_loss = float(constraint_loss(memory, c, base + memory.delta(refined, directions)))
        if refined_loss < after:
            lam, after, solver = refined, refined_loss, "closed_form+lbfgs" if solver == "closed_form" else "lbfgs"
    if not (torch.isfinite(lam).all() and torch.isfinite(directions).all()):
        raise FloatingPointError(f"The rewrite of layer {memory.layer!r} came out non-finite; check the request.")
    return Edit(
        layer=memory.layer, lam=lam, directions=directions, solver=solver, base_sha256=weight_sha256(base),
        loss_before=before, loss_closed_form=closed, loss_after=after, seconds=time.perf_counter() - start,
        request={"target": target, "context": context}, pointwise=pointwise,
    )


# ----------------------------------------------------------------------------------------------------------
# The edit stack
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Applied:
    edit: Edit
    parameter: nn.Parameter
    before: Tensor  # exact copies, so undo and redo are bitwise
    after: Tensor


class Rewriter:
    """The edits applied to one model, in order: apply, undo, redo, revert, save, export.

    Use one Rewriter per model and change weights only through it: undo and redo refuse to run over weights
    changed behind its back.
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

    def rewrite(self, memory: LayerMemory, target: Paste | Erase, context: Context | None = None,
                **solve_args: Any) -> Edit:
        """:func:`solve` then :meth:`apply`."""
        if memory.model is not self.model:
            raise ValueError("This LayerMemory views another model than this Rewriter's.")
        return self.apply(solve(memory, target, context, **solve_args))

    def apply(self, edit: Edit) -> Edit:
        """Add ``edit``'s ``Λ D`` to its layer's weight. Checks everything first; on any failure the model is
        exactly as before."""
        memory = LayerMemory(self.model, edit.layer)
        param = memory.weight
        r = edit.directions.shape[0] if edit.directions.dim() == 2 else -1
        want = (memory.out_channels, r, *memory.kernel_shape)
        if edit.directions.shape != (r, memory.key_channels) or tuple(edit.lam.shape) != want:
            raise ValueError(
                f"Edit shapes do not fit layer {edit.layer!r}: Λ {tuple(edit.lam.shape)} and D "
                f"{tuple(edit.directions.shape)}, expected {want} and ({r}, {memory.key_channels})."
            )
        current = weight_sha256(param)
        if current != edit.base_sha256:
            raise ValueError(
                f"The edit of layer {edit.layer!r} was made for a base weight with sha256 {edit.base_sha256}, but "
                f"this model's weight there has sha256 {current}: a different model, or one edited since. Solve "
                f"the edit again on this model, or apply it to the model it was made for."
            )
        with torch.no_grad():
            before = param.detach().clone()
            after = before + memory.delta(edit.lam.to(param), edit.directions.to(param))
        if not torch.isfinite(after).all():
            raise FloatingPointError(f"The edit of layer {edit.layer!r} gives non-finite weights; not applied.")
        memory.hold()  # as when it was solved: an edit read from a file may meet a fresh model
        self._write(param, after)
        self._done.append(_Applied(edit, param, before, after))
        self._undone.clear()
        return edit

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
        self._undone.append(self._done.pop())
        return applied.edit

    def redo(self) -> Edit:
        """Apply the last undone edit again (bitwise the same weight)."""
        if not self._undone:
            raise IndexError("Nothing to redo.")
        applied = self._undone[-1]
        self._check_untouched(applied, applied.before)
        self._write(applied.parameter, applied.after)
        self._done.append(self._undone.pop())
        return applied.edit

    def revert(self) -> None:
        """Undo every edit: the model is bitwise as it was before the first."""
        while self._done:
            self.undo()

    def save(self, path: str) -> None:
        """The applied edits as safetensors: ``Λ`` and ``D`` per edit, the requests' tensors, and JSON metadata."""
        tensors: dict[str, Tensor] = {}
        edits = []
        for i, a in enumerate(self._done):
            e, prefix = a.edit, f"edits.{i}"
            tensors[f"{prefix}.lambda"] = e.lam.detach().cpu().contiguous().clone()
            tensors[f"{prefix}.directions"] = e.directions.detach().cpu().contiguous().clone()
            edits.append({
                "layer": e.layer, "rank": e.rank, "solver": e.solver, "base_sha256": e.base_sha256,
                "weight_dtype": str(a.before.dtype), "weight_shape": list(a.before.shape),
                "loss_before": e.loss_before, "loss_closed_form": e.loss_closed_form, "loss_after": e.loss_after,
                "seconds": e.seconds, "pointwise": e.pointwise, "strength": e.strength,
                "request": _encode(e.request, f"{prefix}.request", tensors),
            })
        meta = {"format": FORMAT, "version": dissect.__version__, "edits": edits}
        save_file(tensors, path, metadata={"dissect": json.dumps(meta)})

    def export(self, path: str) -> None:
        """The edited model's weights as a safetensors state_dict (``safetensors.torch.load_model`` reads it)."""
        summary = [{"layer": e.layer, "rank": e.rank, "solver": e.solver} for e in self.history]
        save_model(self.model, path, metadata={"dissect": json.dumps({"version": dissect.__version__,
                                                                      "edits": summary})})


def read_edits(path: str) -> list[Edit]:
    """The edits saved in ``path``, requests included, without applying them."""
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("dissect", "{}"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dissect edit file (format {meta.get('format')!r}, want {FORMAT!r}).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return [
        Edit(layer=e["layer"], lam=tensors[f"edits.{i}.lambda"], directions=tensors[f"edits.{i}.directions"],
             solver=e["solver"], base_sha256=e["base_sha256"], loss_before=e["loss_before"],
             loss_closed_form=e["loss_closed_form"], loss_after=e["loss_after"], seconds=e["seconds"],
             request=_decode(e["request"], tensors), pointwise=e.get("pointwise", False),
             strength=e.get("strength", 1.0))
        for i, e in enumerate(meta["edits"])
    ]


def load(path: str, model: nn.Module) -> Rewriter:
    """Apply the edits saved in ``path`` to ``model``, refusing a model whose base weight differs.

    On any refusal the model is left exactly as it was.
    """
    rewriter = Rewriter(model)
    try:
        for edit in read_edits(path):
            rewriter.apply(edit)
    except BaseException as err:
        rewriter.revert()
        if isinstance(err, ValueError):
            raise ValueError(f"Cannot load {path}: {err}") from err
        raise
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
            return _REQUESTS[node["request"]](**{k: _decode(v, tensors) for k, v in node["fields"].items()})
        if "tuple" in node:
            return tuple(_decode(v, tensors) for v in node["tuple"])
        return {k: _decode(v, tensors) for k, v in node["dict"].items()}
    return node
