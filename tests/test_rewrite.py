"""Rewrites: the closed form and its optimality, low rank, the nonlinear solve, the edit stack, save / load, errors."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_model
from torch import nn

from dissect.errors import NonFiniteError
from dissect.memory import LayerMemory
from dissect.models.stylegan import ModulatedConv2d
from dissect.rewrite import (
    Context,
    Copy,
    Edit,
    Erase,
    Paste,
    Rewriter,
    constraint,
    constraint_loss,
    load,
    read_edits,
    solve,
    weight_sha256,
)

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")




def _fit(memory: LayerMemory, inputs) -> LayerMemory:
    k = memory.flat_keys(memory.keys(inputs)).double()
    memory.set_moment(k.T @ k / len(k))
    return memory


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _box_mask(size: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[top : top + height, left : left + width] = 1.0
    return mask


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6))


def _convnet(kernel: int = 3, pool: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.AvgPool2d(2)] if pool else []
    layers += [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, kernel, padding=kernel // 2)]
    return nn.Sequential(*layers)


class Modulated(nn.Module):
    """Two of the generator's modulated convolutions behind a constant, as in a synthesis block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.const = nn.Parameter(torch.randn(1, 8, 8, 8))
        self.conv0 = ModulatedConv2d(8, 8, 6, resolution=16, up=True)
        self.conv1 = ModulatedConv2d(8, 6, 6, resolution=16)
        with torch.no_grad():
            self.conv1.noise_strength.fill_(0.2)
            self.conv1.bias.normal_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.const.expand(len(z), -1, -1, -1)
        return self.conv1(self.conv0(x, z), z)


# -- the closed form ------------------------------------------------------------------------------------------


def test_single_key_on_a_linear_layer_stores_the_value_exactly():
    model = _mlp()
    memory = _fit(LayerMemory(model, "2"), torch.randn(100, 5))
    source, target = torch.randn(1, 5), torch.randn(1, 5)
    wanted = memory.values(source)
    rewriter = Rewriter(model)
    edit = rewriter.rewrite(memory, Paste(target, Copy(source, None)), budget=None)  # plain least squares
    assert edit.rank == 1 and edit.solver == "closed_form"
    assert edit.loss_after < 1e-10 < edit.loss_before
    torch.testing.assert_close(memory.values(target), wanted, rtol=0, atol=1e-5)


def test_single_key_on_a_1x1_conv_stores_the_value_exactly_where_it_is_pasted():
    model = _convnet(kernel=1, pool=True)  # the key grid is half the image: positions are scaled
    memory = _fit(LayerMemory(model, "3"), torch.randn(16, 3, 16, 16))
    source, target = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    wanted = memory.values(source)[0, :, 1, 2]
    before = memory.values(target)
    # Pixels [2:4, 4:6] are key cell (1, 2); centred at pixel (12, 8) the copy lands on cell (6, 4).
    Rewriter(model).rewrite(memory, Paste(target, Copy(source, _box_mask(16, 2, 4, 2, 2)), position=(12, 8)), budget=None)
    after = memory.values(target)
    torch.testing.assert_close(after[0, :, 6, 4], wanted, rtol=0, atol=1e-5)
    assert not torch.allclose(before[0, :, 6, 4], wanted, atol=1e-2)


def test_a_paste_region_limits_the_constraint_to_where_the_copy_lands_on_it():
    model = _convnet(kernel=3)
    x = torch.randn(16, 3, 12, 12)
    memory = _fit(LayerMemory(model, "2"), x)
    copy = Copy(x[:1], _box_mask(12, 2, 2, 4, 6))
    whole, _ = constraint(memory, Paste(x[1:2], copy))
    region = _box_mask(12, 0, 5, 12, 7)  # the right part of the image: columns 5-11
    part, _ = constraint(memory, Paste(x[1:2], copy, region=region))
    expected = whole.weights.clone()
    expected[..., :5] = 0
    assert torch.equal(part.weights, expected) and part.weights.sum() == 4 * 3
    w0 = memory.weight.detach().clone()
    for bad, message in ((_box_mask(12, 8, 0, 4, 4), "does not meet the pasted copy"),
                         (torch.ones(6, 6), "shape")):
        with pytest.raises(ValueError, match=message):
            Rewriter(model).rewrite(memory, Paste(x[1:2], copy, region=bad))
        assert torch.equal(memory.weight, w0)


