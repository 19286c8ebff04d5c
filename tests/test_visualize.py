import plotly.graph_objects as go
import pytest
import torch
import torchvision
from PIL import Image

from dissect.errors import LayerError, RequestError
from dissect.hooks import Trace
from dissect.models.stylegan import Generator
from dissect.visualize import (
    cluster_overlay,
    cluster_projection_figure,
    eigen_spectrum_figure,
    image_grid,
    match_overlay,
    palette,
    score_histogram_figure,
    side_by_side,
    to_pil,
    to_unit,
    value_patch,
)

LAYER = "synthesis.b16.conv1"


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return Generator(z_dim=32, w_dim=32, channels={4: 32, 8: 32, 16: 16, 32: 8, 64: 8}).eval()


@pytest.fixture(scope="module")
def z():
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(1))


def _images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- pictures -------------------------------------------------------------------------------------------------


def test_to_unit_and_to_pil():
    pics = to_unit(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]))
    assert pics.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    img = to_pil(to_unit(_images(1, 20)[0]))
    assert isinstance(img, Image.Image) and img.size == (20, 20) and img.mode == "RGB"
    with pytest.raises(ValueError, match="one picture"):
        to_pil(torch.rand(2, 3, 8, 8))


def test_palette_is_fixed_and_distinct():
    assert palette(5) == palette(40)[:5]
    colors = palette(40)
    assert len(set(colors)) == 40
    assert all(0 <= v <= 255 for c in colors for v in c)


def test_image_grid_shapes_and_captions():
    pics = to_unit(_images(5, 16))
    grid = image_grid(pics, nrow=3)
    torch.testing.assert_close(grid, torchvision.utils.make_grid(pics, nrow=3, padding=2, pad_value=1.0))
    captioned = image_grid(pics, nrow=3, labels=[f"seed {i} with a long caption" for i in range(5)])
    assert captioned.shape[0] == 3 and captioned.shape[2] == grid.shape[2] and captioned.shape[1] > grid.shape[1]
    assert 0 <= captioned.min() and captioned.max() <= 1
    # Some caption pixels are ink (dark), not just white strip.
    assert (captioned < 0.5).any()
    with pytest.raises(ValueError, match="one label per image"):
        image_grid(pics, labels=["a"])
    big = image_grid(pics[:1], scale=3, padding=0)
    torch.testing.assert_close(big, pics[0].repeat_interleave(3, 1).repeat_interleave(3, 2))


def test_side_by_side_places_pictures_top_aligned():
    a, b = torch.zeros(3, 10, 4), torch.full((3, 6, 5), 0.5)
    out = side_by_side([a, b], padding=2)
    assert out.shape == (3, 10, 11)
    assert (out[:, :, :4] == 0).all() and (out[:, :, 4:6] == 1).all()
    assert (out[:, :6, 6:] == 0.5).all() and (out[:, 6:, 6:] == 1).all()


# -- value patches ----------------------------------------------------------------------------------------------


def test_value_patch_full_region_is_normal_render(G, z):
    with torch.no_grad():
        normal = to_unit(G(z))
    full = value_patch(G, LAYER, z, torch.ones(64, 64))
    assert full.shape == (2, 3, 64, 64)
    torch.testing.assert_close(full, normal)


def test_value_patch_empty_region_differs_and_is_deterministic(G, z):
    normal = value_patch(G, LAYER, z, torch.ones(2, 64, 64))
    empty = value_patch(G, LAYER, z, torch.zeros(2, 64, 64))
    assert (empty - normal).abs().max() > 1e-2
    torch.testing.assert_close(value_patch(G, LAYER, z, torch.zeros(64, 64)), empty, rtol=0, atol=0)
    assert 0 <= empty.min() and empty.max() <= 1


def test_value_patch_region_only_changes_what_the_region_reaches(G, z):
    region = torch.zeros(64, 64)
    region[:16, :16] = 1  # a 4x4 patch of the 16x16 grid
    empty = value_patch(G, LAYER, z, torch.zeros(64, 64))
    patch = value_patch(G, LAYER, z, region)
    changed = (patch - empty).abs().amax(dim=(0, 1)) > 1e-6
    assert changed[:16, :16].any()
    # 3x3 convolutions at 16, 32 and 64 spread a location by a few pixels at most, never to the far corner.
    assert not changed[40:, 40:].any()


