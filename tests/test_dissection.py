"""Layer dissection: IoU against a brute-force reference, shared forwards, samples, causal tests, pictures, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dissect import dissection
from dissect.cli import main
from dissect.dissection import (
    GeneratedSamples,
    LabelledImages,
    WorldSamples,
    ablate,
    dissect,
    insert,
    measure_ablation,
    measure_insertion,
    report_html,
    top_units,
    unit_grid,
    units_per_class_figure,
)
from dissect.errors import LayerError, ModelError, RequestError
from dissect.memory import LayerMemory
from dissect.models.loaders import LatentSampler
from dissect.models.segmenter import Segmenter, save_segmenter
from dissect.models.stylegan import Generator
from dissect.models.world import CLASSES

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")
CLASS3 = ("a", "b", "c")


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU())


def _labelled(n: int = 6, size: int = 16) -> LabelledImages:
    g = torch.Generator().manual_seed(1)
    return LabelledImages(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n, size, size), generator=g),
                          CLASS3)


def _reference_iou(maps: torch.Tensor, labels: torch.Tensor, q: float, classes: int) -> torch.Tensor:
    """GAN Dissection by hand: exact per-unit quantile, bilinear upsampling, threshold, IoU over all samples."""
    values = maps.transpose(0, 1).reshape(maps.shape[1], -1).sort(dim=1).values
    thresholds = values[:, math.ceil(q * values.shape[1]) - 1]
    up = F.interpolate(maps, size=labels.shape[1:], mode="bilinear", align_corners=False)
    on = up > thresholds[None, :, None, None]
    iou = torch.zeros(maps.shape[1], classes, dtype=torch.float64)
    for c in range(classes):
        cls = (labels == c)[:, None]
        iou[:, c] = (on & cls).sum((0, 2, 3)).double() / (on | cls).sum((0, 2, 3)).clamp_min(1).double()
    return iou


@pytest.mark.parametrize("quantile", [0.9, 0.99])
def test_iou_matches_a_brute_force_reference(quantile):
    model, samples = _convnet(), _labelled()
    result = dissect(model, ["1", "3"], samples, quantile=quantile, batch_size=4, progress=False)
    with torch.no_grad():
        relu1 = model[:2](samples.images)
        relu3 = model(samples.images)
    for layer, maps in (("1", relu1), ("3", relu3)):
        d = result[layer]
        assert d.grid == tuple(maps.shape[2:]) and d.units == maps.shape[1] and d.classes == CLASS3
        torch.testing.assert_close(d.iou, _reference_iou(maps, samples.labels, quantile, 3), atol=1e-12, rtol=0)
        assert torch.equal(d.best_class, d.iou.argmax(1))
        # Top images per unit: the samples of the highest per-sample peaks, best first.
        peaks = maps.amax(dim=(2, 3))
        assert torch.equal(d.top_samples[0], peaks.argmax(0))
        torch.testing.assert_close(d.top_values[0], peaks.amax(0).double())


def test_a_planted_unit_is_named_by_its_class_and_ranked_first():
    """Unit 0 of the input is class 'b' (plus noise), unit 1 is noise: unit 0 leads 'b' with a high IoU."""
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (8, 12, 12), generator=g)
    images = torch.randn(8, 3, 12, 12, generator=g) * 0.01
    images[:, 0] += (labels == 1).float() * (1 + torch.rand(8, 12, 12, generator=g))
    result = dissect(nn.Identity(), [""], LabelledImages(images, labels, CLASS3), quantile=0.8, progress=False)
    d = result[""]
    assert d.best_class[0] == 1 and d.best_iou[0] > 0.5 and d.best_iou[1] < 0.3
    assert d.ranked("b")[0] == 0 and d.top("b", 1).tolist() == [0]
    assert d.units_per_class(0.5) == {"b": 1} and d.interpretable_share(0.5) == pytest.approx(1 / 3)
    assert d.share_per_class(0.5) == {"b": pytest.approx(1 / 3)}
    assert d.table(0.5) == [(0, "b", pytest.approx(float(d.best_iou[0])))]


def test_every_layer_shares_two_passes_over_the_data():
    model, samples = _convnet(), _labelled(n=10)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    result = dissect(model, ["0", "1", "2", "3"], samples, batch_size=4, progress=False)
    assert result.forward_passes == 2 and calls == [4, 4, 2] * 2 and result.samples == 10
    assert len(result.layers) == 4 and result.units == 4 + 4 + 5 + 5


def _tiny_generator() -> tuple[Generator, LatentSampler]:
    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, resolution=32, channels={4: 16, 8: 16, 16: 8, 32: 8}).eval()
    return G, LatentSampler(16, "tiny")


def tiny_model() -> tuple[Generator, LatentSampler]:
    """An entry point for the CLI test."""
    return _tiny_generator()


@pytest.fixture(scope="module")
def random_segmenter() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(widths=(4, 4, 4, 4)).eval()


def test_a_generator_is_dissected_against_its_segmented_images(random_segmenter):
    G, sampler = _tiny_generator()
    layers = ["synthesis.b8.conv1", "synthesis.b16.conv0"]
    result = dissect(G, layers, GeneratedSamples(sampler, range(6)), segmenter=random_segmenter, batch_size=4,
                     progress=False)
    assert result.classes == CLASSES and result.forward_passes == 2
    assert result["synthesis.b8.conv1"].iou.shape == (16, len(CLASSES))
    assert result["synthesis.b16.conv0"].grid == (16, 16)
    # With label maps given, no segmenter runs and the forward stops after the last layer: the same IoU.
    with torch.no_grad():
        labels = random_segmenter.segment(G(sampler(list(range(6)))))
    given = dissect(G, layers, GeneratedSamples(sampler, range(6), labels=labels), batch_size=4, progress=False)
    torch.testing.assert_close(given["synthesis.b8.conv1"].iou, result["synthesis.b8.conv1"].iou)


def test_input_side_units_are_the_keys_layer_memory_ablates():
    G, sampler = _tiny_generator()
    layer, z = "synthesis.b16.conv1", sampler([0, 1])
    labels = torch.randint(0, len(CLASSES), (4, 32, 32))
    d = dissect(G, [layer], GeneratedSamples(sampler, range(4), labels=labels), side="input", progress=False)[layer]
    memory = LayerMemory(G, layer)
    assert d.units == memory.key_channels
    units = top_units(G, layer, "sky", 3, GeneratedSamples(sampler, range(4), labels=labels), side="input")
    assert torch.equal(units, d.top("sky", 3))
    with torch.no_grad(), memory.ablate(units):
        expected = G(z)
    with torch.no_grad(), ablate(G, layer, units, side="input"):
        got = G(z)
    with torch.no_grad():
        base = G(z)
    assert torch.equal(got, expected) and not torch.equal(got, base)


def test_ablation_and_insertion_edit_only_the_chosen_units_and_region():
    model = _convnet()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        base = model[:3](x)
    region = torch.zeros(8, 8)
    region[:4] = 1  # the top half of the image: rows 0-1 of the 4x4 grid
    with torch.no_grad(), ablate(model, "2", [1, 3]):
        zeroed = model[:3](x)
    assert (zeroed[:, [1, 3]] == 0).all() and torch.equal(zeroed[:, [0, 2, 4]], base[:, [0, 2, 4]])
    with torch.no_grad(), insert(model, "2", [0, 2], region, torch.tensor([5.0, 7.0])):
        painted = model[:3](x)
    assert (painted[:, 0, :2] == 5).all() and (painted[:, 2, :2] == 7).all()
    assert torch.equal(painted[:, :, 2:], base[:, :, 2:]) and torch.equal(painted[:, 1], base[:, 1])


class _ToyGenerator(nn.Module):
    """z (N, 2) -> unit maps (N, 2, 8, 8) in the layer 'units' -> images (N, 3, 16, 16); image channel 0 is unit 0."""

    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        maps = self.units(z[:, :, None, None].expand(-1, -1, 8, 8).clone())
        up = F.interpolate(maps, size=(16, 16), mode="nearest")
        return torch.cat([up, up[:, :1]], 1).tanh()


class _ChannelSegmenter(nn.Module):
    """Labels 'tree' where image channel 0 is positive, 'sky' elsewhere."""

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        return torch.where(images[:, 0] > 0, CLASSES.index("tree"), CLASSES.index("sky"))


def test_ablation_removes_and_insertion_draws_what_a_unit_causes():
    G, seg = _ToyGenerator(), _ChannelSegmenter()
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    samples = GeneratedSamples(lambda seeds: z[seeds], range(4))
    tree = measure_ablation(G, "units", [0], samples, seg, "tree")
    assert (tree.before, tree.after, tree.removed) == (0.5, 0.0, 1.0)
    other = measure_ablation(G, "units", [1], samples, seg, "tree")
    assert (other.before, other.after, other.removed) == (0.5, 0.5, 0.0)
    region = torch.zeros(16, 16)
    region[:, :8] = 1
    drawn = measure_insertion(G, "units", [0], 3.0, region, samples, seg, "tree")
    assert drawn.drawn == 1.0 and drawn.outside == 0.0 and drawn.before == 0.5
    assert measure_insertion(G, "units", [1], 3.0, region, samples, seg, "tree").drawn == 0.0


class _Tokens(nn.Module):
    """A ViT-like block: (N, 3, 8, 8) -> 16 patch tokens plus a class token (N, 17, 6) -> a Linear over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.mlp = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1)
        return self.head(self.mlp(tokens)[:, 0])