def test_3x3_conv_reaches_the_least_squares_optimum():
    model = _convnet(kernel=3)
    x = torch.randn(24, 3, 12, 12)
    memory = _fit(LayerMemory(model, "2"), x)
    mask = _box_mask(12, 3, 2, 6, 7)  # 42 constrained locations > 2 · 9 unknowns per output channel
    context = Context(x[2:5], torch.stack([mask] * 3), rank=2)
    edit = solve(memory, Paste(x[1:2], Copy(x[:1], mask)), context, budget=None)
    assert 0 < edit.loss_after < edit.loss_before  # over-determined: a true least-squares problem
    c, ctx = constraint(memory, Paste(x[1:2], Copy(x[:1], mask)), context)
    assert ctx is context
    with torch.no_grad():
        squared, absolute = (float(constraint_loss(memory, c, memory.weight, l1=l1)) for l1 in (False, True))
    assert squared == pytest.approx(edit.loss_before, rel=1e-6)
    l1 = (memory.values(x[:1]) - memory.values(x[1:2])).abs().mean(1)[0] * mask  # α = 1 on the box
    assert absolute == pytest.approx(float(l1.sum() / 42), rel=1e-5)

    # Direct solve: unknowns Λ (out, r·3·3) act on the unfolded projections D k of the target's key map.
    d = edit.directions.double()
    keys = memory.keys(x[1:2]).double()
    design = F.unfold(torch.einsum("ri,nihw->nrhw", d, keys), 3, padding=1)[0]  # (r·9, H·W)
    inside = mask.reshape(-1) > 0
    residual = (memory.values(x[:1]) - memory.values(x[1:2])).double()[0].reshape(4, -1)
    lam, *_ = np.linalg.lstsq(design[:, inside].T.numpy(), residual[:, inside].T.numpy(), rcond=None)
    direct_loss = ((design[:, inside].T.numpy() @ lam - residual[:, inside].T.numpy()) ** 2).mean()
    assert edit.loss_after == pytest.approx(direct_loss, rel=1e-4)
    torch.testing.assert_close(edit.lam.double().reshape(4, -1), torch.from_numpy(lam.T), rtol=1e-4, atol=1e-6)


def test_pointwise_edit_changes_each_value_by_its_own_key_alone():
    model = _convnet(kernel=3)
    x = torch.randn(24, 3, 12, 12)
    memory = _fit(LayerMemory(model, "2"), x)
    mask = _box_mask(12, 3, 2, 6, 7)
    context = Context(x[2:5], torch.stack([mask] * 3), rank=2)
    edit = solve(memory, Paste(x[1:2], Copy(x[:1], mask)), context, pointwise=True, budget=None)
    assert edit.pointwise and edit.lam[:, :, 1, 1].abs().sum() > 0
    outside = edit.lam.clone()
    outside[:, :, 1, 1] = 0
    assert torch.equal(outside, torch.zeros_like(outside))

    # The least-squares optimum over the centre tap alone: unknowns Λ (out, r) act on D k at each location.
    d = edit.directions.double()
    proj = torch.einsum("ri,nihw->nrhw", d, memory.keys(x[1:2]).double())[0].reshape(2, -1)  # (r, H·W)
    inside = mask.reshape(-1) > 0
    residual = (memory.values(x[:1]) - memory.values(x[1:2])).double()[0].reshape(4, -1)
    lam, *_ = np.linalg.lstsq(proj[:, inside].T.numpy(), residual[:, inside].T.numpy(), rcond=None)
    torch.testing.assert_close(edit.lam[:, :, 1, 1].double(), torch.from_numpy(lam.T), rtol=1e-4, atol=1e-6)

    # So every location's value moves by Λ D k of its own key, whatever its neighbours' keys are.
    probe = torch.randn(3, 3, 12, 12)
    keys, before = memory.keys(probe), memory.values(probe)
    Rewriter(model).apply(edit)
    expected = torch.einsum("or,ri,nihw->nohw", edit.lam[:, :, 1, 1], edit.directions, keys)
    torch.testing.assert_close(memory.values(probe) - before, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_pointwise_needs_a_kernel_with_a_centre():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 2, padding="same"))
    x = torch.randn(8, 3, 8, 8)
    memory = _fit(LayerMemory(model, "2"), x)
    state = _state(model)
    with pytest.raises(ValueError, match="without a centre"):
        solve(memory, Paste(x[1:2], Copy(x[:1], _box_mask(8, 2, 2, 3, 3))), pointwise=True)
    assert _same(model, state)


