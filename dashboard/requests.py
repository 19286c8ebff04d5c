"""The library's edit requests, built from what this session brushed or chose. Nothing is solved here.

Every problem a user can fix (nothing brushed, nothing copied) raises :class:`NeedsInput` with what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dashboard import derived
from dashboard.defaults import (
    CLUSTER_SEEDS,
    DEFAULT_ITERATIONS,
    DEFAULT_UNITS,
    ERASE_BUDGET,
    ERASE_RANK,
    GROW_IMAGES,
    GROW_POOL,
    MATCH_QUANTILE,
    PASTE_BUDGET,
    PASTE_LAYER,
    PASTE_RANK,
    PASTE_STRENGTH,
    POOL_SEEDS,
)
from dashboard.workspace import Workspace
from dissect.appearance import look_rows, paste_by_appearance
from dissect.errors import RequestError
from dissect.rewrite import DEFAULT_BUDGET, Context, Copy, Erase, Paste, mask_centre, mask_parts
from dissect.valuetargets import Shift


class NeedsInput(RequestError):
    """The request lacks something only the user can give; the message says what."""


@dataclass(frozen=True)
class Settings:
    """The solver settings of one request: the recommended ones per kind (:data:`RECOMMENDED`), or the sidebar's
    *Advanced* values."""

    rank: int
    refine: bool = True  # after the closed form, L-BFGS through the layer's nonlinear rest…
    iterations: int = DEFAULT_ITERATIONS  # …for at most this many iterations
    units: int = DEFAULT_UNITS  # erase: key channels zeroed in the target values
    onto_region: bool = False  # paste: constrain only where the user painted in Paste mode
    pointwise: bool = False  # change only the kernel's centre (each value by its own key)
    strength: float | None = 1.0  # the solved edit's Λ times this; None: calibrated on the context's images
    budget: float = DEFAULT_BUDGET  # the smoothness budget: at most this share of the layer's output energy moves
    appearance: bool = False  # paste: the value that makes the pasted regions look like the copy, not its raw values
    layer: str | None = None  # solve at this layer where the model has it (None: the layer chosen in the sidebar)
    recommended: bool = False  # use each request kind's RECOMMENDED settings instead of these


# What the dashboard uses unless the user opens *Advanced*, per request kind; measured with the dashboard's own
# request code on held-out simulated requests (benchmarks/eval_user.py, benchmarks/RESULTS.md).
RECOMMENDED = {
    "Erase": Settings(rank=ERASE_RANK, budget=ERASE_BUDGET),
    "Paste": Settings(rank=PASTE_RANK, onto_region=True, strength=PASTE_STRENGTH, budget=PASTE_BUDGET, appearance=True,
                      layer=PASTE_LAYER),
}


def for_kind(kind: str, settings: Settings) -> Settings:
    """The settings a request of ``kind`` is solved with."""
    return RECOMMENDED[kind] if settings.recommended else settings


def layer_for(ws: Workspace, settings: Settings) -> str:
    """The layer a request with ``settings`` is solved at: their own where the model has a layer of that name (the
    recommended ones were measured on the embedded generator), else the one chosen in the sidebar."""
    if settings.layer is not None and any(info.name == settings.layer for info in ws.layers):
        return settings.layer
    return ws.layer


def context(ws: Workspace, rank: int) -> Context:
    """The brushed context masks, or the chosen key cluster's regions."""
    if ws.brush.cluster is not None:
        seeds = list(CLUSTER_SEEDS)[:32]
        fitted = derived.clusters(ws, ws.brush.cluster_k)
        return Context.from_cluster(fitted, ws.brush.cluster, ws.inputs(seeds), rank=rank, seeds=seeds)
    seeds = ws.brush.context_seeds()
    if not seeds:
        raise NeedsInput("The context is empty: brush in *Context* mode on one or more images (or choose a key "
                         "cluster as the context under *Inspect*), then try again.")
    return Context(ws.inputs(seeds), torch.stack([ws.brush.context[s] for s in seeds]), rank=rank, seeds=seeds)


