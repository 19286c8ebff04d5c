"""Attribute vectors (dissect.attributes) on a tiny generator with a synthetic, known attribute."""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from dissect import measure
from dissect.attributes import ALPHA_RANGE, AttributeVector, clamp_alpha, features, segmenter_labels
from dissect.errors import LayerError, NonFiniteError, RequestError
from dissect.hooks import Trace
from dissect.memory import LayerMemory
from dissect.models.loaders import LatentSampler
from dissect.models.stylegan import Generator
from dissect.models.world import CLASSES
from dissect.rewrite import Context, Erase, Rewriter, mask_centre, solve
from dissect.style import Style, render, styles

SMALL = {4: 32, 8: 32, 16: 16, 32: 8, 64: 8}
N = 120


@pytest.fixture(scope="module")
def G(one_thread):
    torch.manual_seed(0)
    return Generator(z_dim=32, w_dim=32, channels=SMALL).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sampler():
    return LatentSampler(32, "tiny")


def red(G, run) -> torch.Tensor:
    """``(N,)``: the mean red that the last block adds to the image (the output of synthesis.b64.torgb) while
    ``run()`` renders. A known attribute of the output that every space has to reach through the generator
    (the random tiny generator's other blocks would drown a final-image attribute in unrelated variation)."""
    with Trace(G, "synthesis.b64.torgb") as t:
        run()
    return t.output[:, 0].mean((1, 2))


@pytest.fixture(scope="module")
def data(G, sampler):
    """Latents, and labels: red (above) over its median."""
    z = sampler(range(N))
    with torch.no_grad():
        r = red(G, lambda: G(z))
    return z, r, (r > r.median()).to(torch.int8)


def redness(G, sampler, vec, alpha, seeds=range(1000, 1030)) -> float:
    with torch.no_grad():
        return float(red(G, lambda: vec.render(sampler, list(seeds), alpha)).mean())


