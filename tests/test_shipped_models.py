"""The weights shipped in dissect/models/weights: they load, render deterministically, and (loosely) meet the bar."""

import pytest
import torch

from dissect.hooks import layers
from dissect.models import load, load_segmenter
from dissect.models.segmenter import present
from dissect.models.world import CLASSES, World, is_dusk


@pytest.fixture(scope="module")
def shipped():
    G, sampler = load("spires")
    return G, sampler


def test_generator_loads_in_eval_mode_and_is_deterministic(shipped):
    G, sampler = shipped
    assert not G.training and G.resolution == 64
    with torch.no_grad():
        a, b = G(sampler([5, 6])), G(sampler([5, 6]))
    assert a.shape == (2, 3, 64, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert {"synthesis.b16.conv1", "synthesis.b64.conv1"} <= {i.name for i in layers(G, sampler([0]))}


def test_samples_pass_a_loose_quality_bar(shipped):
    """A loose form of eval_world's bar on 200 samples, both sides bounded, world and G seen by one segmenter."""
    G, sampler = shipped
    seg = load_segmenter()
    world = World(64)
    with torch.no_grad():
        images = torch.cat([G(sampler(range(s, s + 50))) for s in range(0, 200, 50)]).clamp(-1, 1)
        labels = seg.segment(images)
        world_labels = seg.segment(world.render(world.sample_latents(range(7_000_000, 7_000_200)))[0])
    rate = {name: present(labels, name).float().mean().item() for name in ("watermark", "spire", "dome", "tree")}
    dusk = is_dusk(images, labels).float().mean().item()
    assert 0.15 <= rate["watermark"] <= 0.45, rate
    assert 0.15 <= rate["spire"] <= 0.9 and 0.15 <= rate["dome"] <= 0.9 and 0.3 <= rate["tree"] <= 0.9, rate
    assert 0.15 <= dusk <= 0.45, dusk
    freq = torch.bincount(labels.flatten(), minlength=len(CLASSES)).double() / labels.numel()
    world_freq = torch.bincount(world_labels.flatten(), minlength=len(CLASSES)).double() / world_labels.numel()
    off = [(CLASSES[i], round(float(f), 3), round(float(w), 3)) for i, (f, w) in enumerate(zip(freq, world_freq))
           if abs(f - w) > max(0.5 * w, 0.03)]
    assert not off, f"pixel shares (class, generator, world) far from the world's: {off}"
