"""One browser session's working state, and the read-only model every session shares.

Streamlit's ``cache_resource`` hands the *same* object to every session, so the cached base model is never
modified: each session gets a :class:`Workspace` holding its own deep copy, and edits touch only that copy.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import streamlit as st
import torch
from streamlit.runtime.scriptrunner import get_script_run_ctx
from torch import nn

from dashboard.defaults import DEFAULT_LAYER, STATS_SAMPLES
from dissect.hooks import LayerInfo, call_model, layers, model_device, to_device
from dissect.memory import LayerMemory
from dissect.models.loaders import WEIGHTS_DIR, load
from dissect.rewrite import Rewriter
from dissect.stats import DEFAULT_CACHE_DIR

KEY = "workspace"
STATS_DIR = DEFAULT_CACHE_DIR  # the CLI's statistics cache: `dissect stats` fills it for the dashboard too


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
class Brush:
    """What this session has brushed, as masks ``(H, W)`` in [0, 1] at image resolution, per seed."""

    context: dict[int, torch.Tensor] = field(default_factory=dict)
    copied: tuple[int, torch.Tensor] | None = None  # (source seed, mask)
    paste: tuple[int, torch.Tensor] | None = None  # (target seed, where the paste goes)
    cluster: int | None = None  # a key cluster chosen as the context instead of brushed masks…
    cluster_k: int = 0  # …out of this many clusters…
    cluster_layer: str | None = None  # …of this layer's keys (another layer numbers its clusters otherwise)
    drawings: dict[tuple[str, int], dict] = field(default_factory=dict)  # canvas JSON, to redraw strokes
    stroked: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (mode, seed) -> the strokes' mask…
    stamps: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # …and a segmenter class brushed at once
    generation: dict[tuple[str, int], int] = field(default_factory=dict)  # bumped to give a cleared canvas a new key
    revision: int = 0  # bumped on every change; keys what is derived from the brush (directions, previews)

    def context_seeds(self) -> list[int]:
        return sorted(self.context)

    def changed(self) -> None:
        self.revision += 1

    def use_cluster(self, cluster: int, k: int, layer: str) -> None:
        """Make key cluster ``cluster`` of ``k`` at ``layer`` the context (instead of brushed masks)."""
        self.cluster, self.cluster_k, self.cluster_layer = cluster, k, layer
        self.changed()

    def follow_layer(self, layer: str) -> str | None:
        """Drop a cluster context taken at another layer, whose number would name another cluster at ``layer``;
        returns the note to show, if any. A cluster chosen without its layer is taken to be of ``layer``."""
        if self.cluster is None or self.cluster_layer in (None, layer):
            self.cluster_layer = None if self.cluster is None else layer
            return None
        note = (f"The context was key cluster {self.cluster} of {self.cluster_layer}; it does not carry over to "
                f"{layer}, so it was dropped. Choose a cluster of this layer under *Inspect*, or brush a context.")
        self.cluster = self.cluster_layer = None
        self.changed()
        return note


@dataclass
class Workspace:
    """A session's own model copy, its edit stack, and everything it has brushed."""

    spec: str
    model: nn.Module
    sampler: Any
    layers: list[LayerInfo]
    layer: str
    rewriter: Rewriter = field(init=False)
    brush: Brush = field(default_factory=Brush)
    loaded_uploads: set[str] = field(default_factory=set)  # uploaded edit files already applied
    version: int = 0  # bumped whenever this copy's weights change; keys the caches below
    _edited: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _memories: dict[str, LayerMemory] = field(default_factory=dict, repr=False)
    cache: dict[tuple, Any] = field(default_factory=dict, repr=False)  # derived data; emptied when weights change
    status: Any = field(default=None, repr=False)  # where this run shows progress (a placeholder atop the page)

    def __post_init__(self) -> None:
        self.rewriter = Rewriter(self.model)

    @classmethod
    def open(cls, spec: str) -> "Workspace":
        base, sampler, found = base_model(spec)
        return cls(spec, copy.deepcopy(base), sampler, found, default_layer(found))

    @property
    def edited(self) -> bool:
        return bool(self.rewriter.history)

    def weights_changed(self) -> None:
        """Call after every change to this copy's weights (apply, undo, redo, revert, load)."""
        self.version += 1
        self._edited.clear()
        self._memories.clear()  # C of a later layer depends on earlier weights; the disk cache knows which
        self.cache.clear()

    def memory_channels(self) -> int:
        """Key channels of the chosen layer (the largest rank, or number of units, it can take)."""
        return next(info.in_channels for info in self.layers if info.name == self.layer)

    def inputs(self, seeds: list[int]) -> Any:
        return self.sampler(list(seeds))

    def run(self, seeds: list[int]) -> Any:
        """This session's model, as its weights are now (a trial included), on ``seeds``; uncached."""
        return run(self.model, self.inputs(seeds))

    def images(self, seeds: list[int], edited: bool = True) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] for ``seeds``: from this session's copy, or the shared original."""
        if not (edited and self.edited):
            return original_images(self.spec, tuple(seeds))
        todo = [s for s in seeds if (self.version, s) not in self._edited]
        if todo:
            out = self.run(todo)
            self._edited.update({(self.version, s): img for s, img in zip(todo, out)})
        return torch.stack([self._edited[(self.version, s)] for s in seeds])

    def memory(self, layer: str | None = None) -> LayerMemory:
        """The chosen layer of this session's copy as a memory, with C (collected once, then from disk)."""
        layer = layer or self.layer
        if layer not in self._memories:
            memory = LayerMemory(self.model, layer)
            note = f"Key statistics of {layer} over {STATS_SAMPLES} samples (first use only; then cached on disk)"
            # Atop the page (streamlit_app sets the slot each run), so nothing below it is hidden; outside a run
            # (a test, a benchmark) the slot of a finished run must not be written to.
            in_run = get_script_run_ctx(suppress_warning=True) is not None
            slot = self.status if in_run and self.status is not None else st.empty()

            def report(done: int) -> None:
                if done > 1:  # a shipped or cached C reads one sample (its fingerprint): no bar for that
                    slot.progress(min(done / STATS_SAMPLES, 1.0), text=note)

            memory.fit_moment(ReportingSampler(self.sampler, report), STATS_SAMPLES, cache_dir=str(STATS_DIR),
                              progress=False)
            slot.empty()
            self._memories[layer] = memory
        return self._memories[layer]


