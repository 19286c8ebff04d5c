"""Property: random valid requests on random small models never change a weight unless applied, and undo is bitwise.

Hypothesis draws a small Conv2d or Linear stack, the layer to edit, C from random keys, and an Erase or a Paste
(random boxes, units, ranks and strengths) solved with :func:`dissect.rewrite.solve`. Solving (or a refusal in the
library's words) leaves every parameter and buffer bitwise; applying then undoing every edit, and revert, restore it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from dissect.errors import DissectError
from dissect.memory import LayerMemory
from dissect.rewrite import Context, Copy, Erase, Paste, Rewriter, solve

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 8  # image side of the conv models


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _model(conv: bool, hidden: int, kernel: int, seed: int) -> tuple[nn.Module, str]:
    """A three-layer stack and the name of its middle layer, the one rewritten."""
    torch.manual_seed(seed)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, kernel,
                              padding=kernel // 2), nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, 3, 1))
    else:
        model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    return model.eval(), "2"


def _inputs(conv: bool, n: int, seed: int) -> torch.Tensor:
    shape = (n, 3, SIZE, SIZE) if conv else (n, 4)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


boxes = st.tuples(st.integers(0, SIZE - 2), st.integers(0, SIZE - 2), st.integers(1, SIZE - 1), st.integers(1, SIZE - 1))


def _masks(drawn: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """One rectangle per row, never empty and never the whole image."""
    masks = torch.zeros(len(drawn), SIZE, SIZE)
    for mask, (y0, x0, h, w) in zip(masks, drawn):
        mask[y0 : min(SIZE, y0 + h), x0 : min(SIZE, x0 + w)] = 1
    return masks


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    conv = draw(st.booleans())
    hidden = draw(st.integers(2, 8))
    n_context = draw(st.integers(1, 3))
    return {
        "conv": conv,
        "hidden": hidden,
        "kernel": draw(st.sampled_from([1, 3])),
        "seed": draw(st.integers(0, 2**16)),
        "erase": draw(st.booleans()) or not conv,  # a one-key-per-row layer takes erases (paste needs a grid)
        "units": draw(st.integers(1, hidden)),
        "rank": draw(st.integers(1, hidden)),
        "context": draw(st.booleans()),
        "target_boxes": draw(st.lists(boxes, min_size=1, max_size=2)),
        "context_boxes": draw(st.lists(boxes, min_size=n_context, max_size=n_context)),
        "pointwise": draw(st.booleans()) and conv,
        "strength": draw(st.sampled_from([0.5, 1.0, 2.5])),
        "edits": draw(st.integers(1, 2)),
    }


def _request(s: dict, memory: LayerMemory, offset: int):
    conv = s["conv"]
    masks = _masks(s["target_boxes"]) if conv else None
    rows = len(s["target_boxes"])
    context = None
    if s["context"]:
        context_masks = _masks(s["context_boxes"]) if conv else None
        context = Context(_inputs(conv, len(s["context_boxes"]), 100 + offset), context_masks, rank=s["rank"])
    if s["erase"]:
        return Erase(_inputs(conv, rows, 200 + offset), masks, units=s["units"]), context
    copy = Copy(_inputs(conv, 1, 300 + offset), masks[0])
    return Paste(_inputs(conv, 1, 400 + offset), copy), context


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_requests_change_weights_only_when_applied_and_undo_is_bitwise(s):
    model, layer = _model(s["conv"], s["hidden"], s["kernel"], s["seed"])
    memory = LayerMemory(model, layer)
    keys = memory.flat_keys(memory.keys(_inputs(s["conv"], 16, s["seed"]))).double()
    memory.set_moment((keys.T @ keys / len(keys)).float())
    original = _state(model)

    rewriter = Rewriter(model)
    applied = []
    for i in range(s["edits"]):
        target, context = _request(s, memory, i)
        before = _state(model)
        try:
            edit = solve(memory, target, context, pointwise=s["pointwise"])
        except DissectError as err:
            event(f"refused: {type(err).__name__}")
            assert _bitwise(model, before)  # a refusal leaves everything as it was
            continue
        event("solved")
        assert _bitwise(model, before), "solve changed the model"
        rewriter.apply(edit.scaled(s["strength"]))
        applied.append(before)
    for before in reversed(applied):
        rewriter.undo()
        assert _bitwise(model, before)
    assert _bitwise(model, original)
    for _ in applied:
        rewriter.redo()
    rewriter.revert()
    assert _bitwise(model, original)