@pytest.mark.parametrize("space", ["z", "w", "synthesis.b64.conv1"])
@pytest.mark.parametrize("method", ["mean", "probe"])
def test_moving_along_the_vector_changes_the_attribute_monotonically(G, sampler, data, space, method):
    z, _, labels = data
    vec = AttributeVector(G, space, method, name="red").fit(z, labels)
    assert vec.counts == (N // 2, N // 2) and vec.direction.shape == features(G, z[:1], space).shape[1:]
    reds = [redness(G, sampler, vec, a) for a in (-2.0, 0.0, 2.0)]
    assert reds[0] < reds[1] < reds[2], reds
    if method == "probe":
        assert vec.accuracy > 0.7


def test_mean_difference_is_the_gap_between_class_means(G, data):
    z, _, labels = data
    vec = AttributeVector(G, "z").fit(z, labels)
    assert torch.allclose(vec.direction, z[labels == 1].mean(0) - z[labels == 0].mean(0), atol=1e-5)
    w = AttributeVector(G, "w").fit(z, labels)
    ws = styles(G, z)[:, 0]
    assert torch.allclose(w.direction, ws[labels == 1].mean(0) - ws[labels == 0].mean(0), atol=1e-5)
    fine = AttributeVector(G, "w", groups=("fine",)).fit(z, labels)
    assert fine.shift(1.0).groups == ("fine",) and torch.equal(fine.direction, w.direction)


def test_alpha_zero_is_the_unmoved_sample_and_transform_matches_render(G, sampler, data):
    z, _, labels = data
    vec = AttributeVector(G, "synthesis.b16.conv1").fit(z, labels)
    seeds = [5, 6]
    with torch.no_grad():
        assert torch.equal(vec.render(sampler, seeds, 0.0), G(sampler(seeds)))
        assert torch.allclose(vec.transform(sampler(seeds), 1.5), vec.render(sampler, seeds, 1.5), atol=1e-6)
        mixed = render(G, sampler, seeds, Style(mix_seed=9, mix=("coarse",), truncation=0.7), [vec.shift(1.0)])
    assert torch.isfinite(mixed).all()


def test_too_few_samples_says_how_many(G, data):
    z, _, _ = data
    labels = torch.zeros(N, dtype=torch.int8)
    labels[:3] = 1
    with pytest.raises(RequestError, match="has 3 positive and 117 negative.*at least 10 of each"):
        AttributeVector(G, "w", name="red").fit(z, labels)
    labels[:] = -1
    labels[:12], labels[12:20] = 1, 0
    with pytest.raises(RequestError, match="12 positive and 8 negative"):
        AttributeVector(G, "w").fit(z, labels)
    AttributeVector(G, "w", min_per_class=8).fit(z, labels)  # enough once the bar is 8


def test_bad_labels_and_latents(G, data):
    z, _, labels = data
    with pytest.raises(RequestError, match="one label per sample"):
        AttributeVector(G).fit(z, labels[:-1])
    with pytest.raises(RequestError, match="1 .*0 .*-1"):
        AttributeVector(G).fit(z, labels * 2)
    with pytest.raises(NonFiniteError):
        AttributeVector(G).fit(torch.full_like(z, float("nan")), labels)
    with pytest.raises(RequestError, match="method"):
        AttributeVector(G, method="pca")
    with pytest.raises(RequestError, match="Style groups restrict"):
        AttributeVector(G, "z", groups=("fine",))
    with pytest.raises(RequestError, match="group"):
        AttributeVector(G, "w", groups=("top",))
    with pytest.raises(RequestError, match="not fitted"):
        AttributeVector(G).shift(1.0)


def test_alpha_is_clamped_with_a_note(G, data):
    z, _, labels = data
    assert clamp_alpha(1.0) == (1.0, None)
    alpha, note = clamp_alpha(10.0)
    assert alpha == ALPHA_RANGE[1] and "outside" in note and "used 3" in note
    vec = AttributeVector(G).fit(z, labels)
    with pytest.warns(UserWarning, match="outside"):
        shift = vec.shift(-7.0)
    assert torch.allclose(shift.vector, vec.direction * ALPHA_RANGE[0])
    with pytest.raises(RequestError, match="finite"):
        clamp_alpha(float("nan"))


def test_a_layer_not_reached_is_refused(G, data):
    z, _, labels = data
    with pytest.raises(LayerError, match="reached never"):
        AttributeVector(G, "mapping.layers.0").fit(z, labels)
    with pytest.raises(LayerError, match="no layer named"):
        AttributeVector(G, "synthesis.b17.conv1").fit(z, labels)


def test_segmenter_labels():
    images = torch.zeros(3, 3, 64, 64)
    images[:, 2] = 1.0  # blue: day sky
    labels = torch.zeros(3, 64, 64, dtype=torch.long)  # all sky
    labels[0, :10, :10] = CLASSES.index("watermark")
    labels[1, 20:30, 20:30] = CLASSES.index("spire")
    labels[2, 20:30, 20:30] = CLASSES.index("dome")
    assert segmenter_labels(images, labels, "watermark").tolist() == [1, 0, 0]
    assert segmenter_labels(images, labels, "spire vs dome").tolist() == [-1, 1, 0]
    assert segmenter_labels(images, labels, "dusk").tolist() == [0, 0, 0]
    with pytest.raises(RequestError, match="Unknown attribute"):
        segmenter_labels(images, labels, "moon")


@pytest.mark.slow
def test_vectors_combine_with_a_rewrite(G, sampler, data):
    """A vector fitted on the unedited model moves the edited model's samples; the edit stays in effect."""
    z, _, labels = data
    G = copy.deepcopy(G)
    vec = AttributeVector(G, "synthesis.b16.conv1").fit(z, labels)
    memory = LayerMemory(G, "synthesis.b16.conv1")
    memory.fit_moment(sampler, 64, progress=False)
    masks = torch.zeros(2, 64, 64)
    masks[:, 8:30, 8:30] = 1
    seeds = list(range(1000, 1030))
    with torch.no_grad():
        unedited = vec.render(sampler, seeds, 2.0)
    Rewriter(G).apply(solve(memory, Erase(z[:2], masks, units=8), Context(z[:2], masks, rank=1), refine=False))
    with torch.no_grad():
        edited = vec.render(sampler, seeds, 2.0)
    assert not torch.allclose(edited, unedited, atol=1e-5)
    assert redness(G, sampler, vec, 2.0, seeds) > redness(G, sampler, vec, 0.0, seeds)


@pytest.mark.slow
def test_the_benchmarks_dusk_paste_is_made_as_a_user_makes_it_and_tried_only(G, sampler):
    """eval_attributes' dusk request: a dusk sky copied onto a day sky, day skies as the context; and its one
    rewrite helper renders under the edit and leaves the model as it was."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from eval_attributes import dusk_request, rewritten

    from dashboard.requests import RECOMMENDED

    seeds = [50, 51, 52, 53, 54]
    images = torch.zeros(5, 3, 64, 64)
    images[:, 2] = 1.0  # blue skies: day…
    images[[1, 3], 0], images[[1, 3], 2] = 1.0, -1.0  # …but seeds 51 and 53 are red: dusk
    labels = torch.full((5, 64, 64), CLASSES.index("ground"))
    for i in range(5):
        labels[i, : 20 + 4 * i] = CLASSES.index("sky")  # a different horizon on each
    pool = measure.Rendered(images, labels, seeds)
    paste, context = dusk_request(sampler, pool, seeds, n_ctx=2)
    sky = labels == CLASSES.index("sky")
    assert paste.copy.seeds == [51] and torch.equal(paste.copy.mask.bool(), sky[1])  # the first dusk sky…
    assert paste.seeds == [50] and torch.equal(paste.region.bool(), sky[0])  # …onto the first day sky
    assert paste.position == mask_centre(sky[0])
    assert context.seeds == [52, 54] and torch.equal(context.masks.bool(), sky[[2, 4]])
    assert torch.equal(paste.inputs, sampler([50])) and torch.equal(context.inputs, sampler([52, 54]))
    with pytest.raises(ValueError, match="2 dusk and 3 day"):
        dusk_request(sampler, pool, seeds, n_ctx=3)

    G = copy.deepcopy(G)
    memory = LayerMemory(G, "synthesis.b16.conv1")
    memory.fit_moment(sampler, 64, progress=False)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    render_seeds = list(range(2000, 2004))
    with torch.no_grad():
        unedited = G(sampler(render_seeds))
        for settings in (RECOMMENDED["Paste"], dataclasses.replace(RECOMMENDED["Paste"], strength=2.0)):
            edit, after = rewritten(Rewriter(G), memory, paste, context, settings, lambda: G(sampler(render_seeds)))
            if settings.strength is not None:
                assert edit.strength == 2.0
            assert not torch.allclose(after, unedited, atol=1e-5)  # rendered under the edit…
            assert all(torch.equal(v, before[k]) for k, v in G.state_dict().items())  # …and only then