def test_a_token_grid_is_dissected_and_a_layer_without_a_map_is_refused():
    model, samples = _Tokens(), _labelled(n=4, size=8)
    d = dissect(model, ["mlp"], samples, progress=False)["mlp"]
    assert d.grid == (4, 4) and d.units == 6
    with pytest.raises(LayerError, match=r"'head' has no spatial map.*\(4, 2\).*token grid"):
        dissect(model, ["mlp", "head"], samples, progress=False)
    with pytest.raises(LayerError, match="token grid"):
        with torch.no_grad(), ablate(model, "head", [0]):
            model(samples.images)
    sequence = nn.Sequential(nn.Conv1d(3, 16, 1))  # (N, 16, L): 16 is a square, yet these are no tokens
    with pytest.raises(LayerError, match="1-D convolution"):
        dissect(sequence, ["0"], samples, progress=False)


def test_world_samples_carry_the_worlds_exact_labels():
    samples = WorldSamples(range(3), size=64)
    images, labels = samples.batch([0, 2])
    assert images.shape == (2, 3, 64, 64) and labels.dtype == torch.int64 and samples.classes == CLASSES
    d = dissect(nn.Conv2d(3, 2, 3, padding=1), [""], samples, progress=False)[""]
    assert d.iou.shape == (2, len(CLASSES))