def test_value_patch_renders_given_values_and_restores_the_model(G, z):
    with torch.no_grad(), Trace(G, LAYER) as t:
        G(z)
    region = torch.zeros(64, 64)
    region[16:48, 16:48] = 1
    own = value_patch(G, LAYER, z, region)
    torch.testing.assert_close(value_patch(G, LAYER, z, region, values=t.output), own)
    # One image's values (1, C, h, w) are shown in every image (rendered with each image's own later styles).
    first = value_patch(G, LAYER, z, region, values=t.output[:1])
    torch.testing.assert_close(first[0], own[0])
    assert (first[1] - own[1]).abs().max() > 1e-3
    G.train()
    try:
        value_patch(G, LAYER, z, region)
        assert G.training and G.synthesis.b16.conv1.training
    finally:
        G.eval()
    assert all(not m._forward_hooks for m in G.modules())


def test_value_patch_through_synthesis_with_ws(G, z):
    ws = G.styles(z)
    with torch.no_grad():
        normal = to_unit(G.synthesis(ws))
    torch.testing.assert_close(value_patch(G.synthesis, "b16.conv1", ws, torch.ones(16, 16)), normal)


def test_value_patch_takes_dict_and_tuple_inputs(G, z):
    class Keywords(torch.nn.Module):
        """The generator behind keyword inputs, as a model with a dict sampler would be."""

        def __init__(self) -> None:
            super().__init__()
            self.G = G

        def forward(self, z, psi):
            return self.G(z, truncation_psi=psi)

    model = Keywords()
    with torch.no_grad():
        normal = to_unit(G(z, truncation_psi=0.7))
    region = torch.ones(64, 64)
    torch.testing.assert_close(value_patch(model, f"G.{LAYER}", {"z": z, "psi": 0.7}, region), normal)
    torch.testing.assert_close(value_patch(model, f"G.{LAYER}", [z, 0.7], region), normal)


def test_value_patch_rejects_bad_region(G, z):
    with pytest.raises(RequestError, match="region"):
        value_patch(G, LAYER, z, torch.ones(64))
    with pytest.raises(RequestError, match="3 masks for a batch of 2"):
        value_patch(G, LAYER, z, torch.ones(3, 64, 64))
    with pytest.raises(RequestError, match="to stand in for layer"):
        value_patch(G, LAYER, z, torch.ones(64, 64), values=torch.zeros(1, 16, 8, 8))
    with pytest.raises(LayerError, match=r"to output \(N, C, h, w\)"):
        value_patch(G, "mapping", z, torch.ones(64, 64))


# -- overlays ---------------------------------------------------------------------------------------------------


def _block_scores(n=2, grid=8):
    scores = torch.zeros(n, grid, grid)
    scores[:, 2:6, 3:7] = 1.0
    return scores


def test_match_overlay_dims_outside_keeps_inside_and_outlines_border():
    images = _images(2, 32)
    out = match_overlay(images, _block_scores(), threshold=0.5, dim=0.3, color=(1.0, 0.0, 1.0))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    up = torch.nn.functional.interpolate(_block_scores()[:, None], size=(32, 32), mode="bilinear")[:, 0]
    region = up >= 0.5
    pics = to_unit(images)
    outside = ~region[:, None].expand_as(pics)
    torch.testing.assert_close(out[outside], pics[outside] * 0.3)

    ink = (out == torch.tensor([1.0, 0.0, 1.0])[None, :, None, None]).all(dim=1)
    assert ink.any()
    assert (ink <= region).all()  # the contour lies on the region, not outside it
    # Every contour pixel touches the outside; interior pixels are untouched.
    outside_near = torch.nn.functional.max_pool2d((~region).float()[:, None], 3, 1, padding=1)[:, 0] > 0
    assert (ink <= outside_near).all()
    interior = region & ~outside_near
    assert interior.any()
    inner = interior[:, None].expand_as(pics)
    torch.testing.assert_close(out[inner], pics[inner])
    # The contour closes: each border pixel of the region is inked.
    assert (ink == (region & outside_near)).all()


