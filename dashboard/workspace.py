"""One browser session's working state, and the read-only model every session shares.

Streamlit's ``cache_resource`` hands the *same* object to every session, so the cached base model is never
modified: each session gets a :class:`Workspace` holding its own deep copy, and edits touch only that copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
import torch
from torch import nn

from dissect.hooks import LayerInfo, layers
from dissect.models.loaders import WEIGHTS_DIR, load

from dashboard.defaults import DEFAULT_LAYER

KEY = "workspace"


class ModelLoadError(Exception):
    """A model spec that cannot be loaded; the message says what to do."""


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def base_model(spec: str) -> tuple[nn.Module, Any, list[LayerInfo]]:
    """``(model, sampler, editable layers)`` for ``spec``: shared by every session, so never modified."""
    try:
        model, sampler = load(spec)
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"The embedded generator's weights are not installed ({WEIGHTS_DIR / 'spires-generator.safetensors'} "
            f"is missing). Reinstall the package, or choose 'Your model' and type 'package.module:function' "
            f"returning (model, sampler)."
        ) from exc
    except Exception as exc:  # any failure of user code behind an entry point must not stop the app
        raise ModelLoadError(f"Could not load {spec!r}: {type(exc).__name__}: {exc}") from exc
    model.requires_grad_(False)
    with torch.no_grad():
        found = layers(model, sampler([0]))
    return model, sampler, found


def spatial_layers(found: list[LayerInfo]) -> list[LayerInfo]:
    """Layers with a 2-D key grid: the ones a brushed mask can address."""
    return [info for info in found if info.output_size is not None and len(info.output_size) == 2]


def default_layer(found: list[LayerInfo]) -> str:
    """:data:`DEFAULT_LAYER` when the model has it, else the middle spatial layer (else the middle layer)."""
    names = [info.name for info in found]
    if DEFAULT_LAYER in names:
        return DEFAULT_LAYER
    pool = spatial_layers(found) or found
    return pool[len(pool) // 2].name


@dataclass
class Workspace:
    """A session's own model copy and everything it has brushed or edited."""

    spec: str
    model: nn.Module
    sampler: Any
    layers: list[LayerInfo]
    layer: str
    version: int = 0  # bumped whenever this copy's weights change; keys `_edited`
    _edited: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, spec: str) -> "Workspace":
        base, sampler, found = base_model(spec)
        return cls(spec, copy.deepcopy(base), sampler, found, default_layer(found))

    def weights_changed(self) -> None:
        self.version += 1
        self._edited.clear()

    def images(self, seeds: list[int], edited: bool = True) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] for ``seeds``: from this session's copy, or the shared original."""
        if not edited or self.version == 0:
            return original_images(self.spec, tuple(seeds))
        todo = [s for s in seeds if (self.version, s) not in self._edited]
        if todo:
            with torch.no_grad():
                out = self.model(self.sampler(todo))
            self._edited.update({(self.version, s): img for s, img in zip(todo, out)})
        return torch.stack([self._edited[(self.version, s)] for s in seeds])


@st.cache_data(show_spinner=False, max_entries=64)
def original_images(spec: str, seeds: tuple[int, ...]) -> torch.Tensor:
    """The unedited model's images: the same for every session, so computed once."""
    model, sampler, _ = base_model(spec)
    with torch.no_grad():
        return model(sampler(list(seeds)))


def current() -> Workspace | None:
    return st.session_state.get(KEY)


def switch(spec: str) -> Workspace:
    """Open ``spec`` in this session; on failure the session keeps its current model (ModelLoadError)."""
    ws = Workspace.open(spec)
    st.session_state[KEY] = ws
    return ws
