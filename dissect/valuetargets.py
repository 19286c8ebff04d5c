"""Value targets: store explicit key -> value pairs in a layer, and find a value by optimising the model's output.

These are the two value targets of model editing (ROME, Meng et al. 2022; MEMIT, Meng et al. 2023; Santurkar et
al. 2021 for classifiers), for any layer :class:`~dissect.memory.LayerMemory` views (Linear, Conv, ...). Two
request kinds for :func:`dissect.rewrite.solve` (registered, so edit files and the CLI's JSON hold them):

* :class:`Pairs`: at the masked locations of ``inputs``, the weight should emit given ``values`` (a tensor), or
  what it emits for ``value_inputs`` at the same locations (a watermarked image's keys -> its clean twin's values);
* :class:`OutputTarget`: at the masked locations, the value that makes the model output ``targets`` (a class or
  a token per row; ROME's ``v*``), found by :func:`optimize_value`, then stored like :class:`Pairs`.

Their default context is the masked keys at rank 1 (ROME's direction ``C⁻¹k*``, through the keys of every row);
pass a :class:`~dissect.rewrite.Context` of rank n to store n different values (MEMIT's batch). The solve is the
core's (least change in the metric of C, within its smoothness budget). The functions below are the same
mathematics on raw tensors:

* :func:`keys_at` / :func:`linear_at`: the keys entering a layer's weight, and what the weight emits, at chosen
  locations (``where (N, *grid)``: a token position per row, pixels of a feature map);
* :func:`optimize_value`: ROME's ``v*``: the weight's output at chosen locations plus the one shift ``δ`` that
  minimises a loss on the model's output (every row at once, e.g. one prompt under several prefixes);
* :func:`insert`: an :class:`~dissect.rewrite.Edit` storing ``n`` pairs ``K -> V`` exactly with the least change
  in the metric of C: ``ΔW = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹`` with residuals ``R = V - W K``. For one pair this is ROME's
  rank-one update ``(v* - W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)``; for a batch, MEMIT's at a single layer (the exact
  limit of ``R Kᵀ (λC + K Kᵀ)⁻¹`` as λ -> 0). The edit is ``Λ D`` with ``D`` the ``n`` directions of C⁻¹K
  (:meth:`LayerMemory.directions_from_keys`), so it applies, undoes, saves and loads like any other.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from dissect.errors import NonFiniteError, RequestError
from dissect.hooks import call_model, eval_mode, model_device, to_device
from dissect.memory import Inputs, LayerMemory, channels_last, num_rows
from dissect.rewrite import Constraint, Context, Edit, Request, SpecReader, output_energy, weight_sha256

__all__ = ["Pairs", "OutputTarget", "Shift", "positions", "keys_at", "linear_at", "optimize_value", "insert"]


def positions(index: Tensor, length: int) -> Tensor:
    """``where (N, length)`` bool, true at ``index (N,)`` of each row: one token position per sequence."""
    return F.one_hot(index.long(), length).bool()


def _select(memory: LayerMemory, x: Tensor, where: Tensor) -> Tensor:
    """Rows ``(M, channels)`` of a layer tensor ``x`` (native layout) at the locations ``where (N, *grid) > 0``."""
    grid = memory.grid(x)
    if tuple(where.shape) != (x.shape[0], *grid):
        raise RequestError(f"Locations for layer {memory.layer!r} must be a ({x.shape[0]}, "
                           f"{', '.join(map(str, grid))}) mask on its key grid, got {tuple(where.shape)}.")
    if not where.any():
        raise RequestError(f"No location selected at layer {memory.layer!r}: mark at least one in `where`.")
    return channels_last(x, memory.adapter.channel_dim)[where.to(x.device) > 0]


def keys_at(memory: LayerMemory, inputs: Inputs, where: Tensor) -> Tensor:
    """Keys of ``inputs`` at ``where (N, *grid)``: ``(M, C)``, locations in row-major order."""
    return _select(memory, memory.keys(inputs), where)


def linear_at(memory: LayerMemory, inputs: Inputs, where: Tensor) -> Tensor:
    """What the layer's weight emits (bias included for a plain layer) for ``inputs`` at ``where``: ``(M, out)``."""
    return _select(memory, memory.record(inputs).linear, where)