def test_match_overlay_outlines_at_image_edge_and_per_image_threshold():
    scores = torch.ones(2, 4, 4)
    out = match_overlay(_images(2, 16), scores, threshold=torch.tensor([0.5, 2.0]), color=(0.0, 1.0, 0.0))
    ink = (out == torch.tensor([0.0, 1.0, 0.0])[None, :, None, None]).all(dim=1)
    assert ink[0, 0].all() and ink[0, :, 0].all() and not ink[0, 5:10, 5:10].any()
    assert not ink[1].any()  # nothing reaches 2.0: all dimmed, no contour
    torch.testing.assert_close(out[1], to_unit(_images(2, 16))[1] * 0.3)


def test_cluster_overlay_colours_and_legend():
    images = _images(2, 16)
    maps = torch.zeros(2, 4, 4, dtype=torch.long)
    maps[:, :, 2:] = 2
    maps[1, 0, 0] = -1
    names = ["sky", "tree", "spire"]
    out, legend = cluster_overlay(images, maps, names, ious=[0.9, 0.1, 0.5], alpha=0.5)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    pics = to_unit(images)
    colors = torch.tensor(palette(3), dtype=torch.float32) / 255
    torch.testing.assert_close(out[0, :, 0, 0], 0.5 * pics[0, :, 0, 0] + 0.5 * colors[0])
    torch.testing.assert_close(out[0, :, 0, 15], 0.5 * pics[0, :, 0, 15] + 0.5 * colors[2])
    torch.testing.assert_close(out[1, :, :4, :4], pics[1, :, :4, :4])  # id -1: left as is

    assert [e.cluster for e in legend.entries] == [0, 2] or [e.cluster for e in legend.entries] == [2, 0]
    assert {e.name for e in legend.entries} == {"sky", "spire"}  # "tree" never appears
    entry = {e.cluster: e for e in legend.entries}[2]
    assert entry.color == palette(3)[2] and entry.iou == 0.5 and entry.share == pytest.approx(0.5)
    assert legend.image.dim() == 3 and legend.image.shape[0] == 3 and legend.image.shape[1] >= 2 * 10
    assert 0 <= legend.image.min() and legend.image.max() <= 1

    with pytest.raises(ValueError, match="only 2 names"):
        cluster_overlay(images, maps, names[:2])


# -- plotly -----------------------------------------------------------------------------------------------------


def test_eigen_spectrum_figure_from_moment_and_eigenvalues():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5, 3, 1, 0.5, 0.1, 0.0])
    fig = eigen_spectrum_figure(x.T @ x / 500)
    assert isinstance(fig, go.Figure) and [t.name for t in fig.data] == ["eigenvalue", "cumulative energy"]
    evals, energy = fig.data[0].y, fig.data[1].y
    assert evals[0] >= evals[1] >= evals[2]
    assert energy[-1] == pytest.approx(1.0) and all(a <= b + 1e-12 for a, b in zip(energy, energy[1:]))
    assert fig.layout.yaxis.type == "log"
    shown = eigen_spectrum_figure(torch.tensor([0.0, 4.0, 1.0])).data[0].y
    assert shown[:2] == (4.0, 1.0) and shown[2] != shown[2]  # zero: a NaN gap on the log axis


def test_cluster_projection_figure_one_trace_per_cluster():
    gen = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.randn(3000, 8, generator=gen) + 5 * i for i in range(3)])
    ids = torch.arange(3).repeat_interleave(3000)
    fig = cluster_projection_figure(keys, ids, ["a", "b", "c"], max_points=1000)
    assert [t.name for t in fig.data] == ["0: a", "1: b", "2: c"]
    assert sum(len(t.x) for t in fig.data) == 1000
    assert fig.data[1].marker.color == "rgb({},{},{})".format(*palette(3)[1])


def test_score_histogram_figure_counts_and_threshold():
    scores = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    fig = score_histogram_figure(scores, threshold=0.75, bins=20)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Bar)
    assert sum(fig.data[0].y) == scores.numel()
    assert any(s.type == "line" and s.x0 == 0.75 for s in fig.layout.shapes)
    assert "at or above" in fig.layout.title.text
    assert len(score_histogram_figure(torch.ones(5)).data) == 1  # constant scores still bin
