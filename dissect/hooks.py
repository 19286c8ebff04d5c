"""Tracing any named layer of a PyTorch model: read its input and output, replace its output, stop early.

Layer names are exactly those of ``model.named_modules()``. Every context manager here removes its hooks
on every exit path, exceptions included.

A module that runs more than once in one forward (a shared block, a recurrent cell) is traced at every
call: ``.input`` / ``.output`` hold the *last* call's tensors, ``.inputs`` / ``.outputs`` hold all calls in
order, ``edit_output`` is applied to each call, and ``stop=True`` stops after the *first* call.
:func:`call_counts` tells how often each module runs; :func:`check_single_call` refuses a layer that does not
run exactly once (the memory view and the statistics need one key map per forward).

Retained tensors are copies taken when the layer sees them (an input before the layer runs, an output as it
leaves), so an in-place operation later in the forward (``ReLU(inplace=True)``) cannot change them.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from dissect.errors import LayerError

__all__ = [
    "Trace",
    "TraceDict",
    "StopForward",
    "LayerInfo",
    "LayerNameError",
    "get_module",
    "layer_input",
    "call_counts",
    "check_single_call",
    "key_module_name",
    "layers",
    "register_layer_type",
    "import_adapters",
    "keys_channels_last",
    "call_model",
    "to_device",
    "model_device",
    "eval_mode",
]

EditFn = Callable[[Any, str], Any]


class StopForward(Exception):
    """Raised inside a forward to end it right after a traced layer; swallowed by the tracing context."""


class LayerNameError(LayerError, KeyError):
    """No module of that name (also a ``KeyError``, as a failed name lookup always was)."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()``; an unknown name lists the closest ones."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.4)
    hint = f" Closest names: {', '.join(repr(c) for c in close)}." if close else ""
    raise LayerNameError(
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


def _retain(value: Any, detach: bool) -> Any:
    """A copy of the tensors in ``value`` (detached, or keeping the autograd graph with ``detach=False``)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone() if detach else value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_retain(v, detach) for v in value)
    if isinstance(value, dict):
        return {k: _retain(v, detach) for k, v in value.items()}
    return value


class Trace:
    """Trace one layer during the forwards run inside the ``with`` block.

    Args:
        model: any ``nn.Module``.
        layer: a name from ``model.named_modules()``.
        retain_input: keep a copy of the layer's first positional input, taken before the layer runs, as ``.input``.
        retain_output: keep a copy of the layer's output (after ``edit_output``) as ``.output``.
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
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

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

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        # Copied before the layer runs: the layer itself may change its input in place.
        self.inputs.append(_retain(args[0] if args else None, self.detach))

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.edit_output is not None:
            output = self.edit_output(output, self.layer)
        if self.retain_output:
            self.outputs.append(_retain(output, self.detach))
        if self.stop:
            raise StopForward()
        return output

    def __enter__(self) -> "Trace":
        self.inputs, self.outputs = [], []
        if self.retain_input:
            self._handles.append(self.module.register_forward_pre_hook(self._pre_hook))
        self._handles.append(self.module.register_forward_hook(self._hook))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


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


def layer_input(model: nn.Module, layer: str, inputs: Any) -> Any:
    """The first positional input of ``layer`` in the forward of ``inputs`` (see :func:`call_model`), which
    stops *before* the layer runs: reading a layer's keys costs only the modules before it.

    Not a copy (nothing runs after it is read); it may be a tensor of ``inputs`` itself. Run it under
    ``torch.no_grad()`` and :func:`eval_mode` as the caller needs.
    """
    found: list[Any] = []

    def grab(module: nn.Module, args: tuple) -> None:
        found.append(args[0] if args else None)
        raise StopForward()

    handle = get_module(model, layer).register_forward_pre_hook(grab)
    try:
        call_model(model, inputs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not found:
        raise LayerError(f"Layer {layer!r} does not run in the model's forward: choose one the forward reaches "
                         f"(dissect.layers(model, example_input) lists each with its output size).")
    return found[0]


def call_counts(model: nn.Module, names: Iterable[str], inputs: Any) -> dict[str, int]:
    """How many times each module in ``names`` runs in one whole forward of ``inputs`` (in eval mode, without
    gradients: buffers such as BatchNorm statistics are left alone)."""
    counts = dict.fromkeys(names, 0)

    def counter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            counts[name] += 1

        return hook

    handles = [get_module(model, name).register_forward_pre_hook(counter(name)) for name in counts]
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


# model -> (name, id of the module) found to run once: each is checked once per model, not on every read.
_RUNS_ONCE: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, int]]] = weakref.WeakKeyDictionary()


def check_single_call(model: nn.Module, names: Iterable[str], inputs: Any) -> None:
    """Refuse (:class:`LayerError`) a module in ``names`` that does not run exactly once in the forward of
    ``inputs``: a module called twice (a shared block, a loop) sees different keys at each call, its statistics
    and its rewrite would mix them, and an edit of its weight changes every call.

    One whole forward (:func:`call_counts`) per model and module: a module found to run once is remembered
    for that model (pass one row: the answer does not depend on the batch)."""
    verified = _RUNS_ONCE.setdefault(model, set())
    todo = {name: (name, id(get_module(model, name))) for name in names}
    todo = {name: key for name, key in todo.items() if key not in verified}
    if not todo:
        return
    for name, n in call_counts(model, todo, inputs).items():
        if n == 0:
            raise LayerError(f"Layer {name!r} does not run in the model's forward: choose one the forward reaches "
                             f"(dissect.layers(model, example_input) lists each with its output size).")
        if n > 1:
            raise LayerError(
                f"Layer {name!r} runs {n} times in one forward (a shared module or a block applied in a loop): "
                f"its keys differ at each call and an edit of its weight would change all {n}. dissect views and "
                f"rewrites layers that run once per forward; choose another layer."
            )
    verified.update(todo.values())