@contextmanager
def _adding(memory: LayerMemory, added: Callable[[], Tensor]) -> Iterator[None]:
    """While inside, the layer's weight emits its output plus ``added()`` (read at each call; native layout)."""
    handle = memory.key_module.register_forward_hook(lambda module, args, output: output + added())
    try:
        yield
    finally:
        handle.remove()


def _shift_constraint(memory: LayerMemory, inputs: Inputs, masks: Tensor | None, shift: Tensor) -> Constraint:
    """The weight should emit its own output plus ``shift (out,)`` wherever ``masks`` > 0. For a layer with a
    nonlinear rest (a modulated convolution's demodulation, noise, activation) the layer's target is what the rest
    makes of those values, recorded with them written in."""
    rec = memory.record(inputs)
    weights = memory.mask_weights(masks, inputs, rec.linear)
    cd = memory.adapter.channel_dim
    if shift.shape != (rec.linear.shape[cd],) or not torch.isfinite(shift).all():
        raise RequestError(f"A shift at layer {memory.layer!r} is one finite ({rec.linear.shape[cd]},) vector of its "
                           f"output channels, got {tuple(shift.shape)}.")
    shape = [1] * rec.linear.dim()
    shape[cd] = -1
    added = (weights > 0).unsqueeze(cd).to(rec.linear) * shift.to(rec.linear).view(shape)
    if memory.key_layer == memory.layer:
        target = rec.linear + added
    else:
        with _adding(memory, lambda: added):
            target = memory.record(inputs).values
    return Constraint(rec, linear_target=rec.linear + added, target=target, weights=weights)


def optimize_value(memory: LayerMemory, inputs: Inputs, where: Tensor, loss_fn: Callable[[Any], Tensor],
                   steps: int = 40, lr: float = 0.5, weight_decay: float = 1e-3, max_norm: float = 4.0,
                   ) -> tuple[Tensor, Tensor]:
    """ROME's target value: ``(v* (out,), δ (out,))``, the mean weight output at ``where`` plus the shift ``δ``
    that, added to the weight's output at every selected location of every row, minimises ``loss_fn(model output)``.

    ``loss_fn`` maps the model's output for ``inputs`` to a scalar (e.g. the negative log-likelihood of a new
    answer). ``δ`` is found by Adam (``steps``, ``lr``) with ``weight_decay · ‖δ‖² / ‖v‖²`` and is kept within
    ``max_norm`` times the mean norm of the original outputs (ROME's clamp). The model is not changed.
    """
    model = memory.model
    base = linear_at(memory, inputs, where)  # (M, out)
    scale = base.norm(dim=1).mean().clamp_min(1e-6)
    delta = torch.zeros(base.shape[1], dtype=base.dtype, device=base.device, requires_grad=True)
    cd = memory.adapter.channel_dim
    mask = where.to(device=base.device, dtype=base.dtype).unsqueeze(cd)
    shape = [1] * mask.dim()
    shape[cd] = -1

    opt = torch.optim.Adam([delta], lr=lr * float(scale) / base.shape[1] ** 0.5)
    batch = to_device(inputs, model_device(model))
    with eval_mode(model), _adding(memory, lambda: mask * delta.view(shape)):
        for _ in range(steps):
            loss = loss_fn(call_model(model, batch)) + weight_decay * delta.square().sum() / scale**2
            if not torch.isfinite(loss):
                raise NonFiniteError(f"The value objective at layer {memory.layer!r} is not finite; check loss_fn.")
            (grad,) = torch.autograd.grad(loss, delta)  # δ only: the model's .grad stay untouched
            opt.zero_grad(set_to_none=True)
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                delta.mul_(torch.clamp(max_norm * scale / delta.norm().clamp_min(1e-12), max=1.0))
    return (base.mean(0) + delta).detach(), delta.detach()