def test_bad_input_is_refused_with_what_to_do():
    images = torch.randn(2, 3, 8, 8)
    with pytest.raises(RequestError, match="integer tensors.*float32.*long"):
        LabelledImages(images, torch.zeros(2, 8, 8), CLASS3)
    with pytest.raises(RequestError, match=r"shape \(2, 8, 8\).*\(2, 4, 4\)"):
        LabelledImages(images, torch.zeros(2, 4, 4, dtype=torch.long), CLASS3)
    with pytest.raises(RequestError, match=r"0\.\.2.*got 5\.\.5"):
        LabelledImages(images, torch.full((2, 8, 8), 5), CLASS3)
    with pytest.raises(RequestError, match=r"shape \(3, H, W\)"):
        GeneratedSamples(lambda s: torch.zeros(len(s), 2), range(3), labels=torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(RequestError, match="same shapes"):
        LabelledImages.from_pairs([(images[0], torch.zeros(8, 8, dtype=torch.long)),
                                   (images[0, :, :4], torch.zeros(8, 4, dtype=torch.long))], CLASS3)
    d = dissect(_convnet(), ["1"], _labelled(), progress=False)["1"]
    with pytest.raises(RequestError, match="Unknown class 'tree'; the classes are a, b, c"):
        d.top("tree", 2)
    with pytest.raises(RequestError, match="units 0..3; there is no unit 7"):
        unit_grid(_convnet(), _labelled(), d, [1, 7])
    model = _convnet()
    with pytest.raises(RequestError, match="units 0..3; there is no unit 9"):
        with torch.no_grad(), ablate(model, "1", [9]):
            model(images)
    with pytest.raises(LayerError, match="was not dissected"):
        dissect(_convnet(), ["1"], _labelled(), progress=False)["3"]
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        dissect(_convnet(), ["nope"], _labelled(), progress=False)
    with pytest.raises(ModelError, match="segmenter labels images"):
        dissect(nn.Flatten(), [""], GeneratedSamples(lambda s: torch.zeros(len(s), 3, 4, 4), range(2)),
                segmenter=Segmenter(widths=(4, 4, 4, 4)), side="input", progress=False)


def test_bad_labels_are_refused_before_any_forward():
    model = _convnet()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    with pytest.raises(RequestError):
        dissect(model, ["1"], LabelledImages(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8), CLASS3))
    assert calls == []


