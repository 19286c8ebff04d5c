"""The edit core: the smoothness term, the surround erase, the request registry, trials, all-or-nothing applies,
and edit files that refuse anything but what dissect saved."""

import io
import json
import pickle
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dissect.errors import EditFileError, RequestError
from dissect.memory import LayerMemory
from dissect.rewrite import (
    MAX_STRENGTH,
    Constraint,
    Context,
    Copy,
    Erase,
    Paste,
    Request,
    Rewriter,
    calibrate_strength,
    constraint,
    constraint_loss,
    goal_output,
    load,
    mask_centre,
    mask_parts,
    output_energy,
    read_edits,
    solve,
)
from tests.test_rewrite import Modulated, _fit, _same, _state  # the same fixtures as the edit stack's tests
from tests.test_rewrite import _box_mask as _box

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def _fitted(model: nn.Module, x: torch.Tensor, layer: str = "2") -> LayerMemory:
    return _fit(LayerMemory(model, layer), x)


@pytest.fixture
def setup():
    model = _convnet()
    x = torch.randn(16, 3, 10, 10)
    memory = _fitted(model, x)
    target = Paste(x[1:2], Copy(x[:1], _box(10, 2, 2, 4, 4)))
    context = Context(x[2:6], torch.stack([_box(10, 2, 2, 4, 4)] * 4), rank=3)
    return model, x, memory, target, context


# -- the smoothness term ------------------------------------------------------------------------------------


def test_the_budget_bounds_the_expected_change_and_trades_it_for_fit(setup):
    model, x, memory, target, context = setup
    free = solve(memory, target, context, budget=None)
    assert free.smooth == 0 and free.expected_change > 0.05
    edits = [solve(memory, target, context, budget=b) for b in (0.05, 0.01, 0.002)]
    for b, e in zip((0.05, 0.01, 0.002), edits):
        assert e.smooth > 0 and e.expected_change == pytest.approx(b, rel=1e-3)
    losses = [free.loss_after] + [e.loss_after for e in edits]
    assert losses == sorted(losses)  # less change, worse fit


def test_expected_change_is_the_mean_output_change_over_the_data_for_a_pointwise_edit(setup):
    model, x, memory, target, context = setup
    edit = solve(memory, target, context, budget=0.01, pointwise=True)
    keys = memory.flat_keys(memory.keys(x)).double()
    delta = edit.lam.double()[:, :, 1, 1] @ edit.directions.double()
    change = (keys @ delta.T).square().mean()  # E‖ΔW k‖² per output channel, over every location of the data
    assert edit.expected_change == pytest.approx(float(change) / output_energy(memory), rel=1e-3)
    # The scale: E‖W k‖² per channel with the kernel's taps taken one at a time.
    w = memory.weight.detach().double()
    taps = sum(float((keys @ w[:, :, i, j].T).square().mean()) for i in range(3) for j in range(3))
    assert output_energy(memory) == pytest.approx(taps, rel=1e-3)


def test_a_fixed_smoothness_weight_is_the_ridge_solution(setup):
    model, x, memory, target, context = setup
    edit = solve(memory, target, context, smooth=0.3, pointwise=True)
    c, ctx = constraint(memory, target, context)
    d = edit.directions.double()
    proj = torch.einsum("ri,nihw->nhwr", d, c.rec.keys.double()).reshape(-1, d.shape[0])
    res = (c.linear_target - c.rec.linear).double().permute(0, 2, 3, 1).reshape(-1, 4)
    w = c.weights.reshape(-1).double()
    used = w > 0
    a = proj[used].T @ (proj[used] * (w[used] / w[used].sum())[:, None])
    b = proj[used].T @ (res[used] * (w[used] / w[used].sum())[:, None])
    lam = torch.linalg.solve(a + 0.3 * torch.eye(len(a), dtype=a.dtype), b).T
    torch.testing.assert_close(edit.lam[:, :, 1, 1].double(), lam, rtol=1e-4, atol=1e-6)


