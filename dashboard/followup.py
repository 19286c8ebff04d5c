"""*Erase what it missed*: the recommended second round of an erase, one button.

An erase brushed on three images can leave its kind on images unlike them (the day scenes' STOCK after an erase
brushed on the dusk scenes' marks), often on fewer images than a person browses. This round asks the segmenter
what the erase took away, finds the pool images where the edited model still draws it, brushes it on the ones that
show the most, adds their best matches, and erases it at a small budget (larger where much is left): what is left
is what the first edit already weakened, and a second round at a first erase's budget smears
(benchmarks/eval_user.py, RESULTS.md). It does not protect the first edit: both take away the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F

from dashboard import brushing, derived, editing, requests
from dashboard.defaults import MISSED_BUDGET, MISSED_IMAGES, MISSED_MANY, MISSED_MANY_BUDGET, MISSED_POOL, POOL_SEEDS
from dashboard.requests import NeedsInput, Settings
from dashboard.workspace import Workspace
from dissect import measure
from dissect.models.world import CLASSES
from dissect.rewrite import Edit, Erase


@dataclass
class Missed:
    """What the last erase left: the class it removed, and the pool seeds where the edited model still draws it
    (most pixels first)."""

    name: str
    found: list[int]


def last_erase(ws: Workspace) -> Edit | None:
    """The session's last edit if it is an erase (the round follows it), else None."""
    history = ws.rewriter.history
    return history[-1] if history and isinstance(history[-1].request.get("target"), Erase) else None


def find(ws: Workspace) -> Missed:
    """The class the last erase removed from its own images (:func:`dissect.measure.removed_class`) and the first
    :data:`MISSED_POOL` pool images that still show it; NeedsInput, saying what to do, when there is nothing to
    follow."""
    edit = last_erase(ws)
    if edit is None:
        raise NeedsInput("The last edit is not an erase: apply an *Erase* first, then look for what it missed.")
    if derived.segmenter() is None:
        raise NeedsInput("Finding what an erase missed needs the segmenter, which is not installed: look at the grid, "
                         "brush what is left in *Context* mode and apply the erase again.")
    target: Erase = edit.request["target"]
    if target.seeds is None or target.masks is None:
        raise NeedsInput("This erase was not brushed on the session's images, so what it removed is unknown: brush "
                         "what is left in *Context* mode and apply the erase again.")
    before = derived.labels(ws, target.seeds, edited=False)
    after = derived.labels(ws, target.seeds, edited=True)
    masks = F.interpolate(target.masks[:, None].float(), size=tuple(before.shape[-2:]), mode="nearest")[:, 0]
    name = measure.removed_class(before, after, masks)
    if name is None:
        raise NeedsInput("The erase changed no label the segmenter gives in its own brushed regions, so there is "
                         "nothing to follow: undo it and brush the context again, or try another layer.")
    seeds = list(POOL_SEEDS)[:MISSED_POOL]
    labels = derived.labels(ws, seeds, edited=True)
    pixels = (labels == CLASSES.index(name)).flatten(1).sum(1)
    shows = measure.present(labels, name)
    found = sorted((i for i in range(len(seeds)) if shows[i]), key=lambda i: -int(pixels[i]))
    return Missed(name, [seeds[i] for i in found])


def brush(ws: Workspace, missed: Missed, settings: Settings) -> list[int]:
    """The context of the round: everything cleared, ``missed.name`` stamped where the segmenter sees it on the
    :data:`MISSED_IMAGES` found images that show the most, and their best matches added. Returns the stamped seeds."""
    if not missed.found:
        raise NeedsInput(f"None of the pool's first {MISSED_POOL} images shows a {missed.name} any more: nothing is "
                         f"left to erase.")
    brushing.clear_all(ws.brush)
    stamped = missed.found[:MISSED_IMAGES]
    pool = list(POOL_SEEDS)[:MISSED_POOL]
    labels = derived.labels(ws, pool, edited=True)  # find's, from the cache: no image drawn again
    for seed in stamped:
        brushing.stamp(ws.brush, brushing.CONTEXT, seed, (labels[pool.index(seed)] == CLASSES.index(missed.name)).float())
    editing.add_matches(ws, editing.ERASE, settings)
    return stamped


def solve(ws: Workspace, missed: Missed, settings: Settings) -> Edit:
    """The erase of the brushed context with the erase's settings at a budget of at most :data:`MISSED_BUDGET`
    (:data:`MISSED_MANY_BUDGET` where ``missed`` found :data:`MISSED_MANY` images or more: the first round missed
    a whole kind of mark, more than a touch clears), not protecting the earlier edits: it removes what they
    removed, and protection would turn it away from the keys that still draw the mark (measured: fewer requests
    met the targets). Solved, not applied."""
    chosen = requests.for_kind(editing.ERASE, settings)
    budget = min(chosen.budget, missed_budget(missed))
    return editing.solve_request(ws, editing.ERASE, dataclasses.replace(chosen, budget=budget, recommended=False),
                                 protect=False)


def missed_budget(missed: Missed) -> float:
    """The most the round may change: more where more is left."""
    return MISSED_MANY_BUDGET if len(missed.found) >= MISSED_MANY else MISSED_BUDGET
