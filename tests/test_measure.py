"""dissect.measure: rendering, the presence rule, the perceptual / pixel distances, calibration, comparisons."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dissect import measure
from dissect.errors import ModelError
from dissect.models import load
from dissect.models import segmenter as segmenter_module
from dissect.models.loaders import LatentSampler
from dissect.models.segmenter import load_segmenter
from dissect.models.stylegan import Generator
from dissect.models.world import CLASSES, World

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def perceptual():
    return measure.Perceptual(load_segmenter())


@pytest.fixture(scope="module")
def scenes():
    """Six world scenes (6, 3, 64, 64) in [-1, 1]: natural images with edges, sky and small objects."""
    world = World(64)
    return world.render(world.sample_latents(list(range(6))))[0]


@pytest.fixture(scope="module")
def spires():
    return load("spires")


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=3)


def noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def box(n: int, top: int = 20, left: int = 20, size: int = 24) -> torch.Tensor:
    mask = torch.zeros(n, 64, 64, dtype=torch.bool)
    mask[:, top : top + size, left : left + size] = True
    return mask


def test_identical_images_are_at_distance_zero(perceptual, scenes):
    assert torch.equal(perceptual.distance(scenes, scenes.clone()), torch.zeros(len(scenes)))
    assert torch.allclose(measure.ssim(scenes, scenes.clone()), torch.ones(len(scenes)), atol=1e-6)
    per = measure.collateral_per_image(scenes, scenes.clone(), perceptual=perceptual)
    assert per["rmse"].abs().max() == 0 and per["mean_abs"].abs().max() == 0
    assert perceptual.distance(scenes, noisy(scenes, 0.05)).min() > 0


@pytest.mark.parametrize("degrade, amounts", [(blur, (0.5, 1.0, 2.0, 3.0)), (noisy, (0.01, 0.03, 0.1, 0.3))])
def test_every_measure_is_monotone_in_the_degradation(perceptual, scenes, degrade, amounts):
    worse = [degrade(scenes, a) for a in amounts]
    d = torch.stack([perceptual.distance(scenes, w) for w in worse])  # (amounts, N)
    e = torch.stack([measure.rmse(scenes, w) for w in worse])
    s = torch.stack([measure.ssim(scenes, w) for w in worse])
    assert (d.diff(dim=0) > 0).all() and (e.diff(dim=0) > 0).all() and (s.diff(dim=0) < 0).all()


def test_a_smear_scores_far_above_a_noise_re_render_and_below_a_different_image(spires, perceptual):
    G, sampler = spires
    seeds = [0, 1, 2, 3]
    base = measure.render(G, sampler, seeds).images
    torch.manual_seed(0)
    rerender = measure.render(G, sampler, seeds, noise_mode="random").images
    region = box(len(seeds), 24, 8, 16)[:, None]
    smear = torch.where(region, blur(base, 4.0), base)  # a 16x16 patch melted, the rest untouched
    noise, smeared = perceptual.distance(base, rerender), perceptual.distance(base, smear)
    other = perceptual.distance(base, base.roll(1, 0))
    assert noise.max() < 0.01 and smeared.min() > 10 * noise.max() and smeared.max() < other.min()
    assert measure.ssim(base, smear).max() < measure.ssim(base, rerender).min()


def test_outside_a_region_changes_inside_it_do_not_count(perceptual, scenes):
    inside = box(len(scenes))
    changed_inside = torch.where(inside[:, None], noisy(scenes, 0.5), scenes)
    changed_outside = torch.where(inside[:, None], scenes, noisy(scenes, 0.1))
    outside = ~inside
    assert torch.equal(perceptual.distance(scenes, changed_inside, outside), torch.zeros(len(scenes)))
    assert torch.equal(measure.rmse(scenes, changed_inside, outside), torch.zeros(len(scenes)))
    assert torch.allclose(measure.ssim(scenes, changed_inside, outside), torch.ones(len(scenes)), atol=1e-6)
    assert perceptual.distance(scenes, changed_inside).min() > 0.05  # unrestricted, the same change counts
    assert perceptual.distance(scenes, changed_outside, outside).min() > 0.05
    summary = measure.collateral(scenes, changed_inside, inside, perceptual)
    assert summary["perceptual"] == 0 and summary["mean_abs"] == 0 and summary["n"] == len(scenes)


def test_the_distance_lets_gradients_through_only_when_asked(perceptual, scenes):
    x = noisy(scenes[:2], 0.05).requires_grad_(True)
    perceptual.distance(scenes[:2], x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not perceptual.distance(scenes[:2], noisy(scenes[:2], 0.05)).requires_grad


def test_a_share_that_meets_a_target_exactly_is_not_rounded_below_it():
    # 36 of 40 samples cleaned is a 90% removal; a float32 mean made it 0.8999999 and failed a 90% target.
    hits = torch.tensor([True] * 36 + [False] * 4)
    assert 1 - float((~hits).float().mean()) < 0.9  # the rounding this guards against
    assert measure.share(hits) >= 0.9 and measure.share(hits) == 0.9
    assert measure.share(torch.ones(3, 3, dtype=torch.bool)) == 1.0
    assert math.isnan(measure.share(torch.zeros(0, dtype=torch.bool)))
    labels = torch.zeros(40, 64, 64, dtype=torch.long)
    labels[:36].view(36, -1)[:, :48] = CLASSES.index("watermark")
    assert measure.prevalence(labels, "watermark") == 0.9


def test_one_presence_rule_everywhere():
    labels = torch.zeros(4, 64, 64, dtype=torch.long)
    wm = CLASSES.index("watermark")
    labels[1].view(-1)[:47] = wm  # one short of the watermark's 48 pixels
    labels[2].view(-1)[:48] = wm
    labels[3].view(-1)[:200] = wm
    rule = segmenter_module.present(labels, "watermark")
    assert rule.tolist() == [False, False, True, True]
    assert torch.equal(measure.present(labels, "watermark"), rule)
    assert measure.prevalence(labels, "watermark") == 0.5
    assert measure.present(labels, "watermark", min_pixels=16).tolist() == [False, True, True, True]
    big = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 128 px: the rule scales by area
    assert torch.equal(measure.present(big, "watermark"), rule)
    assert measure.present(labels[:0], "watermark").shape == (0,) and math.isnan(measure.prevalence(labels[:0], "tree"))
    with pytest.raises(KeyError, match="Unknown class"):
        measure.present(labels, "castle")


def test_region_grows_the_class_pixels():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 4, 4] = CLASSES.index("tree")
    assert measure.region(labels, "tree", grow=0).sum() == 1 and measure.region(labels, "tree").sum() == 9


class Brighten(nn.Module):
    """A latent -> image model without noise_mode: a fixed random image per latent, optionally brightened."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 3 * 16 * 16)
        torch.nn.init.normal_(self.proj.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        self.shift = shift

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(z)).view(-1, 3, 16, 16) + self.shift