def test_a_scaled_edit_multiplies_lambda_and_keeps_its_strength_through_save_and_load(tmp_path):
    model = _convnet(kernel=3)
    x = torch.randn(16, 3, 8, 8)
    original = _state(model)
    memory = _fit(LayerMemory(model, "2"), x)
    mask = _box_mask(8, 2, 2, 3, 3)
    edit = solve(memory, Paste(x[1:2], Copy(x[:1], mask)), Context(x[2:4], torch.stack([mask] * 2)), pointwise=True)
    strong = edit.scaled(2.5)
    assert strong.strength == 2.5 and edit.strength == 1.0
    torch.testing.assert_close(strong.lam, 2.5 * edit.lam)
    assert torch.equal(strong.directions, edit.directions) and strong.loss_after == edit.loss_after
    assert strong.scaled(0.4).strength == pytest.approx(1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number"):
            edit.scaled(bad)
    w0 = memory.weight.detach().clone()
    rewriter = Rewriter(model)
    rewriter.apply(strong)
    torch.testing.assert_close(memory.weight.detach() - w0, 2.5 * memory.delta(edit.lam, edit.directions))
    path = tmp_path / "edits.safetensors"
    rewriter.save(str(path))
    fresh = _convnet(kernel=3)
    assert _same(fresh, original)
    loaded = load(str(path), fresh).history[0]
    assert loaded.strength == 2.5 and loaded.pointwise and _same(fresh, _state(model))


def test_update_has_rank_r_and_lies_in_the_span_of_d():
    model = _convnet(kernel=3)
    x = torch.randn(24, 3, 12, 12)
    memory = _fit(LayerMemory(model, "2"), x)
    mask = _box_mask(12, 3, 2, 6, 7)
    rewriter = Rewriter(model)
    w0 = memory.weight.detach().clone()
    edit = rewriter.rewrite(memory, Paste(x[1:2], Copy(x[:1], mask)), Context(x[2:5], torch.stack([mask] * 3), rank=3))
    delta = (memory.weight.detach() - w0).double().permute(0, 2, 3, 1).reshape(-1, 8)  # rows (o, y, x), cols keys
    s = torch.linalg.svdvals(delta)
    assert s[2] > 1e-4 * s[0] and s[3] < 1e-5 * s[0]
    d = edit.directions.double()
    onto_d = delta @ torch.linalg.pinv(d) @ d
    torch.testing.assert_close(onto_d, delta, rtol=0, atol=1e-6 * float(s[0]))


def test_keys_with_no_component_along_d_keep_their_values():
    # D k = 0 means the whitened key C^{-1/2} k is orthogonal to the context subspace: ΔW k = Λ D k = 0.
    model = _mlp()
    memory = _fit(LayerMemory(model, "2"), torch.randn(100, 5))
    layer = model[2]
    rows = torch.randn(3, 5)
    edit = solve(memory, Paste(rows[:1], Copy(rows[1:2], None)), Context(rows, None, rank=2))
    d = edit.directions.double()
    k = torch.randn(10, 8, dtype=torch.float64)
    k_perp = (k - k @ torch.linalg.pinv(d) @ d).float()
    assert (k_perp @ edit.directions.T).abs().max() < 1e-5
    before = layer(k_perp)
    Rewriter(model).apply(edit)
    torch.testing.assert_close(layer(k_perp), before, rtol=0, atol=1e-5)
    assert not torch.allclose(layer(k.float()), before, atol=1e-3)


# -- model-agnostic ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_resnet18_conv_edit_satisfies_its_constraint(resnet):
    model = copy.deepcopy(resnet)
    x = torch.randn(6, 3, 64, 64)
    memory = _fit(LayerMemory(model, "layer1.0.conv1"), x)
    mask = _box_mask(64, 16, 24, 8, 8)  # 2 x 2 key cells on the 16 x 16 grid
    wanted = memory.values(x[:1])[0, :, 4:6, 6:8]
    edit = Rewriter(model).rewrite(memory, Paste(x[1:2], Copy(x[:1], mask)))
    assert edit.loss_after < 1e-6 * edit.loss_before
    torch.testing.assert_close(memory.values(x[1:2])[0, :, 4:6, 6:8], wanted, rtol=0, atol=1e-4)


def test_resnet18_linear_edit_satisfies_its_constraint(resnet):
    model = copy.deepcopy(resnet)
    x = torch.randn(8, 3, 64, 64)
    memory = _fit(LayerMemory(model, "fc"), x)  # 512 channels from 8 keys: a singular C, made usable by the ridge
    wanted = memory.values(x[:1])
    Rewriter(model).rewrite(memory, Paste(x[1:2], Copy(x[:1], None)))
    torch.testing.assert_close(model(x[1:2]), wanted, rtol=0, atol=1e-4)


# -- the nonlinear rest --------------------------------------------------------------------------------------


def test_modulated_conv_edit_optimises_lambda_through_the_nonlinear_rest():
    model = Modulated()
    z = torch.randn(32, 6)
    memory = _fit(LayerMemory(model, "conv1"), z)
    mask = _box_mask(16, 4, 5, 4, 4)
    context = Context(z[2:6], torch.stack([mask] * 4), rank=2)
    rewriter = Rewriter(model)
    w0 = memory.weight.detach().clone()
    edit = rewriter.rewrite(memory, Paste(z[1:2], Copy(z[:1], mask), position=(10, 10)), context, budget=None)
    assert edit.solver == "closed_form+lbfgs"
    assert edit.loss_after < 0.5 * edit.loss_closed_form < edit.loss_before
    assert edit.seconds < 10
    # L-BFGS moved Λ only: the update still lies in span(D).
    delta = (memory.weight.detach() - w0).double().permute(0, 2, 3, 1).reshape(-1, 8)
    d = edit.directions.double()
    rounding = 1e-6 * float(memory.weight.detach().abs().max())  # W₁ - W₀ is read back from float32 weights
    torch.testing.assert_close(delta @ torch.linalg.pinv(d) @ d, delta, rtol=0, atol=rounding)
    closed = solve(memory, Paste(z[1:2], Copy(z[:1], mask), position=(10, 10)), context, refine=False)
    assert closed.solver == "closed_form" and closed.loss_after == closed.loss_closed_form


def test_modulated_conv_keys_outside_the_edit_keep_their_values_and_the_export_reloads(tmp_path):
    model = Modulated().eval()
    z = torch.randn(32, 6)
    memory = _fit(LayerMemory(model, "conv1"), z)
    mask = _box_mask(16, 4, 5, 4, 4)
    context = Context(z[2:6], torch.stack([mask] * 4), rank=2)
    edit = solve(memory, Paste(z[1:2], Copy(z[:1], mask), position=(10, 10)), context)
    # Inputs whose keys (the modulated activation) have no component along D.
    layer, w = model.conv1, z[6:10]
    with torch.no_grad():
        styles = (layer.affine(w) * layer.weight_gain)[:, :, None, None]
        keys = torch.randn(4, 8, 16, 16) * styles
        d = edit.directions
        along = torch.einsum("nchw,rc->nhwr", keys, d) @ torch.linalg.inv(d @ d.T) @ d  # (N, H, W, C)
        outside = (keys - along.permute(0, 3, 1, 2)) / styles
        inside = keys / styles
        before = layer(outside, w), layer(inside, w)
        rewriter = Rewriter(model)
        rewriter.apply(edit)
        after = layer(outside, w), layer(inside, w)
    # The demodulation is held at W₀, so ΔW reaches a location only through ΔW k.
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-5)
    assert not torch.allclose(after[1], before[1], atol=1e-3)
    path = tmp_path / "edited.safetensors"
    rewriter.export(str(path))
    fresh = Modulated().eval()
    load_model(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(z), model(z), rtol=0, atol=0)


