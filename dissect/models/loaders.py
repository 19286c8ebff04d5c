"""Loading models: the embedded default by name, users' own models from an entry point, safe checkpoints.

Checkpoints are read only as safetensors or with ``torch.load(weights_only=True)``: arbitrary pickled
objects are never unpickled. Every problem with a model, an entry point or a checkpoint (a corrupt file, a
configuration in its metadata that does not build the model) is a :class:`~dissect.errors.ModelError` naming
the file and the fix (a missing file stays a ``FileNotFoundError``).
"""

from __future__ import annotations

import importlib
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import torch
from torch import nn

from dissect.errors import ModelError
from dissect.hooks import call_model, eval_mode, model_device, to_device

__all__ = [
    "WEIGHTS_DIR",
    "LatentSampler",
    "available_models",
    "build",
    "load",
    "load_entry_point",
    "load_generator",
    "load_state_dict",
    "load_weights",
    "read_config",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
M = TypeVar("M")


class LatentSampler:
    """Seeded standard-normal latents: ``sampler(seeds) -> z (N, dim)``, row i drawn from ``seeds[i]`` alone.

    ``description`` names the distribution stably, so statistics caches can key on it.
    """

    def __init__(self, dim: int, name: str = "normal") -> None:
        self.dim = dim
        self.description = f"{name}:normal(0,1)^{dim}:torch.Generator.manual_seed(seed)"

    def __call__(self, seeds: Iterable[int] | torch.Tensor) -> torch.Tensor:
        seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else list(seeds)
        if not seeds:
            return torch.empty(0, self.dim)
        return torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def __repr__(self) -> str:
        return f"LatentSampler({self.description!r})"


def load_generator(path: str | Path) -> nn.Module:
    """A :class:`~dissect.models.stylegan.Generator` from a safetensors file with its configuration in the
    metadata, as the trainer exports it (the shipped weights, or one of a run's EMA snapshots)."""
    from .stylegan import Generator

    fix = "export it with `python -m dissect.models.train --export PATH`"
    state, metadata = load_weights(path)
    G = build(Generator, read_config(metadata, "config", path, "generator", fix), path, fix)
    load_state_dict(G, state, source=str(path))
    return G.eval()



def read_config(metadata: Mapping[str, str], key: str, path: str | Path, what: str, fix: str) -> Any:
    """The JSON configuration ``metadata[key]`` of the checkpoint at ``path`` (a ``what``), or a
    :class:`ModelError` naming the file and ``fix`` when it is absent or not JSON."""
    if key not in metadata:
        raise ModelError(f"{path} has no {what} configuration in its metadata ({key!r}); {fix}.")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: the {what} configuration in its metadata ({key!r}) is not valid JSON ({exc}); "
                         f"{fix}.") from exc


def build(cls: Callable[..., M], config: Any, path: str | Path, fix: str) -> M:
    """``cls(**config)`` for a configuration read from ``path``, or a :class:`ModelError` naming the file and
    ``fix`` when ``config`` is not keyword arguments that build a ``cls`` (an older or another model's file)."""
    name = getattr(cls, "__name__", "model")
    if not isinstance(config, dict):
        raise ModelError(f"{path}: the {name} configuration is a JSON {type(config).__name__}, not an object of "
                         f"its arguments; {fix}.")
    try:
        return cls(**config)
    except (TypeError, ValueError, KeyError) as exc:  # unknown or missing arguments, values the model refuses
        raise ModelError(f"{path}: its configuration {json.dumps(config)[:200]} does not build a {name} "
                         f"({_one_line(exc)[:300]}); {fix}.") from exc


def _generator_file(path: str | Path, device: torch.device | str) -> tuple[nn.Module, LatentSampler]:
    G = load_generator(path)
    return G.to(device), LatentSampler(G.z_dim, "spires")


def _load_spires(device: torch.device | str) -> tuple[nn.Module, LatentSampler]:
    return _generator_file(WEIGHTS_DIR / "spires-generator.safetensors", device)


def _load_facts(device: torch.device | str) -> tuple[nn.Module, Any]:
    from .facts import load_facts  # imports the edit core: only when asked for

    return load_facts(device=device)


_MODELS: dict[str, Callable[[torch.device | str], tuple[nn.Module, Any]]] = {"spires": _load_spires,
                                                                             "facts": _load_facts}


def available_models() -> list[str]:
    """Names that :func:`load` accepts besides entry points."""
    return sorted(_MODELS)


