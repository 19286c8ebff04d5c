"""Tracing any named layer of a PyTorch model: read its input and output, replace its output, stop early.

Layer names are exactly those of ``model.named_modules()``. Every context manager here removes its hooks
on every exit path, exceptions included.

A module that runs more than once in one forward (a shared block, a recurrent cell) is traced at every
call: ``.input`` / ``.output`` hold the *last* call's tensors, ``.inputs`` / ``.outputs`` hold all calls in
order, ``edit_output`` is applied to each call, and ``stop=True`` stops after the *first* call.
"""

from __future__ import annotations

import contextlib
import difflib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = [
    "Trace",
    "TraceDict",
    "StopForward",
    "LayerInfo",
    "get_module",
    "key_module_name",
    "layers",
    "register_layer_type",
    "call_model",
    "to_device",
    "model_device",
    "eval_mode",
]

EditFn = Callable[[Any, str], Any]


class StopForward(Exception):
    """Raised inside a forward to end it right after a traced layer; swallowed by the tracing context."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()``; an unknown name lists the closest ones."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.4)
    hint = f" Closest names: {', '.join(repr(c) for c in close)}." if close else ""
    raise KeyError(
        f"{type(model).__name__} has no layer named {name!r}.{hint} List every name with "
        f"[n for n, _ in model.named_modules()], or the editable ones with dissect.layers(model, example_input)."
    )


def key_module_name(model: nn.Module, layer: str) -> str:
    """Name of the module whose *input* holds the keys of ``layer``.

    A plain layer carries its own keys. A composite layer (such as a modulated convolution) names the child
    that holds the memory in its class attribute ``memory_key_module``.
    """
    child = getattr(get_module(model, layer), "memory_key_module", None)
    return f"{layer}.{child}" if child else layer


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move the tensors in ``value`` (a tensor, or tuples / lists / dicts of them) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a tuple / list is unpacked into positional arguments, a dict into keywords."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (no BatchNorm update, no dropout); each module's training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _detach(value: Any, detach: bool) -> Any:
    if not detach:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v, detach) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v, detach) for k, v in value.items()}
    return value


class Trace:
    """Trace one layer during the forwards run inside the ``with`` block.

    Args:
        model: any ``nn.Module``.
        layer: a name from ``model.named_modules()``.
        retain_input: keep the layer's first positional input as ``.input``.
        retain_output: keep the layer's output as ``.output``.
        edit_output: ``fn(output, layer_name) -> output`` replaces what the layer emits.
        stop: end the forward right after the layer, so an early layer never pays for the rest of the network.
        detach: store detached tensors; ``False`` keeps the autograd graph (for optimising through the trace).

    Example::

        with Trace(G, "synthesis.b16.conv1", retain_input=True, stop=True) as t:
            G(z)
        keys = t.input          # (N, C, 16, 16)
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.layer = layer
        self.module = get_module(model, layer)
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.edit_output = edit_output
        self.stop = stop
        self.detach = detach
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    @property
    def input(self) -> Any:
        """The first positional input of the layer's last call."""
        if not self.inputs:
            raise RuntimeError(self._not_recorded("input", "retain_input=True"))
        return self.inputs[-1]

    @property
    def output(self) -> Any:
        """The output (after any edit) of the layer's last call."""
        if not self.outputs:
            raise RuntimeError(self._not_recorded("output", "retain_output=True"))
        return self.outputs[-1]

    def _not_recorded(self, what: str, flag: str) -> str:
        return (
            f"No {what} was recorded for layer {self.layer!r}: run the model inside the `with` block, "
            f"with {flag}, and check that the forward reaches this layer."
        )

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.retain_input:
            self.inputs.append(_detach(args[0] if args else None, self.detach))
        if self.edit_output is not None:
            output = self.edit_output(output, self.layer)
        if self.retain_output:
            self.outputs.append(_detach(output, self.detach))
        if self.stop:
            raise StopForward()
        return output

    def __enter__(self) -> "Trace":
        self.inputs, self.outputs = [], []
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class TraceDict(OrderedDict):
    """Trace several layers at once: ``td[name]`` is that layer's :class:`Trace`.

    With ``stop=True`` the forward ends once every listed layer has run, so layers that a forward never
    reaches keep it running to the end. Other arguments are as for :class:`Trace` and apply to every layer.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str],
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(layers))
        self._pending: set[str] = set()
        self._stop = stop
        for name in names:
            self[name] = Trace(model, name, retain_input, retain_output, edit_output, stop=False, detach=detach)
        self._stop_handles: list[torch.utils.hooks.RemovableHandle] = []

    def _make_stop_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._pending.discard(name)
            if not self._pending:
                raise StopForward()

        return hook

    def __enter__(self) -> "TraceDict":
        try:
            for trace in self.values():
                trace.__enter__()
            if self._stop:
                self._pending = set(self)
                # Registered after the tracing hooks, so each layer is recorded before the forward can end.
                self._stop_handles = [t.module.register_forward_hook(self._make_stop_hook(n)) for n, t in self.items()]
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for trace in self.values():
            trace.close()
        for handle in self._stop_handles:
            handle.remove()
        self._stop_handles = []


@dataclass(frozen=True)
class LayerInfo:
    """One layer that the memory view can edit.

    ``output_size`` is the spatial size of the layer's output found by one forward (``()`` for a Linear
    layer, ``None`` when the example forward never reached it).
    """

    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    output_size: tuple[int, ...] | None


_MEMORY_TYPES: list[type] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d]


def register_layer_type(module_type: type) -> None:
    """List ``module_type`` in :func:`layers` (``dissect.memory.register_adapter`` calls this)."""
    if module_type not in _MEMORY_TYPES:
        _MEMORY_TYPES.append(module_type)


def _weight_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    weight = module.weight
    if isinstance(module, nn.ConvTranspose2d):
        # ConvTranspose weights are laid out (in, out / groups, kh, kw).
        return weight.shape[0], weight.shape[1] * module.groups, tuple(weight.shape[2:])
    return weight.shape[1] * getattr(module, "groups", 1), weight.shape[0], tuple(weight.shape[2:])


def layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Every layer of ``model`` whose weight the memory view can use, in ``named_modules()`` order.

    That is each ungrouped Conv1d / Conv2d / ConvTranspose2d / Linear (or type given to
    :func:`register_layer_type`), and each module declaring ``memory_key_module`` (the child it names is then
    listed through its parent only). ``example_input`` is passed to one forward
    (see :func:`call_model`) to find each layer's output size.
    """
    candidates: dict[str, nn.Module] = {}
    inner: set[str] = set()
    for name, module in model.named_modules():
        child = getattr(module, "memory_key_module", None)
        if child:
            candidates[name] = module
            inner.add(f"{name}.{child}" if name else child)
        elif isinstance(module, tuple(_MEMORY_TYPES)) and name and getattr(module, "groups", 1) == 1:
            candidates[name] = module
    names = [n for n in candidates if n not in inner]
    with torch.no_grad(), TraceDict(model, names) as traces:
        call_model(model, example_input)
    found = []
    for name in names:
        module = candidates[name]
        child = getattr(module, "memory_key_module", None)
        weight_module = get_module(module, child) if child else module
        c_in, c_out, kernel = _weight_shape(weight_module)
        outputs = traces[name].outputs
        size = None
        if outputs and isinstance(outputs[-1], torch.Tensor):
            out = outputs[-1]
            size = () if isinstance(weight_module, nn.Linear) else tuple(out.shape[2:])
        found.append(LayerInfo(name, type(module).__name__, c_in, c_out, kernel, size))
    return found