def test_a_refused_request_does_not_hold_the_modulated_layer():
    model = Modulated().eval()
    z = torch.randn(32, 6)
    memory = _fit(LayerMemory(model, "conv1"), z)
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="empty"):
        solve(memory, Paste(z[1:2], Copy(z[:1], torch.zeros(16, 16))))
    assert model.conv1.demod_reference is None and set(model.state_dict()) == keys


def test_a_closed_form_worse_than_no_edit_is_not_the_starting_point(monkeypatch):
    import dissect.rewrite

    model = Modulated()
    z = torch.randn(32, 6)
    memory = _fit(LayerMemory(model, "conv1"), z)
    mask = _box_mask(16, 4, 5, 4, 4)
    closed_form = dissect.rewrite._lam
    wild = lambda *a: torch.randn_like(closed_form(*a)) * 10.0  # noqa: E731  a step the real layer rejects
    monkeypatch.setattr(dissect.rewrite, "_lam", wild)
    edit = solve(memory, Paste(z[1:2], Copy(z[:1], mask), position=(10, 10)), budget=None)
    assert edit.loss_closed_form > edit.loss_before
    assert edit.solver == "lbfgs" and edit.loss_after < 0.5 * edit.loss_before


def test_erase_stores_the_values_without_the_contexts_top_units():
    model = _convnet(kernel=1)
    x = torch.randn(16, 3, 8, 8)
    memory = _fit(LayerMemory(model, "2"), x)
    mask = _box_mask(8, 3, 4, 1, 1)  # one key: the rank-1 insert meets it exactly
    units = memory.context_units(x[:1], mask, 3)
    keys = memory.keys(x[:1])
    keys[:, units] = 0
    with torch.no_grad():
        wanted = model[2](keys)[0, :, 3, 4]
    edit = Rewriter(model).rewrite(memory, Erase(x[:1], mask, units=3, fill="units"), budget=None)
    assert edit.loss_after < 1e-8 < edit.loss_before
    torch.testing.assert_close(memory.values(x[:1])[0, :, 3, 4], wanted, rtol=0, atol=1e-5)