def grown_context(ws: Workspace, rank: int, n: int = GROW_IMAGES, layer: str | None = None) -> Context:
    """The brushed context thickened by the model's own best matches at ``layer`` (default: the chosen one) among
    the pool's first images (:meth:`dissect.rewrite.Context.grown`): what *Add the best matches to the context*
    adds."""
    seeds = list(POOL_SEEDS)[:GROW_POOL]
    return context(ws, rank).grown(ws.memory(layer), ws.inputs(seeds), n, MATCH_QUANTILE, pool_seeds=seeds)


def selection(ws: Workspace, rank: int) -> Context:
    """What to match keys against: the context, or else the copied region."""
    if ws.brush.cluster is None and not ws.brush.context and ws.brush.copied is not None:
        seed, mask = ws.brush.copied
        return Context(ws.inputs([seed]), mask[None], rank=rank, seeds=[seed])
    return context(ws, rank)


def erase(ws: Workspace, settings: Settings) -> tuple[Erase, Context]:
    ctx = context(ws, settings.rank)
    return Erase(ctx.inputs, ctx.masks, units=settings.units, seeds=ctx.seeds), ctx


def paste(ws: Workspace, settings: Settings) -> tuple[Paste | Shift, Context | None]:
    """A paste of the copied region; its context is the brushed one if any, else the pasted region itself."""
    if ws.brush.copied is None:
        raise NeedsInput("Nothing is copied: brush a region in *Copy* mode first, then place it in *Paste* mode.")
    if ws.brush.paste is None:
        raise NeedsInput("Choose where to paste: in *Paste* mode, click or brush on the target image.")
    (src, mask), (dst, where) = ws.brush.copied, ws.brush.paste
    if len(parts := mask_parts(where)) > 1:
        raise NeedsInput(f"The paste is painted as {len(parts)} separate regions, and the copy lands on one place: "
                         f"their common centre, which may lie between them. Clear the paste image and paint one "
                         f"region (one spire); brush the others in *Context* mode.")
    copied = Copy(ws.inputs([src]), mask, seeds=[src])
    has_context = ws.brush.cluster is not None or bool(ws.brush.context)
    ctx = context(ws, settings.rank) if has_context else None
    if settings.appearance:
        target = appearance_paste(ws, copied, dst, where, ctx, layer_for(ws, settings))
        return target, ctx or Context(target.inputs, target.masks, rank=settings.rank, seeds=target.seeds)
    request = Paste(ws.inputs([dst]), copied, position=mask_centre(where), seeds=[dst],
                    region=where if settings.onto_region else None)
    return request, ctx


def appearance_paste(ws: Workspace, copied: Copy, dst: int, where: torch.Tensor, ctx: Context | None,
                     layer: str) -> Shift:
    """The paste at ``layer`` as the value that makes the painted region of the paste image, and the regions of the
    context's first images (brushed ones come first), look like the copy to the segmenter
    (:func:`dissect.appearance.paste_by_appearance`); found once per copy, regions and weights."""
    look = derived.appearance()
    if look is None:
        raise NeedsInput("A paste by appearance is judged by the shipped segmenter, which is not installed: untick "
                         "*Recommended settings* under *Advanced* and paste the copied values instead.")
    request = Paste(ws.inputs([dst]), copied, seeds=[dst], region=where)
    rows = look_rows(request, ctx)
    # Keyed by what the shift depends on, not the brush's revision: strokes on context images past the ones it
    # is found on reuse it (it takes seconds).
    key = ("paste_shift", layer, dst, (where > 0).numpy().tobytes(), tuple(copied.seeds), copied.mask.numpy().tobytes(),
           tuple((ctx.seeds[i], (ctx.masks[i] > 0).numpy().tobytes()) for i in rows))
    return derived.cached(ws, key, lambda: paste_by_appearance(ws.memory(layer), request, ctx, look))
