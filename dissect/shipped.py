"""Key statistics shipped with a model, so its layers open without collecting C on the user's machine.

A shipped file holds one layer's C = E[k kᵀ] ``(C, C)`` (float32 safetensors) with what it was collected on:
the layer, its key module, the :func:`dissect.stats.fingerprint` of every weight the keys depend on, the
sampler's description and ``n``. :func:`moment` returns it only when all of them match the model at hand, so a
user's own model, a retrained generator or an edited earlier layer never reuses it and collects as before.
``python -m dissect.models.ship_stats`` writes them for the embedded generator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from . import stats
from .hooks import key_module_name, model_device, to_device

SHIPPED_DIR = Path(__file__).resolve().parent / "models" / "weights" / "stats"
FORMAT = "dissect.shipped-moment/1"


def _path(directory: str | os.PathLike, layer: str) -> Path:
    return Path(directory) / f"{layer}.safetensors"


def _key(model: nn.Module, layer: str, sampler: Any, n: int) -> dict[str, str]:
    """What a shipped C must have been collected on (the same fingerprint as ``stats.collect``'s cache key)."""
    key_name = key_module_name(model, layer)
    example = to_device(sampler([0]), model_device(model))
    return {"format": FORMAT, "layer": layer, "key_module": key_name, "sampler": sampler.description, "n": str(int(n)),
            "fingerprint": stats.fingerprint(model, key_name, example, side="input")}


def save(directory: str | os.PathLike, model: nn.Module, layer: str, sampler: Any, n: int, moment: Tensor) -> Path:
    """Write ``moment (C, C)``, collected on ``model``'s ``layer`` over seeds ``0 .. n-1`` of ``sampler``."""
    path = _path(directory, layer)
    safetensors.torch.save_file({"moment": moment.detach().float().cpu().contiguous()}, str(path),
                                metadata=_key(model, layer, sampler, n))
    return path


def moment(model: nn.Module, layer: str, sampler: Any, n: int,
           directory: str | os.PathLike | None = None) -> Tensor | None:
    """The shipped C ``(C, C)`` (float64, on the model's device) of ``layer`` for exactly this model, sampler
    and ``n`` (from ``directory``, default :data:`SHIPPED_DIR`); None when there is none (then collect it)."""
    path = _path(SHIPPED_DIR if directory is None else directory, layer)
    description = getattr(sampler, "description", None)
    if not path.is_file() or not isinstance(description, str):
        return None
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        # Cheap checks first: another sampler or n never needs the fingerprint's forward pass.
        if metadata.get("sampler") != description or metadata.get("n") != str(int(n)):
            return None
        if metadata != _key(model, layer, sampler, n):
            return None
        return f.get_tensor("moment").to(device=model_device(model), dtype=torch.float64)
