import pytest
import torch
import torch.nn.functional as F

from dissect.models.segmenter import HELD_OUT_SEEDS, WEIGHTS, Segmenter, evaluate, load_segmenter, save_segmenter
from dissect.models.train_segmenter import PASTED, TRAIN_SEED_START, augment, copy_paste
from dissect.models.world import CLASSES, World


def test_shapes_for_both_world_sizes():
    seg = Segmenter().eval()
    for size in (64, 128):
        images = torch.rand(2, 3, size, size) * 2 - 1
        assert seg(images).shape == (2, len(CLASSES), size, size)
        labels = seg.segment(images)
        assert labels.shape == (2, size, size) and labels.dtype == torch.int64
        assert seg.features(images).shape == (2, seg.feature_dim)
    assert sum(p.numel() for p in seg.parameters()) <= 1_000_000


def test_bad_input_is_refused_with_the_expected_shape():
    seg = Segmenter().eval()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        seg(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="multiples of 8"):
        seg(torch.zeros(1, 3, 60, 60))


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    world = World(64)
    images, labels = world.render(world.sample_latents(range(TRAIN_SEED_START, TRAIN_SEED_START + 8)))
    images, labels = images[..., 16:48, 16:48], labels[..., 16:48, 16:48]  # the centre: buildings and the mark
    seg = Segmenter(widths=(8, 16, 16, 16))
    opt = torch.optim.Adam(seg.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(seg(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_augment_keeps_shapes_range_and_moves_labels_with_the_image():
    world = World(64)
    images, labels = world.render(world.sample_latents(range(4)))
    out, out_labels = augment(images, labels, torch.Generator().manual_seed(0), max_shift=0)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out_labels, labels)  # without shifts the labels stay put
    _, shifted = augment(images, labels, torch.Generator().manual_seed(0), max_shift=3)
    assert shifted.shape == labels.shape


def test_copy_paste_moves_an_object_with_its_labels_and_pixels():
    world = World(64)
    images, labels = world.render(world.sample_latents(range(TRAIN_SEED_START, TRAIN_SEED_START + 8)))
    out, out_labels = copy_paste(images, labels, torch.Generator().manual_seed(0), p=1.0)
    changed = out_labels != labels
    assert changed.flatten(1).any(1).sum() >= 6  # nearly every image got an object (its donor may have none)
    for i in range(8):
        if changed[i].any():
            cls = out_labels[i][changed[i]].unique()
            assert len(cls) == 1 and int(cls) in PASTED  # one object of one class, labelled as what it is
            donor = labels[(i - 1) % 8] == cls
            assert donor.any()
            pixels = out[i][:, changed[i]]  # its pixels are the donor's colours of that class
            assert torch.isin(pixels[0], images[(i - 1) % 8][0][donor]).all()
    same, same_labels = copy_paste(images, labels, torch.Generator().manual_seed(0), p=0.0)
    assert torch.equal(same, images) and torch.equal(same_labels, labels)


def test_save_and_load_round_trip(tmp_path):
    seg = Segmenter().eval()
    path = tmp_path / "seg.safetensors"
    save_segmenter(seg, path, {"note": "test"})
    loaded = load_segmenter(path=path)
    assert not loaded.training
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.allclose(loaded(x), seg(x), atol=0.05)  # fp16 weights


def test_missing_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_segmenter"):
        load_segmenter(path=tmp_path / "absent.safetensors")


def test_training_and_evaluation_seeds_do_not_overlap():
    assert HELD_OUT_SEEDS.stop <= TRAIN_SEED_START - 1000  # class weights use the 1000 seeds below the start


@pytest.mark.slow
def test_shipped_weights_reach_the_bar_on_held_out_world_images():
    assert WEIGHTS.is_file(), f"{WEIGHTS} is missing"
    scores = evaluate(load_segmenter(), list(HELD_OUT_SEEDS)[:200])
    assert scores["pixel_acc"] >= 0.95, scores
    assert scores["miou"] >= 0.80, scores


def test_presence_rule_counts_pixels_scaled_by_area():
    from dissect.models.segmenter import PRESENCE_PIXELS, present
    from dissect.models.world import CLASSES

    wm = CLASSES.index("watermark")
    labels = torch.zeros(3, 64, 64, dtype=torch.long)
    labels[1].view(-1)[: PRESENCE_PIXELS["watermark"] - 1] = wm
    labels[2].view(-1)[: PRESENCE_PIXELS["watermark"]] = wm
    assert present(labels, "watermark").tolist() == [False, False, True]
    big = torch.zeros(1, 128, 128, dtype=torch.long)
    big.view(-1)[: PRESENCE_PIXELS["watermark"] * 3] = wm  # below 4x the 64x64 threshold
    assert not present(big, "watermark").item()
    with pytest.raises(KeyError, match="classes are"):
        present(labels, "steeple")