def insert(memory: LayerMemory, keys: Tensor, values: Tensor, current: Tensor | None = None,
           request: dict[str, Any] | None = None) -> Edit:
    """An edit that makes the layer's weight emit ``values (n, out)`` for ``keys (n, C)`` with the least change
    ``‖ΔW‖`` in the metric of C (C must be set: :meth:`LayerMemory.fit_moment`).

    ``current (n, out)``: what the weight emits now where the keys were read (:func:`linear_at`); for a Linear
    layer it defaults to ``W k + b``. A convolution's output depends on neighbouring keys too, so there it is
    required, and the edit is pointwise (``Λ`` at the kernel's centre: a location moves by its own key alone).
    Rank ``n`` (at most C); pairs whose keys are linearly dependent but whose values are not are fitted in least
    squares. The model is not changed: apply the result with :class:`~dissect.rewrite.Rewriter`.
    """
    start = time.perf_counter()
    c, out, kernel = memory.key_channels, memory.out_channels, memory.kernel_shape
    n = keys.shape[0] if keys.dim() == 2 else -1
    if keys.dim() != 2 or keys.shape[1] != c or values.shape != (n, out) or (
            current is not None and current.shape != (n, out)):
        raise RequestError(f"Pairs for layer {memory.layer!r} are keys (n, {c}) and values (n, {out}) (and current "
                           f"values (n, {out})); got keys {tuple(keys.shape)} and values {tuple(values.shape)}.")
    if not 1 <= n <= c:
        raise RequestError(f"Layer {memory.layer!r} stores 1 to {c} pairs in one edit (its key width); got {n}. "
                           "Split them into several edits.")
    if any(k % 2 == 0 for k in kernel):
        raise RequestError(f"Layer {memory.layer!r} has an even {kernel} kernel without a centre for a pointwise edit.")
    weight = memory.weight.detach()
    ref = keys.to(weight)
    if current is None:
        if kernel:
            raise RequestError(f"Layer {memory.layer!r} is a convolution: pass current= (linear_at of the inputs the "
                               "keys came from), since its output also depends on neighbouring keys.")
        current = memory.adapter.linear(memory.key_module, ref, weight)
        bias = getattr(memory.key_module, "bias", None)
        if isinstance(bias, Tensor):
            current = current + bias.detach()
    if not all(torch.isfinite(t).all() for t in (keys, values, current)):
        raise NonFiniteError(f"Keys or values for layer {memory.layer!r} hold NaN or Inf.")
    memory.moment  # raises, naming the fix, when C is not set
    residual = (values.to(weight) - current.to(weight)).double().cpu()  # (n, out)
    directions = memory.directions_from_keys(ref, torch.ones(n, dtype=weight.dtype, device=weight.device), rank=n)
    proj = (ref @ directions.T).double().cpu()  # (n, r): D k of each key
    lam = torch.linalg.lstsq(proj, residual, driver="gelsd").solution.T  # (out, r)
    fit = proj @ lam.T - residual
    full = torch.zeros(out, n, *kernel, dtype=torch.float64)
    full[(slice(None), slice(None), *(k // 2 for k in kernel))] = lam
    before, after = float(residual.square().mean()), float(fit.square().mean())
    return Edit(layer=memory.layer, lam=full.to(weight), directions=directions, solver="pairs_closed_form",
                base_sha256=weight_sha256(weight), loss_before=before, loss_closed_form=after, loss_after=after,
                seconds=time.perf_counter() - start, pointwise=bool(kernel), output_energy=output_energy(memory),
                request=request if request is not None else {"keys": keys.detach(), "values": values.detach()})


# ----------------------------------------------------------------------------------------------------------
# Request kinds
# ----------------------------------------------------------------------------------------------------------


def _plain(memory: LayerMemory) -> None:
    if memory.key_layer != memory.layer:
        raise RequestError(f"Layer {memory.layer!r} has a nonlinear rest after its weight {memory.key_layer!r}; "
                           f"store values at the weight's own module: LayerMemory(model, {memory.key_layer!r}).")


def _pairs_constraint(memory: LayerMemory, inputs: Inputs, masks: Tensor | None, values: Tensor,
                      context: Context | None, seeds: list[int] | None) -> tuple[Constraint, Context]:
    """The weight should emit ``values`` (its output layout) where ``masks`` > 0; elsewhere it is unconstrained."""
    rec = memory.record(inputs)
    if values.shape != rec.linear.shape:
        raise RequestError(f"Values for layer {memory.layer!r} have the shape of its output for these inputs, "
                           f"{tuple(rec.linear.shape)}; got {tuple(values.shape)}.")
    if not torch.isfinite(values).all():
        raise NonFiniteError(f"The values to store at layer {memory.layer!r} hold NaN or Inf.")
    weights = memory.mask_weights(masks, inputs, rec.linear)
    values = values.to(rec.linear)
    return Constraint(rec, linear_target=values, target=values, weights=weights), context or Context(
        inputs, masks, rank=1, seeds=seeds)


@dataclass
class Pairs(Request):
    """Store explicit values: where ``masks`` > 0, the keys of ``inputs`` should make the layer's weight emit
    ``values`` (a tensor shaped like the weight's output for ``inputs``: ``(N, out, H, W)``, ``(N, T, out)``,
    ``(N, out)``), or, with ``value_inputs`` instead, what it emits for those inputs at the same locations.

    ``masks`` as in every request: image resolution for a 2-D key grid, the grid itself for a sequence
    ``(N, T)``, ``None`` for one key per row. Santurkar et al.'s classifier rewrite is
    ``Pairs(watermarked, masks, value_inputs=clean)``. The layer must be its own memory (a Linear or a conv).
    """

    inputs: Inputs
    masks: Tensor | None
    values: Tensor | None = None
    value_inputs: Inputs | None = None
    seeds: list[int] | None = None
    value_seeds: list[int] | None = None

    json_key: ClassVar[str] = "pairs"

    @classmethod
    def from_json(cls, spec: dict, reader: SpecReader) -> "Pairs":
        """``{"pairs": {<regions, as for erase>, "values_from": [seed, ...]}}``: one value seed per key seed."""
        seeds, masks = reader.regions(spec["pairs"], "pairs")
        value_seeds = spec["pairs"].get("values_from")
        if not (isinstance(value_seeds, list) and len(value_seeds) == len(seeds)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value_seeds)):
            raise RequestError(f"pairs: 'values_from' lists one seed per key seed ({len(seeds)}), whose values the "
                               f"keys should get; got {value_seeds!r}.")
        return cls(reader.inputs(seeds), masks, value_inputs=reader.inputs(value_seeds), seeds=seeds,
                   value_seeds=value_seeds)

    def check(self, memory: LayerMemory) -> None:
        """Refuse what can be refused before C is collected: a composite layer, values and value inputs both or
        neither given, a row count that differs from the inputs'."""
        _plain(memory)
        if (self.values is None) == (self.value_inputs is None):
            raise RequestError("A Pairs request takes either values (a tensor) or value_inputs (inputs whose values "
                               "the keys should get), not both or neither.")
        if self.value_inputs is not None and num_rows(self.value_inputs) != num_rows(self.inputs):
            raise RequestError(f"Pairs: {num_rows(self.value_inputs)} value inputs for {num_rows(self.inputs)} "
                               f"key inputs; give one per row.")

    def constraint(self, memory: LayerMemory, context: Context | None) -> tuple[Constraint, Context]:
        self.check(memory)
        values = self.values if self.values is not None else memory.record(self.value_inputs).linear
        return _pairs_constraint(memory, self.inputs, self.masks, values, context, self.seeds)


@dataclass
class OutputTarget(Request):
    """ROME's objective-driven value: where ``masks`` > 0, store the value that makes the model output
    ``targets (N,)`` (a class index per row, or a token read at ``position`` of a ``(N, T, vocab)`` output).

    The value is the weight's current output there plus one shift ``δ`` for all rows (e.g. one prompt under
    several prefixes), found by :func:`optimize_value` (``steps``, ``lr``, ``weight_decay``, ``max_norm``);
    then stored like :class:`Pairs`. The layer must be its own memory (a Linear or a conv).
    """

    inputs: Inputs
    masks: Tensor | None
    targets: Tensor
    position: int | None = None
    steps: int = 40
    lr: float = 0.5
    weight_decay: float = 1e-3
    max_norm: float = 4.0
    seeds: list[int] | None = None

    json_key: ClassVar[str] = "output_target"

    @classmethod
    def from_json(cls, spec: dict, reader: SpecReader) -> "OutputTarget":
        """``{"output_target": {<regions, as for erase>, "targets": [class or token, ...], "position": int}}``."""
        body = spec["output_target"]
        seeds, masks = reader.regions(body, "output_target")
        targets = body.get("targets")
        if not (isinstance(targets, list) and len(targets) == len(seeds)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in targets)):
            raise RequestError(f"output_target: 'targets' lists one class or token index per seed ({len(seeds)}), "
                               f"got {targets!r}.")
        position = body.get("position")
        if position is not None and (isinstance(position, bool) or not isinstance(position, int)):
            raise RequestError(f"output_target: 'position' is the index of the output position to read, got "
                               f"{position!r}.")
        return cls(reader.inputs(seeds), masks, torch.tensor(targets), position=position, seeds=seeds)

    def loss(self, output: Any) -> Tensor:
        """Cross-entropy of ``targets`` under the model's ``output`` (logits)."""
        logits = output if self.position is None else output[:, self.position]
        return F.cross_entropy(logits, self.targets.to(logits.device))

    def check(self, memory: LayerMemory) -> None:
        """Refuse what can be refused before C is collected (one forward of the inputs): a composite layer,
        targets that are not one index per row, a model that does not return logits, a position or a target
        outside them."""
        _plain(memory)
        n = num_rows(self.inputs)
        if not isinstance(self.targets, Tensor) or self.targets.shape != (n,) or self.targets.is_floating_point():
            raise RequestError(f"OutputTarget takes one integer target per input row: a ({n},) tensor, got "
                               f"{self.targets!r}.")
        with eval_mode(memory.model), torch.no_grad():
            out = call_model(memory.model, to_device(self.inputs, model_device(memory.model)))
        if not isinstance(out, Tensor) or out.dim() != (2 if self.position is None else 3):
            raise RequestError(f"OutputTarget reads logits (N, classes), or (N, T, vocab) with a position; the model "
                               f"returns {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}.")
        if self.position is not None and not -out.shape[1] <= self.position < out.shape[1]:
            raise RequestError(f"OutputTarget position {self.position} is outside the model's {out.shape[1]} positions.")
        vocab = out.shape[-1]
        if self.targets.min() < 0 or self.targets.max() >= vocab:
            raise RequestError(f"OutputTarget targets must be indices in [0, {vocab}) (the model's outputs); got "
                               f"{self.targets.min().item()} .. {self.targets.max().item()}.")

    def constraint(self, memory: LayerMemory, context: Context | None) -> tuple[Constraint, Context]:
        self.check(memory)
        where = memory.mask_weights(self.masks, self.inputs, memory.record(self.inputs).linear) > 0
        _, shift = optimize_value(memory, self.inputs, where, self.loss, self.steps, self.lr, self.weight_decay,
                                  self.max_norm)
        return Shift(self.inputs, self.masks, shift, seeds=self.seeds).constraint(memory, context)


@dataclass
class Shift(Request):
    """Move what the layer's weight emits at the masked locations of ``inputs`` by one vector ``shift (out,)``: a
    value found by an objective on the model's output (:func:`optimize_value`; e.g.
    :func:`dissect.appearance.paste_shift`), stored as a rule. Works at any layer, a nonlinear rest included.

    ``masks (N, H, W)`` as a context's; :meth:`at` moves the same shift onto other images, so the strength can be
    calibrated on held-out ones. ``source``: provenance (e.g. the seeds a value was copied from), kept in saved
    files. Default context: the masked locations at rank 1.
    """

    inputs: Inputs
    masks: Tensor | None
    shift: Tensor
    seeds: list[int] | None = None
    source: list[int] | None = None

    def at(self, inputs: Inputs, mask: Tensor) -> list["Shift"]:
        return [Shift(inputs, mask[None], self.shift)]

    def constraint(self, memory: LayerMemory, context: Context | None) -> tuple[Constraint, Context]:
        return _shift_constraint(memory, self.inputs, self.masks, self.shift), context or Context(
            self.inputs, self.masks, rank=1, seeds=self.seeds)