def test_bad_budget_rank_and_strength_are_refused_by_name(setup):
    model, x, memory, target, context = setup
    for bad in (0, -1, float("nan"), "a lot"):
        with pytest.raises(RequestError, match="budget"):
            solve(memory, target, context, budget=bad)
    for rank, words in ((0, "not a positive integer"), (-2, "not a positive integer"), (1.5, "not a positive integer"),
                        ("2", "not a positive integer"), (True, "not a positive integer")):
        with pytest.raises(RequestError, match=words):
            Context(x[:1], _box(10, 1, 1, 2, 2)[None], rank=rank)
    edit = solve(memory, target, context)
    for strength in (0, -1, float("inf"), 1e30, MAX_STRENGTH * 2):
        with pytest.raises(RequestError, match="strength"):
            edit.scaled(strength)
    with pytest.raises(RequestError, match="already at strength"):
        edit.scaled(MAX_STRENGTH).scaled(2)


def test_non_finite_weights_are_refused_before_any_solve(setup):
    model, x, memory, target, context = setup
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve(memory, target, context)


# -- the surround erase -------------------------------------------------------------------------------------


def test_a_surround_erase_continues_the_values_around_the_region():
    # A 1x1 conv on a smooth ramp: the harmonic fill of a linear field is the field itself.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    ramp = torch.linspace(-1, 1, 12)
    x = torch.stack([ramp[None, :].expand(12, 12), ramp[:, None].expand(12, 12)])[None]
    memory = _fitted(model, torch.randn(20, 2, 12, 12), "0")
    c, _ = constraint(memory, Erase(x, _box(12, 4, 4, 3, 3)[None]))
    with torch.no_grad():
        field = model(x)
    torch.testing.assert_close(c.target, field, rtol=0, atol=1e-3)
    assert int(c.weights.sum()) == 9
    bumped = x.clone()
    bumped[:, :, 4:7, 4:7] += 3.0  # something painted on the ramp: the fill ignores it
    c, _ = constraint(memory, Erase(bumped, _box(12, 4, 4, 3, 3)[None]))
    torch.testing.assert_close(c.target[:, :, 4:7, 4:7], field[:, :, 4:7, 4:7], rtol=0, atol=1e-3)


def test_erase_fill_is_checked():
    with pytest.raises(RequestError, match="surround"):
        Erase(torch.zeros(1, 3), None, fill="zeros")
    model = nn.Sequential(nn.Linear(3, 4))
    memory = _fitted(model, torch.randn(20, 3), "0")
    with pytest.raises(RequestError, match="fill='units'"):
        solve(memory, Erase(torch.randn(2, 3), None))


# -- requests -----------------------------------------------------------------------------------------------


def test_a_new_request_kind_is_one_class(setup):
    model, x, memory, target, context = setup

    @dataclass
    class Darken(Request):
        """Halve what the region emits (a toy kind)."""

        inputs: torch.Tensor
        mask: torch.Tensor

        def constraint(self, memory, context):
            rec = memory.record(self.inputs)
            weights = memory.mask_weights(self.mask[None], self.inputs, rec.values)
            c = Constraint(rec, rec.linear * 0.5, rec.values * 0.5, weights)
            return c, context or Context(self.inputs, self.mask[None], rank=1)

    try:
        assert Request.kinds["Darken"] is Darken
        rewriter = Rewriter(model)
        edit = rewriter.rewrite(memory, Darken(x[3:4], _box(10, 3, 3, 3, 3)), budget=None)
        assert edit.loss_after < edit.loss_before
        buffer = io.BytesIO()
        rewriter.save(buffer)
        buffer.seek(0)
        (again,) = read_edits(buffer)
        assert isinstance(again.request["target"], Darken)
    finally:
        del Request.kinds["Darken"]


def test_a_request_that_is_not_one_is_refused(setup):
    model, x, memory, target, context = setup
    with pytest.raises(RequestError, match="Request"):
        solve(memory, Copy(x[:1], _box(10, 1, 1, 2, 2)))


# -- the edit stack -----------------------------------------------------------------------------------------


def test_a_trial_leaves_weights_history_and_redo_bitwise(setup):
    model, x, memory, target, context = setup
    rewriter = Rewriter(model)
    first = rewriter.apply(solve(memory, target, context))
    rewriter.undo()
    state = _state(model)
    second = solve(memory, Paste(x[3:4], Copy(x[:1], _box(10, 2, 2, 4, 4))), context)
    with rewriter.trial([second]) as r:
        assert r.history == [second] and not _same(model, state)
    assert _same(model, state) and rewriter.history == [] and rewriter.redoable == [first]
    with pytest.raises(RuntimeError, match="boom"), rewriter.trial([second]):
        raise RuntimeError("boom")
    assert _same(model, state) and rewriter.redoable == [first]