def test_context_from_a_key_cluster():
    model = _convnet(kernel=1)
    x = torch.randn(16, 3, 8, 8)
    memory = _fit(LayerMemory(model, "2"), x)
    sampler = lambda seeds: x[torch.as_tensor(seeds)]  # noqa: E731
    clusters = memory.cluster_keys(sampler, list(range(16)), k=3, per_image=16)
    context = Context.from_cluster(clusters, 0, x[:4], rank=2, seeds=[0, 1, 2, 3])
    assert context.masks.shape[1:] == (8, 8) and len(context.masks) == len(context.inputs) == len(context.seeds)
    assert torch.equal(context.masks.bool(), clusters.predict(context.inputs) == 0)
    edit = solve(memory, Paste(x[5:6], Copy(x[4:5], _box_mask(8, 2, 2, 3, 3))), context)
    assert edit.rank == 2 and edit.loss_after < edit.loss_before


# -- the edit stack ------------------------------------------------------------------------------------------


@pytest.fixture
def edited():
    """A model, its original state, and a Rewriter holding two edits on two layers."""
    model = _convnet(kernel=3)
    original = _state(model)
    x = torch.randn(16, 3, 8, 8)
    rewriter = Rewriter(model)
    mask = _box_mask(8, 2, 2, 3, 3)
    first = _fit(LayerMemory(model, "2"), x)
    rewriter.rewrite(first, Paste(x[1:2], Copy(x[:1], mask), position=(5, 5), seeds=[1]),
                     Context(x[2:4], torch.stack([mask] * 2), rank=2, seeds=[2, 3]))
    second = _fit(LayerMemory(model, "0"), x)
    rewriter.rewrite(second, Erase(x[4:5], mask, units=2))
    return model, original, rewriter


def test_undo_redo_and_revert_are_bitwise(edited):
    model, original, rewriter = edited
    after_both = _state(model)
    rewriter.undo()
    after_first = _state(model)
    assert not _same(model, after_both) and len(rewriter.history) == 1
    rewriter.undo()
    assert _same(model, original) and [e.layer for e in rewriter.redoable] == ["2", "0"]  # next redo first
    rewriter.redo()
    assert _same(model, after_first)
    rewriter.redo()
    assert _same(model, after_both) and rewriter.redoable == []
    with pytest.raises(IndexError, match="redo"):
        rewriter.redo()
    rewriter.revert()
    assert _same(model, original) and rewriter.history == []


def test_undo_refuses_to_clobber_changes_made_elsewhere(edited):
    model, _, rewriter = edited
    with torch.no_grad():
        model[0].weight.add_(1.0)
    changed = _state(model)
    with pytest.raises(RuntimeError, match="changed outside"):
        rewriter.undo()
    assert _same(model, changed)


def test_save_and_load_round_trip(edited, tmp_path):
    model, original, rewriter = edited
    path = tmp_path / "edits.safetensors"
    rewriter.save(str(path))
    fresh = _convnet(kernel=3)
    assert _same(fresh, original)
    loaded = load(str(path), fresh)
    assert _same(fresh, _state(model))
    assert [e.layer for e in loaded.history] == ["2", "0"]
    paste = loaded.history[0].request["target"]
    assert isinstance(paste, Paste) and paste.position == (5, 5) and paste.seeds == [1]
    assert torch.equal(paste.copy.mask, rewriter.history[0].request["target"].copy.mask)
    assert loaded.history[0].request["context"].seeds == [2, 3]
    assert isinstance(read_edits(str(path))[1].request["target"], Erase)
    loaded.revert()
    assert _same(fresh, original)