class ReportingSampler:
    """The model's sampler, also telling ``report(seeds done)`` on each batch: a progress bar for collection.

    Its ``description`` is the sampler's own, so the statistics cache is the one the CLI and other sessions use.
    """

    def __init__(self, sampler: Any, report: Callable[[int], None]) -> None:
        self.sampler, self.report = sampler, report
        self.description = sampler.description

    def __call__(self, seeds: list[int]) -> Any:
        seeds = list(seeds)
        inputs = self.sampler(seeds)
        self.report(max(seeds, default=-1) + 1)
        return inputs


ORIGINALS_KEPT = 4096  # original images kept per model (64x64 RGB: 48 kB each), the least recently made dropped


@st.cache_resource(show_spinner=False, max_entries=4)
def _originals(spec: str) -> OrderedDict[int, torch.Tensor]:
    """seed -> the unedited model's image ``(3, H, W)``: shared by every session, filled as seeds are shown."""
    return OrderedDict()


def original_images(spec: str, seeds: tuple[int, ...]) -> torch.Tensor:
    """The unedited model's images ``(N, 3, H, W)``, each computed once per server: the canvas's image and a grid
    grown by "More images" reuse the grid's, and only new seeds run the model."""
    store = _originals(spec)
    found = {s: store.get(s) for s in seeds}
    todo = [s for s, image in found.items() if image is None]
    if todo:
        model, sampler, _ = base_model(spec)
        made = dict(zip(todo, run(model, sampler(todo))))
        found.update(made)
        store.update(made)
        while len(store) > ORIGINALS_KEPT:
            store.popitem(last=False)
    return torch.stack([found[s] for s in seeds])


def run(model: nn.Module, inputs: Any) -> Any:
    """``model`` on a batch as the library runs it (tuple / dict inputs unpacked, on the model's device)."""
    with torch.no_grad():
        return call_model(model, to_device(inputs, model_device(model)))


def current() -> Workspace | None:
    return st.session_state.get(KEY)


def switch(spec: str) -> Workspace:
    """Open ``spec`` in this session; on failure the session keeps its current model (ModelLoadError)."""
    ws = Workspace.open(spec)
    st.session_state[KEY] = ws
    return ws
