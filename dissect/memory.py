"""A layer as a linear associative memory (Bau et al., "Rewriting a Deep Generative Model", ECCV 2020).

Vocabulary, for a layer whose weight ``W`` maps keys to values:

* **key** ``k``: the feature vector entering ``W`` at one location (``C`` channels). For Conv1d/Conv2d,
  ConvTranspose2d and Linear it is the layer's input; a composite layer (the generator's ``ModulatedConv2d``)
  names the child whose input is the key in ``memory_key_module`` (there: the modulated activation).
* **value**: what the layer emits at a location. For a composite layer everything after ``W`` (demodulation,
  noise, bias, activation) is the *nonlinear rest*; what ``W`` alone emits is the *linear output*. A rest that
  reads the weight itself (a demodulation) is held at the base weight before a rewrite (``LayerMemory.hold``),
  so that it does not spread ``ΔW`` to every key.
* **C** ``= E[k kᵀ]``: the uncentered second moment of keys over the model's input distribution. Every solve
  uses ``C + ridge · tr(C)/C_dim · I`` (``ridge = 1e-4`` by default, i.e. 1e-4 of C's mean eigenvalue), so a
  singular C (dead units, more channels than samples) still gives finite, well-defined answers.
* **directions** ``D (r, C)``: the rank-r context subspace. An edit is ``W₁ = W₀ + Λ D`` contracted over the key
  axis (for a conv, ``ΔW[o, i, y, x] = Σ_r Λ[o, r, y, x] D[r, i]``), so a key with ``D k = 0`` keeps its value.
  Rows of D are orthonormal **in the metric of C**: ``D C Dᵀ = I``. Then ``D k`` are the key's coordinates in the
  context subspace of the whitened space, in units of the data's RMS along each direction.
* **whitening**: with the Cholesky factor ``C = L Lᵀ`` (of the regularised C), ``L⁻¹ k`` has identity second
  moment; it is ``C^{-1/2} k`` up to one fixed rotation, which directions, norms, distances and clusters do not
  see. Solves use the factor (no eigendecomposition: about 40x faster at 1024 channels); ``eigh()`` is only
  for showing C's spectrum.

Grids: a key map ``(N, C, H, W)`` has the key grid ``(H, W)``; Linear keys ``(N, C)`` have the empty grid ``()``
(one key per input row) and ``(N, T, C)`` the grid ``(T,)``. Masks (see ``docs/ARCHITECTURE.md``) are at image
resolution for 2-D grids and are area-resized to the key (or value) grid as soft weights; for a 1-D grid they
are given at the grid itself, and layers with one key per row take ``masks=None``.

Forward passes here run in eval mode under ``no_grad`` (modes restored after), so BatchNorm statistics and
other buffers are never touched. A layer (or its key module) must run exactly once per forward: one forward of
one row checks it the first time the model's layer is recorded (``hooks.check_single_call``). Keys, values and weights
holding NaN or Inf are refused (:class:`~dissect.errors.NonFiniteError`) before anything is solved.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dissect import shipped, stats
from dissect.errors import LayerError, NonFiniteError, RequestError
from dissect.hooks import (
    TraceDict,
    call_model,
    check_single_call,
    eval_mode,
    get_module,
    import_adapters,
    key_module_name,
    model_device,
    register_layer_type,
    to_device,
)

__all__ = [
    "MemoryAdapter",
    "register_adapter",
    "LayerMemory",
    "Recording",
    "KeyClusters",
    "ClusterName",
    "DEFAULT_RIDGE",
    "eval_mode",
    "channels_last",
    "resize_masks",
    "bounding_boxes",
    "select_rows",
    "concat_rows",
    "num_rows",
    "rank_by_peak",
    "positive_rank",
]

DEFAULT_RIDGE = 1e-4
Inputs = Any  # a batch the forward takes: a tensor, a tuple / list of positional arguments, or a dict of keywords


# ----------------------------------------------------------------------------------------------------------
# Adapters: where a module type keeps its memory
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryAdapter:
    """How a module type holds a memory.

    Args:
        weight: name of the parameter that is the memory.
        key_axis: axis of that parameter indexing key channels (the module's input channels).
        out_axis: axis indexing output channels. Every other axis is a kernel axis (``kh, kw`` of a conv).
        channel_dim: axis of the key (and output) tensors holding channels: 1 (convolutions) or -1 (Linear).
        linear: ``linear(module, keys, weight) -> output`` without bias, for any weight whose out axis may have
            any size. It must be linear in ``weight`` and output channel ``o`` may depend only on ``weight``'s slice
            ``o`` (true of ungrouped convolutions and Linear); the closed-form solve relies on both.

    Example (a module that keeps its matrix in ``self.kernel`` laid out ``(in, out)`` and applies ``x @ kernel``)::

        register_adapter(MyDense, MemoryAdapter("kernel", key_axis=0, out_axis=1, channel_dim=-1,
                                                linear=lambda m, k, w: k @ w))
    """

    weight: str
    key_axis: int
    out_axis: int
    channel_dim: int
    linear: Callable[[nn.Module, Tensor, Tensor], Tensor]

    def __post_init__(self) -> None:
        if self.channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 (channels first) or -1 (channels last), got {self.channel_dim}.")

    def shape(self, module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
        """``(in, out, kernel)`` of ``module``'s memory: key channels, output channels, the other axes' sizes."""
        weight = getattr(module, self.weight)
        axes = (self.key_axis % weight.dim(), self.out_axis % weight.dim())
        return weight.shape[axes[0]], weight.shape[axes[1]], tuple(n for a, n in enumerate(weight.shape) if a not in axes)


_ADAPTERS: dict[type, MemoryAdapter] = {}


def register_adapter(module_type: type, adapter: MemoryAdapter) -> None:
    """Let :class:`LayerMemory` view ``module_type`` (and its subclasses) as a memory."""
    _ADAPTERS[module_type] = adapter
    register_layer_type(module_type, adapter.shape, channels_last=adapter.channel_dim == -1)


def _conv_linear(module: nn.Module, keys: Tensor, weight: Tensor) -> Tensor:
    return module._conv_forward(keys, weight, None)  # honours padding_mode, unlike F.conv2d


def _conv_transpose_linear(module: nn.Module, keys: Tensor, weight: Tensor) -> Tensor:
    return F.conv_transpose2d(
        keys, weight, None, module.stride, module.padding, module.output_padding, module.groups, module.dilation
    )


register_adapter(nn.Linear, MemoryAdapter("weight", 1, 0, -1, lambda m, k, w: F.linear(k, w)))
register_adapter(nn.Conv1d, MemoryAdapter("weight", 1, 0, 1, _conv_linear))
register_adapter(nn.Conv2d, MemoryAdapter("weight", 1, 0, 1, _conv_linear))
# ConvTranspose2d weights are laid out (in, out, kh, kw): keys on axis 0.
register_adapter(nn.ConvTranspose2d, MemoryAdapter("weight", 0, 1, 1, _conv_transpose_linear))


def _find_adapter(module: nn.Module) -> MemoryAdapter | None:
    import_adapters(type(module))
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def _unsupported(layer: str, module: nn.Module, why: str) -> LayerError:
    known = ", ".join(sorted(t.__name__ for t in _ADAPTERS))
    return LayerError(
        f"Layer {layer!r} ({type(module).__name__}) cannot be viewed as a memory: {why}. Supported: {known}, "
        f"and any module whose class sets `memory_key_module` to the name of such a child. For another type, "
        f"register an adapter: dissect.memory.register_adapter({type(module).__name__}, "
        f"MemoryAdapter(weight=..., key_axis=..., out_axis=..., channel_dim=..., linear=...))."
    )


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    with eval_mode(model), torch.no_grad():
        yield


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside ``value`` (a tensor, or nested tuples / lists / dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _first_tensor(inputs: Inputs) -> Tensor:
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return next(x for x in inputs if isinstance(x, Tensor))
    return inputs


def num_rows(inputs: Inputs) -> int:
    """How many rows (samples) a batch holds."""
    return _first_tensor(inputs).shape[0]


def select_rows(inputs: Inputs, index: slice | Tensor) -> Inputs:
    """The rows ``index`` of a batch (every tensor of a tuple, list or dict batch is indexed alike)."""
    pick = lambda x: x[index] if isinstance(x, Tensor) else x  # noqa: E731
    if isinstance(inputs, dict):
        return {k: pick(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(pick(x) for x in inputs)
    return pick(inputs)


def concat_rows(a: Inputs, b: Inputs) -> Inputs:
    """Two batches of the same structure (tensor, tuple / list or dict of tensors) as one, rows of ``a`` first."""
    if isinstance(a, Tensor):
        return torch.cat([a, b.to(a.device)])
    if isinstance(a, dict):
        return {k: concat_rows(v, b[k]) if isinstance(v, Tensor) else v for k, v in a.items()}
    if isinstance(a, (tuple, list)):
        return type(a)(concat_rows(x, y) if isinstance(x, Tensor) else x for x, y in zip(a, b))
    raise RequestError(f"Cannot join inputs of type {type(a).__name__}; give tensors, tuples or dicts of them.")


def channels_last(x: Tensor, channel_dim: int) -> Tensor:
    """``(N, C, *grid)`` or ``(N, *grid, C)`` -> ``(N, *grid, C)``."""
    return x.movedim(channel_dim, -1)


def bounding_boxes(masks: Tensor) -> Tensor:
    """``masks (N, *grid)`` -> the indicator of each row's bounding box of ``masks > 0`` (same shape and dtype;
    all zero for an empty row): the region a rewrite constrains around a soft mask, or a brushed rectangle."""
    box = torch.ones_like(masks, dtype=torch.bool)
    for d in range(1, masks.dim()):
        other = [a for a in range(1, masks.dim()) if a != d]
        hit = (masks.amax(dim=other) if other else masks) > 0  # (N, g)
        idx = torch.arange(masks.shape[d], device=masks.device)
        first = torch.where(hit, idx, masks.shape[d]).amin(dim=1, keepdim=True)
        last = torch.where(hit, idx, -1).amax(dim=1, keepdim=True)
        shape = [masks.shape[0]] + [1] * (masks.dim() - 1)
        shape[d] = masks.shape[d]
        box &= ((idx >= first) & (idx <= last)).view(shape)
    return box.to(masks.dtype)


def resize_masks(masks: Tensor, grid: Sequence[int]) -> Tensor:
    """Soft weights on ``grid``: ``masks (N, H, W)`` area-averaged to ``(N, *grid)`` (a 2-D grid)."""
    if tuple(masks.shape[1:]) == tuple(grid):
        return masks
    return F.interpolate(masks[:, None], size=tuple(grid), mode="area")[:, 0]


@dataclass
class Recording:
    """What one forward shows of a layer, for ``N`` input rows.

    ``keys``: the key module's input, native layout (``(N, C, H, W)``, ``(N, C)``, ``(N, T, C)``);
    ``linear``: what the memory weight emits (the key module's output, bias included for a plain layer);
    ``values``: the layer's output; ``args`` / ``kwargs``: the layer's call, to run it alone again.
    """

    keys: Tensor
    linear: Tensor
    values: Tensor
    args: tuple
    kwargs: dict


# ----------------------------------------------------------------------------------------------------------
# LayerMemory
# ----------------------------------------------------------------------------------------------------------


def positive_rank(rank: Any, limit: str = "up to the key dimension") -> int:
    """``rank`` as an int if it is a positive integer, else :class:`RequestError` (``limit`` ends the message)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise RequestError(f"Rank {rank!r} is not a positive integer: a context has rank 1 (one direction) or "
                           f"more, {limit}.")
    return int(rank)


def rank_by_peak(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Score maps ``(N, *grid)`` ordered by their peak: ``(order (N,), peak (N,))``, best first."""
    best = scores.flatten(1).amax(dim=1)
    order = best.argsort(descending=True)
    return order, best[order]


class LayerMemory:
    """The layer ``layer`` of ``model`` viewed as a linear associative memory.

    Args:
        model: any ``nn.Module``; layer names are ``model.named_modules()`` names.
        layer: the layer to view: a supported module, or one with ``memory_key_module``.
        ridge: relative ridge for every solve with C (see the module docstring).
        image_size: ``(H, W)`` masks are drawn at. Default: the largest 4-D tensor among the model's inputs and
            outputs (inside tuples, lists and dicts too), found by one forward of one row when masks are first
            checked (:meth:`mask_size`).
    """

    def __init__(
        self, model: nn.Module, layer: str, ridge: float = DEFAULT_RIDGE, image_size: tuple[int, int] | None = None
    ) -> None:
        self.model = model
        self.layer = layer
        self.module = get_module(model, layer)
        self.key_layer = key_module_name(model, layer)
        self.key_module = get_module(model, self.key_layer)
        adapter = _find_adapter(self.key_module)
        if adapter is None:
            why = "it has no registered memory adapter"
            if self.key_layer != layer:
                why = f"its memory child {self.key_layer!r} ({type(self.key_module).__name__}) has no adapter"
            raise _unsupported(layer, self.module, why)
        if getattr(self.key_module, "groups", 1) != 1:
            raise _unsupported(layer, self.module, f"grouped convolutions (groups={self.key_module.groups}) mix "
                               "a different weight slice into each group of keys")
        weight = getattr(self.key_module, adapter.weight, None)
        if not isinstance(weight, nn.Parameter):
            raise _unsupported(layer, self.module, f"it has no parameter {adapter.weight!r}")
        self.adapter = adapter
        self.ridge = ridge
        self.image_size = tuple(image_size) if image_size is not None else None
        # The memory weight's name relative to `layer` (for running the layer alone) and in the whole model.
        relative = self.key_layer[len(layer) + 1 :] if self.key_layer != layer else ""
        self.weight_name = f"{relative}.{adapter.weight}" if relative else adapter.weight
        self.parameter_name = f"{layer}.{self.weight_name}" if layer else self.weight_name
        tied = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight and n != self.parameter_name]
        if tied:  # an edit would also change the other module, which no solve accounts for
            raise LayerError(f"The weight of layer {layer!r} ({self.parameter_name}) is tied to {tied[0]}: an edit would "
                             f"change both. Untie it first (give the layer its own copy: nn.Parameter(weight.detach()"
                             f".clone()); for transformers, tie_word_embeddings=False), or choose another layer.")
        ndim = weight.dim()
        self._perm = [adapter.out_axis % ndim, adapter.key_axis % ndim] + [
            a for a in range(ndim) if a not in (adapter.out_axis % ndim, adapter.key_axis % ndim)
        ]
        self._moment: Tensor | None = None
        self._factor: Tensor | None = None  # Cholesky factor L of the regularised C (float64, CPU)

    # -- the weight ------------------------------------------------------------------------------------------

    @property
    def weight(self) -> nn.Parameter:
        """The memory parameter itself (not a copy)."""
        return getattr(self.key_module, self.adapter.weight)

    def hold(self) -> None:
        """Before a rewrite: fix whatever the layer's rest reads from the weight itself, so that ``ΔW`` acts
        only through ``ΔW k``. A composite layer opts in with a ``memory_hold()`` method (the generator's
        ``ModulatedConv2d`` holds its demodulation); the layer's output is unchanged by the call."""
        hold = getattr(self.module, "memory_hold", None)
        if callable(hold):
            hold()

    @property
    def key_channels(self) -> int:
        return self.weight.shape[self.adapter.key_axis]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[self.adapter.out_axis]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """Weight axes other than out and key: ``(kh, kw)`` for a Conv2d, ``()`` for Linear."""
        return tuple(self.weight.shape[a] for a in self._perm[2:])

    def _from_canonical(self, w: Tensor) -> Tensor:
        """``(out, key, *kernel)`` -> the module's own weight layout."""
        return w.permute(*np.argsort(self._perm).tolist())

    def delta(self, lam: Tensor, directions: Tensor) -> Tensor:
        """``ΔW`` in the weight's layout from ``lam (out, r, *kernel)`` and ``directions (r, C)``."""
        return self._from_canonical(torch.einsum("or...,ri->oi...", lam, directions))

    def design(self, keys: Tensor, directions: Tensor) -> Tensor:
        """How each unknown of ``Λ`` moves the linear output: ``(N, J, *grid_out)`` channels at ``channel_dim``.

        The weight ``B_j`` for ``j = (r, kernel position)`` is ``D[r]`` at that kernel position and zero elsewhere,
        so that ``linear(keys, Λ D) = Σ_j Λ[:, j] · linear(keys, B_j)``; ``J = r · prod(kernel)``.
        """
        r, c = directions.shape
        kernel = self.kernel_shape
        k = math.prod(kernel)
        onehot = torch.eye(k, dtype=directions.dtype, device=directions.device).view(1, k, 1, *kernel)
        basis = directions.view(r, 1, c, *([1] * len(kernel))) * onehot
        return self.adapter.linear(self.key_module, keys, self._from_canonical(basis.reshape(r * k, c, *kernel)))

    # -- running the model -----------------------------------------------------------------------------------

    def record(self, inputs: Inputs, zero_units: Tensor | None = None) -> Recording:
        """Keys, linear output, values and the layer's call for ``inputs``; the forward stops after the layer.

        ``zero_units (n,)``: key channels set to zero before the weight sees them (the erase request's targets).
        Refuses a layer that does not run exactly once per forward (checked once) and NaN or Inf in the weight,
        keys or values.
        """
        self.check_finite_weight()
        one = to_device(select_rows(inputs, slice(0, 1)), model_device(self.model))
        check_single_call(self.model, dict.fromkeys([self.key_layer, self.layer]), one)
        call: dict[str, Any] = {}

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call["args"], call["kwargs"] = args, kwargs

        handle = self.module.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with contextlib.ExitStack() as stack:
                if zero_units is not None:
                    stack.enter_context(self.ablate(zero_units))
                traces = stack.enter_context(TraceDict(self.model, [self.key_layer, self.layer], retain_input=True,
                                                       stop=True))
                with _inference(self.model):
                    self._run(inputs)
        finally:
            handle.remove()
        rec = Recording(
            keys=traces[self.key_layer].input,
            linear=traces[self.key_layer].output,
            values=traces[self.layer].output,
            args=call["args"],
            kwargs=call["kwargs"],
        )
        for what, x in (("keys", rec.keys), ("output", rec.values)):
            if isinstance(x, Tensor) and not torch.isfinite(x).all():
                raise NonFiniteError(f"The {what} of layer {self.layer!r} hold NaN or Inf for these inputs: check the "
                                     f"inputs and the weights before the layer.")
        return rec

    def check_finite_weight(self) -> None:
        """Refuse (:class:`NonFiniteError`) a memory weight holding NaN or Inf."""
        if not torch.isfinite(self.weight).all():
            raise NonFiniteError(f"The weight of layer {self.layer!r} ({self.parameter_name}) holds NaN or Inf: "
                                 f"reload the model's weights before viewing or rewriting it.")

    @contextlib.contextmanager
    def ablate(self, units: Tensor) -> Iterator[None]:
        """Within the block, key channels ``units (n,)`` are zero wherever the weight sees them (in every forward
        of the model): GAN-dissection unit ablation, and the erase request's targets."""

        def zero(module: nn.Module, args: tuple) -> tuple:
            keys = args[0].clone()
            keys.index_fill_(self.adapter.channel_dim % keys.dim(), units.to(keys.device), 0.0)
            return (keys, *args[1:])

        handle = self.key_module.register_forward_pre_hook(zero)
        try:
            yield
        finally:
            handle.remove()

    def _run(self, inputs: Inputs) -> Any:
        # Inputs follow the model's device, as in stats.collect (a sampler draws on the CPU).
        return call_model(self.model, to_device(inputs, model_device(self.model)))

    def keys(self, inputs: Inputs) -> Tensor:
        """Keys of ``inputs``: ``(N, C, H, W)`` for a conv, ``(N, C)`` or ``(N, T, C)`` for Linear."""
        return self.record(inputs).keys

    def values(self, inputs: Inputs) -> Tensor:
        """The layer's output for ``inputs``, e.g. ``(N, out, H, W)``."""
        return self.record(inputs).values

    def grid(self, x: Tensor) -> tuple[int, ...]:
        """The location grid of a key or output tensor: ``(H, W)``, ``(T,)`` or ``()``."""
        dims = [d for d in range(1, x.dim()) if d != self.adapter.channel_dim % x.dim()]
        return tuple(x.shape[d] for d in dims)

    def flat_keys(self, keys: Tensor) -> Tensor:
        """``keys`` in native layout -> ``(N · prod(grid), C)`` rows, locations in row-major order."""
        return stats.rows(keys, channels_last=self.adapter.channel_dim == -1)

    # -- masks -------------------------------------------------------------------------------------------------

    def mask_size(self, inputs: Inputs, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The size masks for a layer with key grid ``grid`` are drawn at (see the module docstring).

        For a 2-D grid: ``image_size`` if given, else the largest 4-D tensor among the model's inputs and outputs
        (a tensor, or inside a tuple, list or dict: a classifier's or encoder's image is its input, a generator's
        or decoder's its output), found once.
        """
        if len(grid) != 2:
            return grid
        if self.image_size is None:
            row = select_rows(inputs, slice(0, 1))
            with _inference(self.model):
                out = self._run(row)
            sizes = [tuple(t.shape[-2:]) for t in (*_tensors(row), *_tensors(out)) if t.dim() == 4]
            if not sizes:
                raise RequestError(
                    f"Cannot tell the image size masks are drawn at for layer {self.layer!r}: neither the input nor "
                    f"the output of the model is a 4-D image. Pass LayerMemory(..., image_size=(H, W))."
                )
            self.image_size = max(sizes, key=math.prod)
        return self.image_size

    def check_masks(self, masks: Tensor | None, inputs: Inputs, grid: tuple[int, ...]) -> Tensor:
        """Validate ``masks`` for ``inputs`` and return them as ``(N, *size)`` floats (ones for ``()`` grids).

        Errors name the problem: a wrong type, shape or size, values outside [0, 1], an empty mask, or a mask
        covering everything (a rewrite needs a region).
        """
        n = num_rows(inputs)
        if not grid:
            if masks is not None:
                raise RequestError(
                    f"Layer {self.layer!r} has one key per input row, so a request takes masks=None (select rows "
                    f"by the inputs you pass)."
                )
            ref = self.weight
            return torch.ones(n, dtype=ref.dtype, device=ref.device)
        if not isinstance(masks, Tensor) or not masks.is_floating_point():
            raise RequestError(f"Masks must be float tensors (H, W) or (N, H, W) in [0, 1], got {type(masks).__name__}"
                            + (f" of {masks.dtype}" if isinstance(masks, Tensor) else "") + ".")
        if masks.dim() == len(grid):
            masks = masks[None]
        size = self.mask_size(inputs, grid)
        if masks.dim() != len(grid) + 1 or masks.shape[0] != n or tuple(masks.shape[1:]) != tuple(size):
            raise RequestError(
                f"Masks for layer {self.layer!r} must have shape ({n}, {', '.join(map(str, size))}) (one per input "
                f"row, at image resolution), got {tuple(masks.shape)}. Resize the mask to the image, not the layer."
            )
        if not torch.isfinite(masks).all() or masks.min() < 0 or masks.max() > 1:
            raise RequestError("Masks must hold finite values in [0, 1] (soft weights); rescale them first.")
        flat = masks.reshape(n, -1)
        empty, full = (flat.amax(1) == 0).nonzero(), (flat.amin(1) == 1).nonzero()
        if len(empty):
            raise RequestError(f"Mask {int(empty[0])} is empty: draw a region to select keys there.")
        if len(full):
            raise RequestError(f"Mask {int(full[0])} covers the whole image: a rewrite needs a region, not everything.")
        ref = self.weight
        return masks.to(device=ref.device, dtype=ref.dtype)

    def mask_weights(self, masks: Tensor | None, inputs: Inputs, like: Tensor) -> Tensor:
        """Validated masks as soft weights on the grid of ``like`` (a key or value tensor): ``(N, *grid)``."""
        grid = self.grid(like)
        masks = self.check_masks(masks, inputs, grid)
        return resize_masks(masks, grid) if len(grid) == 2 else masks

    # -- the second moment C -------------------------------------------------------------------------------

    def fit_moment(self, sampler: Any, n: int, cache_dir: str | None = None, batch_size: int = 32,
                   progress: bool = True) -> Tensor:
        """Collect ``C = E[k kᵀ] (C, C)`` over seeds ``0 .. n-1`` of ``sampler`` (``stats.collect``, which caches
        it in ``cache_dir`` keyed by the weights the keys depend on, the sampler's description and ``n``). A C shipped
        with the model for exactly these weights, sampler and ``n`` (:mod:`dissect.shipped`) is used instead."""
        shipped_moment = shipped.moment(self.model, self.layer, sampler, n)
        if shipped_moment is not None:
            return self.set_moment(shipped_moment)
        moment = stats.collect(self.model, self.layer, sampler, n, stats.SecondMoment(), batch_size=batch_size,
                               cache_dir=cache_dir, side="input", progress=progress)
        return self.set_moment(moment.moment())

    def set_moment(self, moment: Tensor) -> Tensor:
        """Use ``moment (C, C)`` as C (symmetric, positive semi-definite); refused, with C unchanged, if it is not
        a ``(C, C)`` tensor (:class:`RequestError`), holds NaN or Inf (:class:`NonFiniteError`) or is zero."""
        c = self.key_channels
        if not isinstance(moment, Tensor) or moment.shape != (c, c):
            raise RequestError(f"C for layer {self.layer!r} must be a ({c}, {c}) tensor, got "
                               f"{tuple(moment.shape) if isinstance(moment, Tensor) else type(moment).__name__}.")
        if not torch.isfinite(moment).all():
            raise NonFiniteError(f"C for layer {self.layer!r} holds NaN or Inf: collect it again from finite keys.")
        if not torch.trace(moment) > 0:
            raise RequestError(f"C for layer {self.layer!r} is zero: its keys never fire on the data it was fitted on.")
        self._moment = moment.detach()
        self._factor = None
        return self._moment

    @property
    def moment(self) -> Tensor:
        """C ``(C, C)``; raises until :meth:`fit_moment` or :meth:`set_moment` has run."""
        if self._moment is None:
            raise RuntimeError(f"C is not set for layer {self.layer!r}: call fit_moment(sampler, n) or set_moment(C).")
        return self._moment

    def regularised_moment(self) -> Tensor:
        """``C + ridge · tr(C)/C_dim · I`` ``(C, C)``, symmetrised, float64 on the CPU: the C every solve uses."""
        c = self.moment.double().cpu()
        c = (c + c.T) / 2
        return c + self.ridge * torch.trace(c) / c.shape[0] * torch.eye(c.shape[0], dtype=c.dtype)

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``(C,)`` (ascending) and eigenvectors ``(C, C)`` of the regularised C, float64 on the CPU.

        A full eigendecomposition (about 90 s at 4096 channels on 2 cores): for showing C's spectrum only; the
        solves use the Cholesky factor (:meth:`whiten`, :meth:`solve_moment`)."""
        evals, evecs = torch.linalg.eigh(self.regularised_moment())
        return evals.clamp_min(evals.max() * 1e-15), evecs

    def cholesky(self) -> Tensor:
        """The lower-triangular ``L (C, C)`` with ``L Lᵀ`` the regularised C, float64 on the CPU; cached."""
        if self._factor is None:
            factor, info = torch.linalg.cholesky_ex(self.regularised_moment())
            if info:
                raise RequestError(f"C for layer {self.layer!r} is not positive definite even with ridge {self.ridge:g}: "
                                   f"use LayerMemory(..., ridge=1e-4) or larger.")
            self._factor = factor
        return self._factor

    def whiten(self, keys: Tensor) -> Tensor:
        """``L⁻¹ k`` for ``keys (..., C)`` (channels last; a triangular solve), in the keys' dtype and device: keys
        with identity second moment over the data. ``C^{-1/2} k`` up to one fixed rotation, which norms, distances
        and clusters of the whitened keys do not see."""
        flat = keys.reshape(-1, keys.shape[-1])
        # Rows: k L⁻ᵀ, i.e. the X with X Lᵀ = k.
        white = torch.linalg.solve_triangular(self.cholesky().T.to(keys), flat, upper=True, left=False)
        return white.reshape(keys.shape)

    def solve_moment(self, keys: Tensor) -> Tensor:
        """``C^{-1} k`` for ``keys (..., C)`` (two triangular solves with the Cholesky factor): the
        least-disturbing update direction for a single key."""
        flat = keys.reshape(-1, keys.shape[-1]).double().cpu()
        return torch.cholesky_solve(flat.T, self.cholesky()).T.reshape(keys.shape).to(keys)

    # -- context directions ----------------------------------------------------------------------------------

    def check_rank(self, rank: Any) -> int:
        """``rank`` if it is a positive integer no larger than the key dimension, else :class:`RequestError`."""
        c = self.key_channels
        rank = positive_rank(rank, f"up to the key dimension ({c} at layer {self.layer!r})")
        if rank > c:
            raise RequestError(f"Rank {rank} is above the key dimension of layer {self.layer!r}: its keys have {c} "
                               f"channels, so at most {c} directions; lower the rank.")
        return int(rank)

    def context_keys(self, inputs: Inputs, masks: Tensor | None, rank: int = 1) -> tuple[Tensor, Tensor]:
        """A context's keys ``(M, C)`` and soft weights ``(M,)``, refused (:class:`RequestError`) unless ``rank``
        directions can be drawn from them: checks everything :meth:`directions` does except C, so a caller can
        refuse a request before collecting C."""
        self.check_rank(rank)
        keys = self.keys(inputs)
        weights = self.mask_weights(masks, inputs, keys).reshape(-1)
        keys = self.flat_keys(keys)
        self._check_context(keys, weights, rank)
        return keys, weights

    def _check_context(self, keys: Tensor, weights: Tensor, rank: int) -> None:
        self.check_rank(rank)
        if not (torch.isfinite(keys).all() and torch.isfinite(weights).all()):
            raise NonFiniteError(f"The context's keys or weights at layer {self.layer!r} hold NaN or Inf.")
        used = weights > 0
        m = int(used.sum())
        if rank > m:
            raise RequestError(
                f"Rank {rank} needs at least {rank} context keys at layer {self.layer!r}; the context has {m} "
                f"(locations with mask > 0). Draw larger masks, add context images, or lower the rank."
            )
        if not keys[used].any():
            raise RequestError(f"The context's keys are all zero at layer {self.layer!r}: nothing there reaches the "
                               f"weight, so no edit can act on it. Choose another region or another layer.")

    def directions(self, inputs: Inputs, masks: Tensor | None, rank: int = 1) -> Tensor:
        """Rank-``rank`` context directions ``D (r, C)`` from images and masks (see :meth:`directions_from_keys`)."""
        self.moment  # fail now, not after running the model
        return self.directions_from_keys(*self.context_keys(inputs, masks, rank), rank)

    def directions_from_keys(self, keys: Tensor, weights: Tensor, rank: int = 1) -> Tensor:
        """``D (r, C)`` from context ``keys (M, C)`` with soft ``weights (M,)``.

        The top-r right singular vectors ``V`` of the whitened, weighted keys ``Z = √w · L⁻¹ k`` (so that ``ZᵀZ`` is
        the weighted second moment of the whitened keys; ``C = L Lᵀ``) mapped back: ``D = Vᵀ L⁻¹``. For one key and
        r = 1, ``d ∝ C⁻¹ k``. Rows satisfy ``D C Dᵀ = I`` and each has a positive weighted mean projection
        ``Σ w dᵀk``; the same D as with ``C^{-1/2}`` (which differs from ``L⁻¹`` by a rotation) up to rounding.

        Refused: a rank that is not a positive integer, above the key dimension, or above the number of context
        keys; NaN or Inf; all-zero keys; keys spanning fewer than ``rank`` directions.
        """
        self._check_context(keys, weights, rank)
        used = weights > 0
        k = keys[used].double().cpu()
        w = weights[used].double().cpu()
        z = self.whiten(k) * w.sqrt()[:, None]
        _, s, vh = torch.linalg.svd(z, full_matrices=False)
        # Numerical rank as in matrix_rank, at the precision the keys came in.
        spans = int((s > s[0] * max(z.shape) * torch.finfo(keys.dtype).eps).sum())
        if spans < rank:
            raise RequestError(
                f"The context's keys at layer {self.layer!r} span only {spans} direction(s), so rank {rank} would add "
                f"arbitrary ones: lower the rank to {spans}, or add context that differs."
            )
        d = torch.linalg.solve_triangular(self.cholesky(), vh[:rank], upper=False, left=False)  # Vᵀ L⁻¹
        signs = torch.sign((k @ d.T * w[:, None]).sum(0))
        d = d * torch.where(signs == 0, 1.0, signs)[:, None]
        ref = self.weight
        return d.to(device=ref.device, dtype=ref.dtype)

    def context_units(self, inputs: Inputs, masks: Tensor | None, n: int) -> Tensor:
        """The ``n`` key channels most aligned with a context: ``(n,)`` indices, best first.

        A unit's score is its mean squared activation in the context (mask-weighted) over its mean square on the
        data, ``C[i, i]`` (regularised, so a unit the data never drives cannot win by a 0 / 0): how unusually
        strongly the context drives it (the authors' watermark-unit rule).
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.key_channels:
            raise RequestError(f"Choose between 1 and {self.key_channels} units for layer {self.layer!r}, got {n}.")
        keys = self.keys(inputs)
        w = self.mask_weights(masks, inputs, keys).reshape(-1)
        k = self.flat_keys(keys)
        score = (k.square() * w[:, None]).sum(0) / w.sum()
        score = score / self.regularised_moment().diagonal().to(score)
        return score.argsort(descending=True)[:n]

    # -- matching ---------------------------------------------------------------------------------------------

    def match(self, directions: Tensor, inputs: Inputs) -> Tensor:
        """Score maps ``(N, *grid)``: ``‖D k‖`` at each location.

        ``D k`` is exactly what a rewrite through ``D`` acts on (``ΔW k = Λ D k``), so the score says how strongly
        an edit in this context changes the location; its unit is the data's RMS along the context (``D C Dᵀ = I``).
        """
        return self.match_keys(directions, self.keys(inputs))

    def match_keys(self, directions: Tensor, keys: Tensor) -> Tensor:
        """:meth:`match` on keys already read (``keys(inputs)``), so a redraw need not run the model again."""
        proj = channels_last(keys, self.adapter.channel_dim) @ directions.to(keys).T
        return proj.norm(dim=-1)

    def rank_images(self, directions: Tensor, inputs: Inputs) -> tuple[Tensor, Tensor]:
        """Images ordered by their best match: ``(order (N,), best (N,))``, best first."""
        return rank_by_peak(self.match(directions, inputs))

    def threshold(
        self, directions: Tensor, sampler: Any, seeds: Sequence[int], quantile: float = 0.99, batch_size: int = 32
    ) -> float:
        """The ``quantile`` of match scores over every location of ``sampler(seeds)``: a "matches" level."""
        if not 0 <= quantile <= 1:
            raise RequestError(f"quantile must be in [0, 1], got {quantile}.")
        q = stats.Quantile()
        for start in range(0, len(seeds), batch_size):
            q.add(self.match(directions, sampler(list(seeds[start : start + batch_size]))).reshape(-1, 1))
        return float(q.quantiles([quantile])[0, 0])

    # -- clusters ---------------------------------------------------------------------------------------------

    def cluster_keys(
        self, sampler: Any, seeds: Sequence[int], k: int, whiten: bool = True, per_image: int = 64, seed: int = 0,
        batch_size: int = 32,
    ) -> "KeyClusters":
        """Fit :class:`KeyClusters` with ``k`` clusters on keys of ``sampler(seeds)``."""
        return KeyClusters(self, k, whiten=whiten, seed=seed).fit(sampler, seeds, per_image, batch_size)


# ----------------------------------------------------------------------------------------------------------
# Key clusters
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterName:
    """A cluster's best-matching label: ``label`` index, ``name`` (or None) and that IoU on the key grid."""

    cluster: int
    label: int
    name: str | None
    iou: float


class KeyClusters:
    """k-means (scikit-learn MiniBatchKMeans) on a layer's keys, to find the contexts a layer distinguishes.

    Keys are whitened (:meth:`LayerMemory.whiten`, ``whiten=True``, needs C) and L2-normalised, so clusters group keys by
    direction in the metric rewrites use. Fitting subsamples ``per_image`` locations per image with a seeded
    generator, so the same seeds and ``seed`` give the same clusters.
    """

    def __init__(self, memory: LayerMemory, k: int, whiten: bool = True, seed: int = 0) -> None:
        if k < 2:
            raise RequestError(f"Ask for at least 2 clusters, got k={k}.")
        if whiten:
            memory.moment  # fail now, not after collecting keys
        self.memory, self.k, self.whiten, self.seed = memory, k, whiten, seed
        self.kmeans = None

    def _features(self, keys: Tensor) -> Tensor:
        """Keys in native layout -> ``(N · prod(grid), C)`` clustering features."""
        x = self.memory.flat_keys(keys).float()
        if self.whiten:
            x = self.memory.whiten(x)
        return F.normalize(x, dim=1)

    def fit(self, sampler: Any, seeds: Sequence[int], per_image: int = 64, batch_size: int = 32) -> "KeyClusters":
        """Fit on ``per_image`` random locations of each image ``sampler(seeds)``."""
        from sklearn.cluster import MiniBatchKMeans

        gen = torch.Generator().manual_seed(self.seed)
        rows = []
        for start in range(0, len(seeds), batch_size):
            keys = self.memory.keys(sampler(list(seeds[start : start + batch_size])))
            feats = self._features(keys).cpu()
            n = keys.shape[0]
            per = feats.shape[0] // n
            pick = torch.rand(n, per, generator=gen).argsort(dim=1)[:, : min(per_image, per)]
            rows.append(feats.view(n, per, -1).gather(1, pick[..., None].expand(-1, -1, feats.shape[1])).flatten(0, 1))
        x = torch.cat(rows).numpy()
        if x.shape[0] < self.k:
            raise RequestError(f"{x.shape[0]} keys cannot make {self.k} clusters: use more seeds or per_image.")
        self.kmeans = MiniBatchKMeans(n_clusters=self.k, random_state=self.seed, n_init=3, batch_size=1024).fit(x)
        return self

    def predict(self, inputs: Inputs) -> Tensor:
        """Per-image cluster maps ``(N, *grid)`` int64 on the key grid."""
        if self.kmeans is None:
            raise RuntimeError("Call fit(sampler, seeds) before predict.")
        keys = self.memory.keys(inputs)
        labels = self.kmeans.predict(self._features(keys).cpu().numpy())
        return torch.from_numpy(labels.astype(np.int64)).view(keys.shape[0], *self.memory.grid(keys))

    def masks(self, inputs: Inputs, cluster: int) -> Tensor:
        """Where ``cluster`` is, as masks at image resolution ``(N, H, W)`` in {0, 1} (for a context request)."""
        maps = self.predict(inputs)
        hit = (maps == cluster).float()
        if hit.dim() == 3:
            size = self.memory.mask_size(inputs, tuple(maps.shape[1:]))
            hit = F.interpolate(hit[:, None], size=size, mode="nearest")[:, 0]
        return hit.to(device=self.memory.weight.device, dtype=self.memory.weight.dtype)

    def name(self, maps: Tensor, labels: Tensor, classes: Sequence[str] | None = None) -> list[ClusterName]:
        """Name each cluster by the label it overlaps best (IoU on the key grid).

        ``maps (N, h, w)``: from :meth:`predict`; ``labels (N, H, W)`` int64 label maps at image resolution (e.g.
        from a segmenter), reduced to the key grid by majority vote (area-averaged one-hot, then argmax).
        """
        if labels.shape[0] != maps.shape[0] or labels.dim() != maps.dim():
            raise RequestError(f"labels {tuple(labels.shape)} must be (N, H, W) for cluster maps {tuple(maps.shape)}.")
        n_labels = max(int(labels.max()) + 1, len(classes) if classes else 0)
        onehot = F.one_hot(labels.long().cpu(), n_labels).movedim(-1, 1).float()
        small = resize_masks(onehot.flatten(0, 1), maps.shape[1:]).view(*onehot.shape[:2], *maps.shape[1:])
        lab = small.argmax(dim=1).reshape(-1)
        clu = maps.cpu().reshape(-1)
        joint = torch.bincount(clu * n_labels + lab, minlength=self.k * n_labels).view(self.k, n_labels).double()
        union = joint.sum(1, keepdim=True) + joint.sum(0, keepdim=True) - joint
        iou = joint / union.clamp_min(1)
        best = iou.argmax(dim=1)
        return [
            ClusterName(c, int(best[c]), classes[int(best[c])] if classes else None, float(iou[c, best[c]]))
            for c in range(self.k)
        ]
