"""A paste by appearance: dissect.valuetargets.Shift (a value shift stored as a rule at any layer) and
dissect.appearance (the shift that makes regions look like a copied one)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from dissect import appearance, measure
from dissect.appearance import Appearance, paste_by_appearance, paste_shift
from dissect.errors import RequestError
from dissect.hooks import Trace
from dissect.memory import LayerMemory
from dissect.models.loaders import LatentSampler
from dissect.models.segmenter import load_segmenter
from dissect.models.stylegan import Generator
from dissect.rewrite import Context, Copy, Paste, Rewriter, constraint, goal_output, read_edits, solve
from dissect.valuetargets import Shift

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {4: 32, 8: 32, 16: 16, 32: 8, 64: 8}
LAYER = "synthesis.b16.conv1"  # a modulated convolution: demodulation, noise and activation after the weight


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    model = Generator(z_dim=32, w_dim=32, channels=SMALL).eval()
    sampler = LatentSampler(32, "appearance-test")
    memory = LayerMemory(model, LAYER)
    memory.fit_moment(sampler, 64, progress=False)
    return model, sampler, memory


@pytest.fixture(scope="module")
def look():
    return Appearance(measure.Perceptual(load_segmenter()))


def square(n: int, top: int = 16, left: int = 24, size: int = 16) -> torch.Tensor:
    m = torch.zeros(n, 64, 64)
    m[:, top : top + size, left : left + size] = 1
    return m


def test_a_shift_constraint_is_the_layer_with_the_shift_written_in_where_masked(gen):
    model, sampler, memory = gen
    z = sampler([1, 2])
    masks = square(2)
    shift = torch.randn(memory.out_channels)
    c, context = constraint(memory, Shift(z, masks, shift), None)
    where = c.weights > 0
    assert where.any() and not where.all() and context.rank == 1
    # The weight's target is its own output plus the shift inside the mask, unchanged outside.
    moved = (c.linear_target - c.rec.linear).movedim(1, -1)
    assert torch.allclose(moved[where], shift.expand(int(where.sum()), -1), atol=1e-5)
    assert moved[~where].abs().max() == 0
    # Through the nonlinear rest: rendering the goal is the model with the shift added at the weight's output.
    added = where[:, None].float() * shift.view(1, -1, 1, 1)
    handle = memory.key_module.register_forward_hook(lambda m, a, out: out + added)
    try:
        with torch.no_grad(), Trace(model, LAYER) as tr:
            expected_image = model(z)
    finally:
        handle.remove()
    assert torch.allclose(c.target, tr.output, atol=1e-5)
    assert torch.allclose(goal_output(memory, c, z), expected_image, atol=1e-4)


def test_a_shift_is_stored_as_a_rule_saved_loaded_and_moved_onto_other_images(gen, tmp_path):
    model, sampler, memory = gen
    z = sampler([3, 4, 5])
    masks = square(3)
    shift = 0.5 * memory.record(z).linear.movedim(1, -1).flatten(0, 2).std(0)
    request = Shift(z, masks, shift, seeds=[3, 4, 5], source=[9])
    edit = solve(memory, request, None, budget=None)
    assert edit.loss_after < 0.5 * edit.loss_before
    rewriter = Rewriter(model)
    before = model.state_dict()[f"{memory.key_layer}.weight"].clone()
    rewriter.apply(edit)
    rewriter.save(tmp_path / "shift.edits")
    rewriter.undo()
    assert torch.equal(model.state_dict()[f"{memory.key_layer}.weight"], before)
    (loaded,) = read_edits(tmp_path / "shift.edits")
    assert isinstance(loaded.request["target"], Shift) and loaded.request["target"].source == [9]
    assert torch.equal(loaded.request["target"].shift, request.shift)
    # A fresh process that imported nothing but the rewrite module reads it too (the dashboard's files hold shifts).
    fresh = subprocess.run([sys.executable, "-c", "import sys; from dissect.rewrite import read_edits; "
                            "print(type(read_edits(sys.argv[1])[0].request['target']).__name__)",
                            str(tmp_path / "shift.edits")], capture_output=True, text=True)
    assert fresh.returncode == 0 and fresh.stdout.strip() == "Shift", fresh.stderr[-2000:]
    (moved,) = request.at(sampler([7]), square(1)[0])
    assert moved.masks.shape == (1, 64, 64) and torch.equal(moved.shift, shift)


def test_a_shift_of_the_wrong_shape_is_refused(gen):
    _, sampler, memory = gen
    with pytest.raises(RequestError, match="one finite"):
        constraint(memory, Shift(sampler([1]), square(1), torch.ones(3)), None)
    with pytest.raises(RequestError, match="one finite"):
        constraint(memory, Shift(sampler([1]), square(1), torch.full((memory.out_channels,), float("nan"))), None)


def test_a_region_described_against_itself_is_at_distance_zero_and_others_are_not(look):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    masks = square(2)
    with torch.no_grad():
        target = look.describe(images[:1], masks[:1])
        assert len(target) == len(look.perceptual.layers) + 2  # every scale, the colours, the segmenter's classes
        assert float(look.distance(images[:1], masks[:1], target)) == pytest.approx(0, abs=1e-6)
        assert float(look.distance(images[1:], masks[1:], target)) > 0.01


def test_the_paste_shift_brings_the_regions_closer_to_the_copy_and_leaves_the_model(gen, look):
    model, sampler, memory = gen
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    copy = Copy(sampler([11]), square(1, top=40, left=8)[0].bool())
    z, masks = sampler([1, 2]), square(2).bool()
    with torch.no_grad():
        target = look.describe(model(copy.inputs), copy.mask[None].float())
        before = float(look.distance(model(z), masks.float(), target))
    shift = paste_shift(memory, z, masks, copy, look, steps=15)
    c, _ = constraint(memory, Shift(z, masks.float(), shift), None)
    with torch.no_grad():
        after = float(look.distance(goal_output(memory, c, z), masks.float(), target))
    assert after < 0.7 * before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


class Logits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def test_a_paste_by_appearance_refuses_what_it_cannot_judge(gen, look):
    model, sampler, memory = gen
    z = sampler([1])
    copy = Copy(sampler([2]), square(1)[0].bool())
    with pytest.raises(RequestError, match="copy is empty"):
        paste_shift(memory, z, square(1).bool(), Copy(sampler([2]), torch.zeros(64, 64, dtype=torch.bool)), look)
    with pytest.raises(RequestError, match="one region per image"):
        paste_shift(memory, sampler([1, 2]), torch.stack([square(1)[0], torch.zeros(64, 64)]).bool(), copy, look)
    classifier = Logits()
    cmem = LayerMemory(classifier, "conv", image_size=(8, 8))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RequestError, match="must output"):
        paste_shift(cmem, x, torch.ones(1, 8, 8, dtype=torch.bool), Copy(x, torch.ones(8, 8, dtype=torch.bool)), look)


def test_a_paste_by_appearance_finds_its_shift_on_more_images_than_it_holds_it_on(gen, look, monkeypatch):
    model, sampler, memory = gen
    found_on = []
    real = appearance.paste_shift
    monkeypatch.setattr(appearance, "paste_shift", lambda m, inputs, masks, *a, **k: found_on.append(len(masks))
                        or real(m, inputs, masks, *a, **k))
    copy = Copy(sampler([11]), square(1, top=40, left=8)[0].bool(), seeds=[11])
    paste = Paste(sampler([1]), copy, seeds=[1], region=square(1)[0])
    context = Context(sampler([2, 3, 4, 5]), square(4), rank=2, seeds=[2, 3, 4, 5])
    shift = paste_by_appearance(memory, paste, context, look, images=4, hold=2, steps=2)
    assert found_on == [4]  # the paste image and the context's first three
    assert shift.seeds == [1, 2] and shift.masks.shape == (2, 64, 64) and shift.source == [11]
    assert torch.equal(shift.inputs, sampler([1, 2]))
    for bad in ({"hold": 0}, {"images": 2, "hold": 3}):
        with pytest.raises(RequestError, match="1 <= hold <= images"):
            paste_by_appearance(memory, paste, context, look, **bad)