def test_render_labels_clamps_and_refuses_non_images():
    sampler = LatentSampler(8)
    r = measure.render(Brighten(0.5), sampler, range(5), load_segmenter(), batch=2)
    assert r.images.shape == (5, 3, 16, 16) and r.images.max() <= 1 and r.labels.shape == (5, 16, 16)
    assert r.seeds == [0, 1, 2, 3, 4] and r[torch.tensor([True, False, True, False, False])].seeds == [0, 2]
    picked = r[[4, 1]]
    assert picked.seeds == [4, 1] and torch.equal(picked.images, r.images[[4, 1]]) and torch.equal(picked.labels[1], r.labels[1])
    assert r[1:3].seeds == [1, 2] and len(r[1:3]) == 2
    with pytest.raises(ModelError, match=r"returns images \(N, 3, H, W\)"):
        measure.render(lambda z: z, sampler, range(2))


def test_calibration_uses_the_noise_a_model_has_and_is_cached(tmp_path, perceptual, monkeypatch):
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, resolution=64, channels={4: 32, 8: 32, 16: 16, 32: 8, 64: 8}).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.002)  # a fresh generator adds no noise; a trained one a little
    sampler = LatentSampler(32, "tiny")
    scale = measure.calibrate(G, sampler, range(4), perceptual, cache_dir=tmp_path)
    assert "noise_mode" in scale.how and 0 < scale.noise < scale.different and scale.n == 4
    assert scale.ssim[0] > scale.ssim[1] and scale.rmse[0] < scale.rmse[1]
    (path,) = tmp_path.glob("scale-*.json")
    assert json.loads(path.read_text())["different"] == scale.different
    measure._SCALES.clear()
    monkeypatch.setattr(measure, "render", lambda *a, **k: pytest.fail("a cached scale is not recomputed"))
    assert measure.calibrate(G, sampler, range(4), perceptual, cache_dir=tmp_path) == scale
    monkeypatch.undo()
    without_noise = measure.calibrate(Brighten(), LatentSampler(8), range(4), perceptual, cache_dir=None)
    assert "pixel noise" in without_noise.how and 0 < without_noise.noise < without_noise.different
    with pytest.raises(ValueError, match="at least two seeds"):
        measure.calibrate(G, sampler, [3], perceptual, cache_dir=None)


