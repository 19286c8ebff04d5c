"""The roof classifier's data (labels, watermark twins), its model, and a Pairs rewrite of a conv layer."""

from __future__ import annotations

import pytest
import torch

from dissect.memory import LayerMemory
from dissect.models.classifier import ImageSampler, RoofNet, covered, dataset, load_classifier, roof_labels, twins
from dissect.models.world import FIELD_INDEX, World
from dissect.rewrite import Context, Rewriter, solve
from dissect.valuetargets import Pairs


@pytest.fixture(scope="module")
def world() -> World:
    return World(64)


def test_labels_follow_the_roofs(world) -> None:
    z = world.sample_latents(range(200))
    facts, labels = world.scene_facts(z), roof_labels(world, z)
    assert set(labels.tolist()) == {-1, 0, 1, 2}
    assert (labels[facts["has_spire"] & facts["has_dome"]] == -1).all()
    assert (labels[facts["has_spire"] & ~facts["has_dome"]] == 0).all()
    assert (labels[~facts["has_spire"] & ~facts["has_dome"]] == 2).all()


def test_twins_differ_only_by_the_watermark(world) -> None:
    z = world.sample_latents(range(6))
    on, off = twins(z)
    assert world.scene_facts(on)["has_watermark"].all() and not world.scene_facts(off)["has_watermark"].any()
    keep = torch.ones(z.shape[1], dtype=torch.bool)
    keep[FIELD_INDEX["watermark"]] = False
    assert torch.equal(on[:, keep], z[:, keep]) and torch.equal(off[:, keep], z[:, keep])
    marked, _, marks = dataset(world, range(6), watermark=True)
    clean, _, none = dataset(world, range(6))
    assert none.sum() == 0 and (marks.flatten(1).sum(1) > 0).all()
    outside = (marks == 0)[:, None].expand_as(marked)
    assert torch.equal(marked[outside], clean[outside])


def test_sampler_renders_clean_scenes_deterministically() -> None:
    sampler = ImageSampler()
    assert torch.equal(sampler([3, 5]), sampler([3, 5])) and sampler([3]).shape == (1, 3, 64, 64)
    assert RoofNet(8)(sampler([3, 5])).shape == (2, 3)


def test_pairs_map_watermarked_keys_to_clean_values(world) -> None:
    torch.manual_seed(0)
    model = RoofNet(8).eval()
    memory = LayerMemory(model, "features.6")
    memory.fit_moment(ImageSampler(), 32, progress=False)
    marked, _, masks = dataset(world, range(3), watermark=True)
    clean = dataset(world, range(3))[0]
    edit = solve(memory, Pairs(marked, masks, value_inputs=clean), Context(marked, masks, rank=2), budget=None)
    assert edit.loss_after < 0.5 * edit.loss_before
    rewriter = Rewriter(model)
    before = memory.weight.detach().clone()
    weights = torch.nn.functional.interpolate(masks[:, None], size=(16, 16), mode="area")  # the mark on the key grid

    def gap() -> torch.Tensor:  # how far the watermarked images' values are from their clean twins', on the mark
        return ((memory.record(marked).linear - memory.record(clean).linear).square() * weights).sum()

    unedited = gap()
    rewriter.apply(edit)
    assert gap() < 0.9 * unedited
    rewriter.undo()
    assert torch.equal(memory.weight, before)


@pytest.mark.slow
def test_shipped_classifier_knows_clean_roofs_and_errs_on_watermarks(world) -> None:
    model, _ = load_classifier()
    marked, clean, labels, marks = covered(world, range(1_000_000, 1_000_400))  # watermarks over a roof
    assert len(labels) > 50 and (marks.flatten(1).sum(1) > 0).all()
    with torch.no_grad():
        clean_acc = (model(clean).argmax(1) == labels).float().mean()
        marked_acc = (model(marked).argmax(1) == labels).float().mean()
    assert clean_acc > 0.95 and marked_acc < clean_acc - 0.02
