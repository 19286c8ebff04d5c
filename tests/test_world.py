import pytest
import torch

from dissect.models.world import CLASSES, FIELD_INDEX, SUPPORTED_SIZES, WATERMARK, World, is_dusk


@pytest.fixture(scope="module")
def world():
    return World(64)


@pytest.fixture(scope="module")
def many(world):
    """2000 scenes: latents, images, labels, alpha, facts."""
    z = world.sample_latents(range(10_000, 12_000))
    images, labels, alpha = world.render(z, return_alpha=True)
    return z, images, labels, alpha, world.scene_facts(z)


def test_same_latent_same_scene_and_seeds_differ(world):
    z = world.sample_latents([1, 2, 3])
    assert torch.equal(z, world.sample_latents([1, 2, 3]))
    assert torch.equal(z[1], world.sample_latents([2])[0])
    a, la = world.render(z)
    b, lb = world.render(z.clone())
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])


def test_render_of_a_batch_equals_render_of_each_row(world):
    z = world.sample_latents(range(8))
    images, labels = world.render(z)
    for i in range(8):
        one, one_labels = world.render(z[i : i + 1])
        assert torch.equal(one[0], images[i]) and torch.equal(one_labels[0], labels[i])


def test_only_the_first_latent_dim_entries_are_read(world):
    z = world.sample_latents(range(4))
    other = z.clone()
    other[:, world.latent_dim :] = torch.randn(4, 128 - world.latent_dim)
    assert world.latent_dim <= 128
    assert torch.equal(world.render(z)[0], world.render(other)[0])


def test_shapes_dtypes_and_value_range(many):
    _, images, labels, alpha, _ = many
    assert images.shape == (2000, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (2000, 64, 64) and labels.dtype == torch.int64
    assert alpha.shape == (2000, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    # one label per pixel, each a valid class, and every class occurs
    assert labels.min() >= 0 and labels.max() < len(CLASSES)
    assert set(labels.unique().tolist()) == set(range(len(CLASSES)))


def test_watermark_label_is_exactly_where_the_overlay_was_composited(world, many):
    z, images, labels, alpha, facts = many
    assert torch.equal(labels == WATERMARK, alpha > 0)
    has = (alpha > 0).flatten(1).any(1)
    assert torch.equal(has, facts["has_watermark"])
    assert alpha[alpha > 0].min() >= 0.3 and alpha.max() <= 0.5
    # The same scene without the mark differs from it only under the overlay, by the overlay.
    idx = has.nonzero().flatten()[:50]
    clean_z = z[idx].clone()
    clean_z[:, FIELD_INDEX["watermark"]] = 10.0  # uniform ~1: no watermark
    clean, clean_labels = world.render(clean_z)
    a = alpha[idx].unsqueeze(1)
    assert torch.allclose(images[idx], clean + (1 - clean) * a, atol=1e-6)
    assert torch.equal(labels[idx] != clean_labels, alpha[idx] > 0)


def test_watermark_is_the_same_centred_mark_every_time(many):
    _, _, _, alpha, facts = many
    masks = alpha[facts["has_watermark"]] > 0
    assert (masks == masks[0]).all()
    ys, xs = masks[0].nonzero(as_tuple=True)
    width = xs.max() - xs.min() + 1
    assert 0.5 * 64 <= width <= 0.7 * 64
    assert abs((xs.min() + xs.max()) / 2 - 31.5) <= 1 and abs((ys.min() + ys.max()) / 2 - 31.5) <= 1


def test_fact_rates_follow_the_design(many):
    facts = many[4]
    rate = {k: v.float().mean().item() for k, v in facts.items()}
    assert abs(rate["has_watermark"] - 0.3) <= 0.03
    assert abs(rate["dusk"] - 0.3) <= 0.03
    assert rate["has_spire"] >= 0.35 and rate["has_dome"] >= 0.35
    assert rate["has_tree"] >= 0.5
    assert 0.3 <= rate["has_cloud"] <= 0.8


def test_facts_are_visible_in_the_labels(many):
    from dissect.models.world import CLOUD, DOME, SPIRE, TREE

    _, _, labels, _, facts = many
    for key, cls in (("has_spire", SPIRE), ("has_dome", DOME), ("has_tree", TREE), ("has_cloud", CLOUD)):
        present = (labels == cls).flatten(1).any(1)
        assert torch.equal(present, facts[key]), key


def test_is_dusk_agrees_with_the_facts(many):
    _, images, labels, _, facts = many
    assert (is_dusk(images, labels) == facts["dusk"]).float().mean() >= 0.99


def test_size_128_renders_the_same_scene_sharper():
    z = World.sample_latents(range(64))
    small, small_labels = World(64).render(z)
    big, big_labels = World(128).render(z)
    assert big.shape == (64, 3, 128, 128) and big_labels.shape == (64, 128, 128)
    down = big_labels[:, 1::2, 1::2]  # pixel centres of the 64 grid fall between these; most labels agree
    assert (down == small_labels).float().mean() > 0.9
    assert (big - torch.nn.functional.interpolate(small, scale_factor=2)).abs().mean() < 0.1


@pytest.mark.parametrize("size", [32, 96, 256])
def test_unsupported_size_is_refused_with_the_supported_ones(size):
    with pytest.raises(ValueError, match=str(SUPPORTED_SIZES[0])):
        World(size)


def test_latent_of_wrong_shape_is_refused(world):
    with pytest.raises(ValueError, match="z must be"):
        world.render(torch.randn(4, 8))