@pytest.mark.parametrize("budget", [0.01, 0.5, 100.0])
def test_the_refined_edit_keeps_the_budget_too(budget):
    model = Modulated().eval()
    z = torch.randn(32, 6)
    memory = _fitted(model, z, "conv1")
    mask = _box(16, 4, 5, 4, 4)
    context = Context(z[2:6], torch.stack([mask] * 4), rank=2)
    edit = solve(memory, Paste(z[1:2], Copy(z[:1], mask), position=(10, 10)), context, budget=budget, max_iter=200)
    assert "lbfgs" in edit.solver or budget < 1  # at a loose budget L-BFGS runs from a μ = 0 closed form
    assert edit.expected_change <= budget * (1 + 1e-5)


def test_apply_all_is_all_or_nothing_with_no_buffer_left_behind():
    model = Modulated().eval()
    z = torch.randn(32, 6)
    memory = _fitted(model, z, "conv1")
    mask = _box(16, 4, 5, 4, 4)
    good = solve(memory, Paste(z[1:2], Copy(z[:1], mask), position=(10, 10)))
    model.conv1.demod_reference = None  # as on a fresh model
    state = _state(model)
    bad = good.__class__(**{**good.__dict__, "base_sha256": "0" * 64})
    rewriter = Rewriter(model)
    with pytest.raises(RequestError, match="sha256"):
        rewriter.apply_all([good, bad])
    assert _same(model, state) and model.conv1.demod_reference is None and rewriter.history == []


# -- edit files ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(setup, tmp_path):
    model, x, memory, target, context = setup
    state = _state(model)
    rewriter = Rewriter(model)
    rewriter.apply(solve(memory, target, context))
    rewriter.apply(solve(memory, Erase(x[4:6], torch.stack([_box(10, 3, 3, 3, 3)] * 2)), context))
    path = tmp_path / "edits.safetensors"
    rewriter.save(path)
    rewriter.revert()
    assert _same(model, state)
    return model, state, path


def test_a_saved_file_round_trips_through_paths_and_file_objects(saved):
    model, state, path = saved
    with open(path, "rb") as f:
        rewriter = load(f, model)
    assert len(rewriter.history) == 2 and rewriter.history[1].smooth >= 0
    rewriter.revert()
    assert _same(model, state)
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_a_flipped_byte_is_refused_by_tensor_name(saved):
    model, state, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    bad = path.with_name("flipped.safetensors")
    bad.write_bytes(bytes(data))
    with pytest.raises(EditFileError, match="flipped.safetensors.*checksum"):
        load(bad, model)
    assert _same(model, state)


@pytest.mark.parametrize("case", ["truncated", "pickle", "torch.save", "directory", "missing", "field", "format"])
def test_bad_edit_files_are_refused_by_name(saved, case, tmp_path):
    model, state, path = saved
    bad = tmp_path / f"bad-{case}.safetensors"
    if case == "truncated":
        bad.write_bytes(path.read_bytes()[:-100])
        words = "bad-truncated.*not a complete safetensors"
    elif case == "pickle":
        bad.write_bytes(pickle.dumps({"lambda": [1, 2]}))
        words = "bad-pickle.*pickle"
    elif case == "torch.save":
        torch.save({"x": torch.zeros(2)}, bad)
        words = "bad-torch.save.*pickle"
    elif case == "directory":
        bad = tmp_path
        words = "is a directory"
    elif case == "missing":
        bad = tmp_path / "nowhere.safetensors"
        words = "No edit file at .*nowhere"
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["dissect"])
        if case == "field":
            del meta["edits"][1]["smooth"]
            words = "bad-field.*'smooth'"
        else:
            meta["format"] = "dissect-edits/1"
            words = "bad-format.*format"
        save_file(load_file(str(path)), str(bad), metadata={"dissect": json.dumps(meta)})
    with pytest.raises(EditFileError, match=words):
        load(bad, model)
    assert _same(model, state)