def load(name: str = "spires", device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """Return ``(model, sampler)`` in eval mode on ``device``.

    ``name`` is an embedded model (``available_models()``), an entry point ``"package.module:function"``
    whose function returns ``(model, sampler)``, or a generator file the trainer exported (``*.safetensors``,
    sampled like the embedded generator; statistics caches tell files apart by their weights' fingerprint).
    """
    if name.endswith(".safetensors"):
        return _generator_file(name, device)
    if ":" in name:
        model, sampler = load_entry_point(name)
        return model.to(device).eval(), sampler
    if name not in _MODELS:
        raise ModelError(
            f"Unknown model {name!r}. Available: {', '.join(available_models())}; "
            "or give an entry point 'package.module:function' returning (model, sampler)."
        )
    return _MODELS[name](device)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def load_entry_point(spec: str) -> tuple[nn.Module, Any]:
    """Import ``"package.module:function"``, call it, and check it returned ``(nn.Module, sampler)`` that work
    together: ``sampler([0])`` is a batch of one row (a tensor, or a tuple / list / dict holding tensors) and the
    model's forward runs on it (once, in eval mode, without gradients). Anything else is a :class:`ModelError`
    naming the entry point and what went wrong, including an exception raised by the user's code."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"An entry point looks like 'package.module:function'; got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(
            f"Could not import {module_name!r} for entry point {spec!r}: {_one_line(exc)}. "
            "Check that the package is installed (or on PYTHONPATH) and imports cleanly."
        ) from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ModelError(f"Module {module_name!r} has no attribute {attr!r} (entry point {spec!r}).")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelError(f"Entry point {spec!r} names {type(fn).__name__}, not a function returning (model, sampler).")
    try:
        result = fn()
    except Exception as exc:  # the user's code: any failure is reported as the entry point's
        raise ModelError(f"Entry point {spec!r} raised {_one_line(exc)}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelError(f"Entry point {spec!r} must return (model, sampler); it returned {type(result).__name__}.")
    model, sampler = result
    if not isinstance(model, nn.Module):
        raise ModelError(f"Entry point {spec!r} returned {type(model).__name__} as the model; expected an nn.Module.")
    if not callable(sampler) or not isinstance(getattr(sampler, "description", None), str):
        raise ModelError(
            f"Entry point {spec!r} returned a sampler without `__call__(seeds)` and a `description` string; "
            "dissect.models.loaders.LatentSampler(dim) is one that works for latent-input models."
        )
    _check_sampler(spec, model, sampler)
    return model, sampler


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    return next((x for x in items if isinstance(x, torch.Tensor)), None)


def _check_sampler(spec: str, model: nn.Module, sampler: Any) -> None:
    """``sampler([0])`` is a one-row batch that ``model``'s forward takes (see :func:`load_entry_point`)."""
    wanted = ("a sampler returns what the model's forward takes for the seeds it is given, one row per seed: a "
              "tensor, a tuple / list of positional arguments or a dict of keyword arguments")
    try:
        batch = sampler([0])
    except Exception as exc:  # the user's code
        raise ModelError(f"The sampler of entry point {spec!r} raised {_one_line(exc)} on sampler([0]).") from exc
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        raise ModelError(f"The sampler of entry point {spec!r} returned {type(batch).__name__} for sampler([0]); {wanted}.")
    if first.shape[0] != 1:
        raise ModelError(f"The sampler of entry point {spec!r} returned {first.shape[0]} rows "
                         f"({tuple(first.shape)}) for one seed, sampler([0]); {wanted}.")
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, to_device(batch, model_device(model)))
    except Exception as exc:  # the user's code
        raise ModelError(f"The model of entry point {spec!r} fails on its sampler's batch sampler([0]) with "
                         f"{_one_line(exc)}; {wanted}.") from exc


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint safely: ``.safetensors`` (tensors and metadata) or a torch file (weights only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No weights at {path}. The embedded weights ship with the package; reinstall it.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as exc:  # a corrupt header, a truncated file, not safetensors at all
            raise ModelError(f"{path} is not a readable safetensors file ({_one_line(exc)[:300]}): it is truncated "
                             "or corrupt. Copy or export it again (the embedded weights: reinstall the package).") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # unsafe globals, truncation, not a torch file
        raise ModelError(f"{path} is not a checkpoint of tensors that loads with weights_only=True "
                         f"({_one_line(exc)[:300]}); save a state dict, or safetensors.") from exc
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return dict(state), {}


def load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` (cast to each parameter's dtype), naming any missing or unexpected keys."""
    own = model.state_dict()
    # A buffer registered as None (a generator layer's held demodulation) is optional: its module creates it
    # when the state brings it.
    optional = {f"{name}.{b}" if name else b for name, m in model.named_modules() for b, v in m._buffers.items()
                if v is None}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own) - optional)
    if missing or unexpected:
        raise ModelError(
            f"{source} does not match {type(model).__name__}: "
            f"missing keys {missing[:10]}{' …' if len(missing) > 10 else ''}; "
            f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}."
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise ModelError(
            f"{source}: shape mismatch for {', '.join(f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in bad[:5])}."
        )
    model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