def test_pictures_and_a_self_contained_report():
    model, samples = _convnet(), _labelled()
    result = dissect(model, ["1", "3"], samples, quantile=0.9, top_k=4, progress=False)
    d = result["3"]
    grid = unit_grid(model, samples, d, [0, 2], k=3)
    assert grid.dim() == 3 and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1
    figure = units_per_class_figure(result, level=0.0)
    assert sum(sum(bar.y) for bar in figure.data) == result.units  # every unit has a best class at level 0
    page = report_html(model, samples, result, level=0.0, shown=2, k=3)
    assert page.count("<img alt=") == 2 and page.count("src='data:image/png;base64,") == 2 and "<table>" in page
    # plotly.js is inline (megabytes), no script or picture is fetched when the page opens
    assert "<script src=" not in page.replace('"', "'").replace("<script src='data:", "") and len(page) > 1_000_000
    assert page.lower().count("plotly.js") >= 1 and "src='http" not in page and 'src="http' not in page


def test_cli_units_writes_a_report(tmp_path, capsys):
    path = tmp_path / "segmenter.safetensors"
    save_segmenter(Segmenter().eval(), path)  # files record the default widths
    out = tmp_path / "report.html"
    code = main(["units", "--model", f"{__name__}:tiny_model", "--layer", "synthesis.b8.conv1,synthesis.b16.conv0",
                 "--n", "6", "--batch-size", "4", "--segmenter", str(path), "--shown", "2", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "synthesis.b16.conv0" in stdout and "2 passes" in stdout
    assert out.is_file() and "data:image/png;base64," in out.read_text()
    assert main(["units", "--model", f"{__name__}:tiny_model", "--layer", "mapping.layers.0", "--n", "4",
                 "--segmenter", str(path), "--out", str(out)]) == 2
    assert "no spatial map" in capsys.readouterr().err


def test_module_exports_exist():
    assert all(hasattr(dissection, name) for name in dissection.__all__)


def _dissect_page_app() -> None:
    import streamlit as st

    from dashboard import dissect_page, workspace

    if "ws" not in st.session_state:
        st.session_state.ws = workspace.Workspace.open("tests.test_dissection:tiny_model")
    dissect_page.render(st.session_state.ws, [0, 1, 2], None)


@pytest.mark.slow
def test_dashboard_page_dissects_shows_a_unit_and_ablates_or_inserts():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_dissect_page_app, default_timeout=300).run()
    assert not at.exception and not at.warning
    assert at.selectbox(key="dissect_layer").value == "synthesis.b16.conv1"
    captions = [c for image in at.get("image") for c in image.captions]
    assert any(c.startswith("Top 6 images of unit") for c in captions)
    assert sum(c.endswith("· ablate") for c in captions) == 3  # the grid's seeds, with the units ablated
    at.selectbox(key="dissect_n").set_value(50).run()
    at.radio(key="dissect_action").set_value("Insert").run()
    at.button(key="dissect_measure").click().run()
    assert not at.exception and any("of the box becomes tree" in m.value for m in at.markdown)