def test_load_refuses_a_model_with_another_base_weight(edited, tmp_path):
    _, _, rewriter = edited
    path = tmp_path / "edits.safetensors"
    rewriter.save(str(path))
    other = _convnet(kernel=3)
    with torch.no_grad():
        other[2].weight[0, 0, 0, 0] += 1e-3
    state = _state(other)
    with pytest.raises(ValueError, match="layer '2'") as err:
        load(str(path), other)
    assert rewriter.history[0].base_sha256 in str(err.value) and weight_sha256(other[2].weight) in str(err.value)
    assert _same(other, state)
    # The first edit fits, the second does not: the first is taken back too.
    other = _convnet(kernel=3)
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1e-3
    state = _state(other)
    with pytest.raises(ValueError, match="layer '0'"):
        load(str(path), other)
    assert _same(other, state)


def test_export_writes_the_edited_weights(edited, tmp_path):
    model, _, rewriter = edited
    path = tmp_path / "model.safetensors"
    rewriter.export(str(path))
    fresh = _convnet(kernel=3)
    load_model(fresh, str(path))
    assert _same(fresh, _state(model))


# -- failures leave the model untouched ----------------------------------------------------------------------


BAD_REQUESTS = {
    "empty copy mask": (lambda x: Paste(x[1:2], Copy(x[:1], torch.zeros(8, 8))), None, ValueError, "empty"),
    "full copy mask": (lambda x: Paste(x[1:2], Copy(x[:1], torch.ones(8, 8))), None, ValueError, "whole image"),
    "wrong-size mask": (lambda x: Paste(x[1:2], Copy(x[:1], torch.ones(4, 4) * 0.5)), None, ValueError, "resolution"),
    "empty erase mask": (lambda x: Erase(x[:2], torch.zeros(2, 8, 8)), None, ValueError, "Mask 0 is empty"),
    "rank above context": (lambda x: Paste(x[1:2], Copy(x[:1], _box_mask(8, 2, 2, 2, 2))),
                           lambda x: Context(x[2:3], _box_mask(8, 1, 1, 1, 2), rank=3), ValueError, "Rank 3"),
    "paste off the image": (lambda x: Paste(x[1:2], Copy(x[:1], _box_mask(8, 2, 2, 2, 2)), position=(40, 40)),
                            None, ValueError, "outside"),
    "two source images": (lambda x: Paste(x[1:2], Copy(x[:2], _box_mask(8, 2, 2, 2, 2))), None, ValueError,
                          "one image"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_raise_clear_errors_and_leave_the_model_untouched(case):
    make_target, make_context, error, match = BAD_REQUESTS[case]
    model = _convnet(kernel=3)
    x = torch.randn(8, 3, 8, 8)
    memory = _fit(LayerMemory(model, "2"), x)
    state = _state(model)
    rewriter = Rewriter(model)
    with pytest.raises(error, match=match):
        rewriter.rewrite(memory, make_target(x), make_context(x) if make_context else None)
    assert _same(model, state) and rewriter.history == []


def test_bad_edits_are_refused_before_any_write():
    model = _convnet(kernel=3)
    x = torch.randn(8, 3, 8, 8)
    memory = _fit(LayerMemory(model, "2"), x)
    edit = solve(memory, Paste(x[1:2], Copy(x[:1], _box_mask(8, 2, 2, 2, 2))))
    state = _state(model)
    rewriter = Rewriter(model)
    nan = Edit(**{**edit.__dict__, "lam": edit.lam * float("nan")})
    with pytest.raises(NonFiniteError, match="non-finite"):
        rewriter.apply(nan)
    with pytest.raises(ValueError, match="shapes"):
        rewriter.apply(Edit(**{**edit.__dict__, "lam": edit.lam[:, :, :2]}))
    with pytest.raises(TypeError, match="register_adapter"):
        rewriter.apply(Edit(**{**edit.__dict__, "layer": "1"}))  # the ReLU holds no weight
    assert _same(model, state) and rewriter.history == []
    rewriter.apply(edit)
    with pytest.raises(ValueError, match="sha256"):
        rewriter.apply(edit)  # solved against the weight before the first application