def test_solve_and_undo_leave_the_state_dict_bitwise_held_buffers_included():
    model = Modulated().eval()
    z = torch.randn(32, 6)
    memory = _fitted(model, z, "conv1")
    state = _state(model)
    edit = solve(memory, Paste(z[1:2], Copy(z[:1], _box(16, 4, 5, 4, 4)), position=(10, 10)))
    assert _same(model, state)  # solving held the layer only while it ran
    rewriter = Rewriter(model)
    rewriter.apply(edit)
    assert model.conv1.demod_reference is not None
    rewriter.undo()
    assert _same(model, state)
    rewriter.redo()
    assert model.conv1.demod_reference is not None
    rewriter.revert()
    assert _same(model, state)


def test_a_second_edit_keeps_what_the_first_stored():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 8, 3, padding=1))
    x = torch.randn(24, 3, 12, 12)
    memory = _fitted(model, x)
    first_request = Paste(x[1:2], Copy(x[:1], _box(12, 2, 2, 2, 2)))
    # The second rule's context shares images and regions with the first's: unprotected, it overwrites it.
    second = (Paste(x[3:4], Copy(x[2:3], _box(12, 6, 6, 3, 3))),
              Context(x[[1, 3, 4]], torch.stack([_box(12, 2, 2, 5, 5), _box(12, 6, 6, 3, 3), _box(12, 2, 2, 6, 6)]), 2))
    losses = {}
    for protect in (True, False):
        rewriter = Rewriter(model)
        first = rewriter.rewrite(memory, first_request)
        assert first.key_basis is not None and first.key_basis.shape[1] == 48
        c, _ = constraint(memory, first_request)
        before = float(constraint_loss(memory, c, memory.weight.detach()).detach())
        # An unconstrained second edit (budget=None), the worst case for what the first stored.
        rewriter.rewrite(memory, *second, budget=None, **({} if protect else {"protect": ()}))
        losses[protect] = float(constraint_loss(memory, c, memory.weight.detach()).detach()) / max(before, 1e-12)
        rewriter.revert()
    assert losses[True] <= 1.2 and losses[False] > 2 * losses[True], losses