def test_format_distance_shows_the_scale():
    scale = measure.Scale(noise=0.0007, different=2.42)
    expected = "0.121 (0.05 of a different image; noise re-render 0.0007, different image 2.42)"
    assert measure.format_distance(0.121, scale) == expected
    assert measure.relative(1.21, scale) == pytest.approx(0.5) and measure.format_distance(0.5) == "0.500"


def test_compare_measures_collateral_on_unrelated_samples(perceptual):
    sampler = LatentSampler(8)
    base, edited = Brighten(), Brighten(0.2)
    same = measure.compare(base, base, sampler, range(6), classes=["sky"], perceptual=perceptual)
    assert same.collateral["perceptual"] == 0 and same.collateral["n"] == 6 and same.unrelated.all()
    assert same.prevalence["sky"][0] == same.prevalence["sky"][1]
    # A target that some samples show and others do not: the collateral counts only the others.
    target = next(c for c in CLASSES if 0 < int(measure.present(same.before.labels, c).sum()) < 6)
    result = measure.compare(base, edited, sampler, range(6), classes=["sky", target], target=target,
                             perceptual=perceptual, scale=measure.Scale(0.001, 2.0))
    assert torch.equal(result.unrelated, ~measure.present(result.before.labels, target))
    assert result.collateral["n"] == int(result.unrelated.sum()) > 0
    unrelated = measure.collateral(result.before[result.unrelated], result.after[result.unrelated], None, perceptual)
    assert result.collateral == unrelated and unrelated["perceptual"] > 0 and unrelated["ssim"] < 1
    assert result.prevalence[target][0] == measure.prevalence(result.before.labels, target)
    assert f"samples without {target}" in result.summary() and "different image 2" in result.summary()
    again = measure.compare(result.before, edited, sampler, range(6), target=target, perceptual=perceptual)
    assert again.collateral == result.collateral
    unlabelled = measure.Rendered(result.after.images, None, result.after.seeds)
    relabelled = measure.compare(base, unlabelled, sampler, range(6), target=target, perceptual=perceptual)
    assert relabelled.collateral == result.collateral
    with pytest.raises(ValueError, match="must hold the seeds compared"):
        measure.compare(result.before, edited, sampler, range(1, 7), perceptual=perceptual)


def test_the_removed_class_is_the_one_the_erase_took_away_not_the_most_changed_pixels():
    sky, wall, mark = (CLASSES.index(c) for c in ("sky", "wall", "watermark"))
    before = torch.full((2, 32, 32), sky)
    before[:, 16:, :] = wall
    before[:, 12:20, 4:28] = mark  # a watermark across the sky and the wall
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:, :] = 1  # a loose brush: much wall around the mark
    after = before.clone()
    after[before == mark] = sky
    noise = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))
    after[(before == wall) & (masks > 0) & (noise < 0.5)] = sky  # half the wall smeared
    assert int(((before == wall) & (after != wall)).sum()) > int((before == mark).sum())
    assert measure.removed_class(before, after, masks) == "watermark"
    assert measure.removed_class(before, before, masks) is None
    with pytest.raises(ValueError, match="one shape"):
        measure.removed_class(before, after, masks[:1])