@dataclass(frozen=True)
class LayerInfo:
    """One layer that the memory view can edit.

    ``output_size`` is the spatial size of the layer's output found by one forward (``()`` for a Linear layer
    and other channels-last types, ``None`` when the example forward never reached it).
    """

    name: str
    type: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    output_size: tuple[int, ...] | None


LayerShape = Callable[[nn.Module], "tuple[int, int, tuple[int, ...]]"]  # module -> (in, out, kernel)


def _weight_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """``(in, out, kernel)`` of a ``weight`` laid out ``(out, in, *kernel)`` (Linear, Conv)."""
    weight = module.weight
    return weight.shape[1], weight.shape[0], tuple(weight.shape[2:])


def _transposed_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    # ConvTranspose weights are laid out (in, out, kh, kw).
    weight = module.weight
    return weight.shape[0], weight.shape[1], tuple(weight.shape[2:])


_LAYER_TYPES: dict[type, LayerShape] = {
    nn.Linear: _weight_shape, nn.Conv1d: _weight_shape, nn.Conv2d: _weight_shape, nn.ConvTranspose2d: _transposed_shape,
}
_CHANNELS_LAST: set[type] = {nn.Linear}  # types whose keys hold channels in the last axis; the others in axis 1
_ADAPTER_PACKAGES: set[str] = set()  # top-level packages whose `dissect.adapters` module was looked for


def register_layer_type(module_type: type, shape: LayerShape | None = None, channels_last: bool = False) -> None:
    """List ``module_type`` (and its subclasses) in :func:`layers`; ``shape(module) -> (in, out, kernel)`` reads
    its memory's size (default: a ``weight`` laid out ``(out, in, *kernel)``); ``channels_last``: its keys are
    ``(N, C)``, ``(N, T, C)``, ``(N, H, W, C)`` (as a Linear's), not ``(N, C, *grid)``.
    ``dissect.memory.register_adapter`` calls this with the adapter's layout."""
    _LAYER_TYPES[module_type] = shape or _weight_shape
    if channels_last:
        _CHANNELS_LAST.add(module_type)
    else:
        _CHANNELS_LAST.discard(module_type)


def import_adapters(module_type: type) -> None:
    """Import ``dissect.adapters.<package>``, where it exists, for the top-level package of each class in
    ``module_type``'s MRO (once per package): another library's layer types get their adapters the first time a
    model holds one, so importing dissect never imports that library."""
    for cls in module_type.__mro__:
        package = str(getattr(cls, "__module__", "")).partition(".")[0]
        if package in _ADAPTER_PACKAGES or not package.isidentifier():
            continue
        _ADAPTER_PACKAGES.add(package)
        if importlib.util.find_spec(f"dissect.adapters.{package}") is not None:
            importlib.import_module(f"dissect.adapters.{package}")


def _layer_type(module: nn.Module) -> type | None:
    import_adapters(type(module))
    return next((cls for cls in type(module).__mro__ if cls in _LAYER_TYPES), None)


def _layer_shape(module: nn.Module) -> LayerShape | None:
    found = _layer_type(module)
    return None if found is None else _LAYER_TYPES[found]


def keys_channels_last(module: nn.Module) -> bool:
    """Whether ``module``'s keys (its input) hold channels in the last axis, as a Linear's do, not in axis 1."""
    return _layer_type(module) in _CHANNELS_LAST


def layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Every layer of ``model`` whose weight the memory view can use, in ``named_modules()`` order.

    That is each ungrouped Conv1d / Conv2d / ConvTranspose2d / Linear (or type given to
    :func:`register_layer_type`, or to ``dissect.memory.register_adapter``), and each module declaring
    ``memory_key_module`` (the child it names is then listed through its parent only), except those whose
    parameters another module shares (a tied weight: an edit would change both). ``example_input`` is
    passed to one forward (see :func:`call_model`), in eval mode and without gradients (every buffer is left as
    it was), to find each layer's output size.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    candidates: dict[str, tuple[nn.Module, nn.Module, LayerShape]] = {}  # name -> (module, weight module, shape)
    inner: set[str] = set()
    for name, module in model.named_modules():
        child = getattr(module, "memory_key_module", None)
        weight_module = get_module(module, child) if child else module
        shape = _layer_shape(weight_module)
        if child:
            inner.add(f"{name}.{child}" if name else child)
        elif not name or getattr(module, "groups", 1) != 1:
            continue
        if any(uses[id(p)] > 1 for p in weight_module.parameters(recurse=False)):
            continue
        if shape is not None:
            candidates[name] = (module, weight_module, shape)
    names = [n for n in candidates if n not in inner]
    with eval_mode(model), torch.no_grad(), TraceDict(model, names) as traces:
        call_model(model, example_input)
    found = []
    for name in names:
        module, weight_module, shape = candidates[name]
        c_in, c_out, kernel = shape(weight_module)
        outputs = traces[name].outputs
        size = None
        if outputs and isinstance(outputs[-1], torch.Tensor):
            out = outputs[-1]
            size = () if keys_channels_last(weight_module) else tuple(out.shape[2:])
        found.append(LayerInfo(name, type(module).__name__, c_in, c_out, kernel, size))
    return found