def test_protection_that_leaves_no_room_is_refused_and_files_keep_the_basis(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(50, 4)
    memory = _fitted(model, x, "0")
    rewriter = Rewriter(model)
    rewriter.rewrite(memory, Paste(x[1:2], Copy(x[:1], None)), budget=None)
    with pytest.raises(RequestError, match="lie within the keys that earlier edits protect"):  # the same key direction
        rewriter.rewrite(memory, Paste(x[1:2] * 2, Copy(x[2:3], None)), budget=None, protect_mode="hard")
    rewriter.save(tmp_path / "e.safetensors")
    (edit,) = read_edits(tmp_path / "e.safetensors")
    torch.testing.assert_close(edit.key_basis, rewriter.history[0].key_basis)


def test_a_file_whose_header_length_starts_like_a_pickle_still_loads(tmp_path):
    # A safetensors file begins with its header's length (8 bytes, little-endian): 0x80 there is not a pickle.
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(50, 4)
    memory = _fitted(model, x, "0")
    rewriter = Rewriter(model)
    rewriter.rewrite(memory, Paste(x[1:2], Copy(x[:1], None)), budget=None)
    for pad in range(300):  # vary the request's provenance until the header length's low byte is 0x80
        rewriter.history[0].request["target"].seeds = [0] * pad
        data = io.BytesIO()
        rewriter.save(data)
        if data.getvalue()[0] == 0x80:
            break
    assert data.getvalue()[0] == 0x80
    data.seek(0)
    assert len(read_edits(data)) == 1


# -- strength calibrated on the context's held-out images ---------------------------------------------------


def test_goal_output_renders_what_the_constraint_asks_for(setup):
    model, x, memory, _, _ = setup
    itself = Paste(x[1:2], Copy(x[1:2], _box(10, 2, 2, 4, 4)))  # a paste of an image onto itself asks for nothing new
    c, _ = constraint(memory, itself, None)
    with torch.no_grad():
        assert torch.allclose(goal_output(memory, c, x[1:2]), model(x[1:2]), atol=1e-6)
    moved, _ = constraint(memory, Paste(x[1:2], Copy(x[:1], _box(10, 2, 2, 4, 4))), None)
    goal = goal_output(memory, moved, x[1:2])
    held = (moved.weights > 0).unsqueeze(1).expand_as(goal)
    assert torch.allclose(goal[held], moved.target[held], atol=1e-6)  # layer "2" is the output: exact there
    with torch.no_grad():
        assert torch.equal(goal[~held], model(x[1:2])[~held])


def test_calibration_picks_the_strength_that_reaches_the_held_out_goal_and_leaves_the_model_alone():
    model = _convnet()
    x = 0.05 * torch.randn(40, 3, 10, 10)
    box = _box(10, 2, 2, 4, 4)
    x[1:4, 0] += 3 * box  # a distinctive thing in the box of images 1-3: the rule's keys…
    x[0, 1] += 3 * box  # …and another thing in image 0, whose values the paste copies onto it
    memory = _fitted(model, x)
    rewriter = Rewriter(model)
    state = _state(model)
    target = Paste(x[1:2], Copy(x[:1], box), seeds=[1])
    context = Context(x[1:4], torch.stack([box] * 3), rank=1, seeds=[1, 2, 3])  # images 2 and 3 are held out
    edit = solve(memory, target, context, budget=None)
    found = calibrate_strength(rewriter, memory, edit, strengths=(0.25, 1.0, 4.0))
    assert found.images == 2 and found.carries and found.edit.strength == 1.0
    assert found.losses[1.0] < found.unedited / 1.5 and found.losses[1.0] < min(found.losses[0.25], found.losses[4.0])
    assert _same(model, state) and rewriter.history == []
    # Only far too strong an edit on offer: no strength beats leaving the model alone, so the edit keeps its own.
    blown = calibrate_strength(rewriter, memory, edit, strengths=(20.0,))
    assert not blown.carries and blown.edit is edit


def test_mask_parts_are_the_brushed_objects_largest_first_each_holding_its_centre():
    two = torch.zeros(64, 64, dtype=torch.bool)
    two[10:30, 10:14] = True  # a spire on the left
    two[12:30, 50:53] = True  # a thinner one on the right: their centre of mass is in the sky between them
    two[30, 14] = True  # a diagonal neighbour belongs to the left spire (8-connected)
    y, x = mask_centre(two)
    assert not two[y, x]
    parts = mask_parts(two)
    assert [int(p.sum()) for p in parts] == [20 * 4 + 1, 18 * 3] and parts[0].dtype == torch.bool
    assert torch.equal(parts[0] | parts[1], two) and not (parts[0] & parts[1]).any() and not parts[0][:, 40:].any()
    assert all(p[mask_centre(p)] for p in parts)
    assert mask_parts(torch.zeros(4, 4)) == []


def test_a_paste_calibrated_on_an_image_with_two_objects_asks_for_the_copy_on_each(setup):
    model, x, memory, _, _ = setup
    box = _box(10, 1, 1, 2, 2)
    target = Paste(x[1:2], Copy(x[:1], box), region=box, seeds=[1])
    both = box + _box(10, 6, 6, 2, 2)  # a held-out image with two brushed objects
    moved = target.at(x[2:3], both)
    assert [m.position for m in moved] == [(1, 1), (6, 6)] and all(m.region is not None for m in moved)
    goal = goal_output(memory, [constraint(memory, m, None)[0] for m in moved], x[2:3])
    with torch.no_grad():
        plain = model(x[2:3])
    changed = (goal - plain).abs().amax(1)[0] > 1e-6
    assert changed[1:3, 1:3].any() and changed[6:8, 6:8].any() and not changed[4, 4]  # the copy lands on each
    edit = solve(memory, target, Context(x[1:3], torch.stack([box, both]), seeds=[1, 2]), budget=None)
    assert calibrate_strength(Rewriter(model), memory, edit).images == 1


def test_calibration_skips_the_request_s_own_image_and_refuses_kinds_that_cannot_move(setup):
    model, x, memory, _, _ = setup
    mask = _box(10, 2, 2, 4, 4)
    own = Paste(x[1:2], Copy(x[:1], mask), seeds=[1])
    edit = solve(memory, own, Context(x[1:2], mask[None], rank=1, seeds=[1]), budget=None)
    found = calibrate_strength(Rewriter(model), memory, edit)
    assert found.images == 0 and found.carries and found.edit is edit

    @dataclass
    class Fixed(Request):
        """An erase that does not say how to move it onto other images (a toy kind)."""

        erase: Erase

        def constraint(self, memory, context):
            return self.erase.constraint(memory, context)

    try:
        fixed = solve(memory, Fixed(Erase(x[1:2], mask[None])), Context(x[2:4], torch.stack([mask] * 2)), budget=None)
        with pytest.raises(RequestError, match="cannot be moved onto other images"):
            calibrate_strength(Rewriter(model), memory, fixed)
    finally:
        del Request.kinds["Fixed"]
    moved = Erase(x[1:2], mask[None], units=7).at(x[2:3], mask)  # an erase moves as itself
    assert len(moved) == 1 and moved[0].units == 7 and torch.equal(moved[0].masks, mask[None])
    erase = solve(memory, Erase(x[1:2], mask[None]), Context(x[2:4], torch.stack([mask] * 2)), budget=None)
    assert calibrate_strength(Rewriter(model), memory, erase, strengths=(0.5, 1.0)).images == 2
    with pytest.raises(RequestError, match="empty mask"):
        mask_centre(torch.zeros(4, 4))


# -- sequential edits: soft protection -----------------------------------------------------------------------


def _pairs_layer(width: int, out: int = 8) -> tuple[nn.Module, LayerMemory, torch.Tensor]:
    """A Linear layer whose C is anisotropic (a few key directions carry most of the data), like real keys."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, out))
    data = torch.randn(2000, width) * torch.logspace(0, -1.5, width)
    return model, _fitted(model, data, "0"), data


def _sequential_errors(model: nn.Module, memory: LayerMemory, keys: torch.Tensor, values: torch.Tensor,
                       **solve_args) -> torch.Tensor:
    """Store ``keys[i] -> values[i]`` one edit at a time; each pair's error after all of them, over its own
    change (1: as if never stored)."""
    from dissect.valuetargets import Pairs

    base = model(keys).detach()
    rewriter = Rewriter(model)
    for k, v in zip(keys, values):
        rewriter.rewrite(memory, Pairs(k[None], None, values=v[None]), budget=None, **solve_args)
    errors = (model(keys).detach() - values).norm(dim=1) / (values - base).norm(dim=1)
    rewriter.revert()
    return errors


def test_soft_protection_keeps_fifty_sequential_edits_where_naive_edits_overwrite_them():
    model, memory, data = _pairs_layer(64)
    keys, values = data[:50] * 2, torch.randn(50, 8)
    naive = _sequential_errors(model, memory, keys, values, protect=())
    protected = _sequential_errors(model, memory, keys, values)  # Rewriter.rewrite's default: its history, soft
    assert protected[-1] < 1e-4 and naive[-1] < 1e-4  # each edit stores its own pair exactly
    assert naive[:-10].mean() > 0.3 and protected[:-10].mean() < naive[:-10].mean() / 3, (naive.mean(), protected.mean())


def test_soft_protection_keeps_accepting_edits_after_hard_protection_fills_the_key_space():
    from dissect.valuetargets import Pairs

    model, memory, data = _pairs_layer(8)
    keys, values = data[:12] * 2, torch.randn(12, 8)
    hard = Rewriter(model)
    with pytest.raises(RequestError, match="earlier edits protect"):
        for k, v in zip(keys, values):
            hard.rewrite(memory, Pairs(k[None], None, values=v[None]), budget=None, protect_mode="hard")
    assert len(hard.history) == 8  # one key direction per edit: the 9th has no room left
    hard.revert()
    errors = _sequential_errors(model, memory, keys, values)
    assert torch.isfinite(errors).all() and errors[-1] < 1e-4  # the 12th edit is accepted and stored


def test_bad_protection_is_refused_before_any_solve(setup):
    model, x, _, target, context = setup
    memory = LayerMemory(model, "2")  # no C fitted
    earlier = solve(_fitted(model, x), target, context)
    with pytest.raises(RequestError, match="needs its C"):
        solve(memory, target, context, protect=[earlier])
    fitted = _fitted(model, x)
    for bad, match in (({"protect": earlier}, "sequence of earlier Edits"), ({"protect": [1]}, "sequence of earlier"),
                       ({"protect": [earlier], "protect_mode": "strict"}, "protect_mode is one of")):
        with pytest.raises(RequestError, match=match):
            solve(fitted, target, context, **bad)
    import dataclasses

    alien = dataclasses.replace(earlier, key_basis=torch.ones(1, 5))
    with pytest.raises(RequestError, match="another width"):
        solve(fitted, target, context, protect=[alien])
