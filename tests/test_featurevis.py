"""Feature visualisation (dissect.featurevis) on tiny models built here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dissect.errors import LayerError, ModelError, RequestError
from dissect.featurevis import (
    AlignedImage,
    CPPNImage,
    FourierImage,
    Jitter,
    LatentParam,
    Objective,
    Pad,
    PixelImage,
    RandomRotate,
    RandomScale,
    channel,
    colour_correlation,
    context_direction,
    direction,
    diversity,
    hook_count,
    interpolate,
    key_cluster,
    standard_transforms,
    style_transfer,
    unit,
    visualise,
    world_colour_correlation,
)
from dissect.memory import LayerMemory

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")


class TinyNet(nn.Module):
    """Two conv stages and a branch the forward never takes."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.unused = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


class TinyGenerator(nn.Module):
    """z (N, 4) -> image (N, 3, 8, 8), with StyleGAN's mapping / synthesis split."""

    num_ws = 2

    def __init__(self) -> None:
        super().__init__()
        self.mapping_net = nn.Linear(4, 5)
        self.fc = nn.Linear(10, 3 * 8 * 8)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def mapping(self, z: torch.Tensor, truncation_psi: float = 1.0) -> torch.Tensor:
        return self.mapping_net(z)

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(self.fc(ws.flatten(1)).view(-1, 3, 8, 8)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.synthesis(self.mapping(z)[:, None].expand(-1, self.num_ws, -1))


def params(channels: int = 3, size=(16, 16), n: int = 2):
    corr = torch.eye(channels) * 0.5
    return {
        "pixel": PixelImage(n, channels, size),
        "fourier": FourierImage(n, channels, size),
        "fourier+decorrelated": FourierImage(n, channels, size, decorrelate=corr),
        "cppn": CPPNImage(n, channels, size, hidden=8, layers=3),
        "aligned": AlignedImage(n, channels, size, factors=(2, 4)),
    }


@pytest.mark.parametrize("kind", list(params()))
def test_objective_increases(kind: str) -> None:
    model = TinyNet()
    param = params()[kind]
    lr = 0.02 if kind == "cppn" else 0.05
    before = visualise(model, channel("conv2", 1), params()[kind], steps=0).values
    after = visualise(model, channel("conv2", 1), param, steps=30, lr=lr)
    assert after.steps == 30 and len(after.history) == 30
    assert (after.values > before + 0.05).all(), (before, after.values)


def test_transforms_are_seeded_and_keep_the_size() -> None:
    model = TinyNet()
    runs = [visualise(model, channel("conv2", 0), FourierImage(1, 3, 24), steps=5, transforms=standard_transforms(24),
                      seed=s).images for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 20, 30)
    for t in (Pad(3), Jitter(4), RandomScale((0.9, 1.1)), RandomRotate((-10, 10))):
        y = t(x, gen)
        assert y.shape[:2] == x.shape[:2]
    assert Pad(3)(x, gen).shape[-2:] == (26, 36) and Jitter(4)(x, gen).shape[-2:] == (16, 26)
    assert RandomRotate((0,))(x, gen).allclose(x, atol=1e-5)


def test_hooks_removed_after_success_and_exception() -> None:
    model = TinyNet()
    visualise(model, channel("conv1", 0) + diversity("conv2"), FourierImage(2, 3, 16), steps=3,
              transforms=standard_transforms(16))
    assert hook_count(model) == 0

    def fail(step: int, value: float, images: torch.Tensor) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        visualise(model, unit("conv2", 1, where="keys"), PixelImage(1, 3, 16), steps=3, callback=fail)
    assert hook_count(model) == 0
    with pytest.raises(RequestError):
        visualise(model, channel("conv2", 99), PixelImage(1, 3, 16), steps=3)
    assert hook_count(model) == 0


def test_callback_stops_early() -> None:
    result = visualise(TinyNet(), channel("conv2", 0), PixelImage(1, 3, 16), steps=10, callback=lambda s, v, x: s < 3)
    assert result.steps == 4 and len(result.history) == 4


@pytest.mark.parametrize("kind", list(params()))
def test_one_channel_non_square(kind: str) -> None:
    model = TinyNet(channels=1)
    param = params(channels=1, size=(12, 20), n=1)[kind]
    result = visualise(model, unit("conv2", 2) + channel("conv1", 0), param, steps=3,
                       transforms=standard_transforms((12, 20)))
    assert result.images.shape == (1, 1, 12, 20)
    assert hook_count(model) == 0


@pytest.mark.parametrize("kind", list(params()))
@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_images_in_range(kind: str, value_range: tuple[float, float]) -> None:
    param = params()[kind]
    param.value_range = value_range
    with torch.no_grad():
        for p in param.parameters():
            p.mul_(0).add_(torch.randn_like(p) * 50)  # far outside any useful range
    images = param()
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= value_range[0] and images.max() <= value_range[1]
    result = visualise(TinyNet(), channel("conv2", 0), param, steps=3, lr=1.0)
    assert result.images.min() >= value_range[0] and result.images.max() <= value_range[1]


def test_aligned_frames_share_their_shared_parameters() -> None:
    param = AlignedImage(5, 3, 16, factors=(2, 8))
    assert all(p.shape[0] in (1, 2) for p in param.shared)
    for frame in range(5):
        grads = torch.autograd.grad(param()[frame].sum(), list(param.shared))
        assert all(g.abs().sum() > 0 for g in grads)
    own = torch.autograd.grad(param()[0].sum(), param.own.spectrum)[0]
    assert own[0].abs().sum() > 0 and own[1:].abs().sum() == 0
    # A change to a batch-1 shared tensor moves every frame's raw image by the same amount.
    before = param.raw().detach()
    with torch.no_grad():
        param.shared[0].add_(1.0)
    delta = param.raw().detach() - before
    assert torch.allclose(delta, delta[:1].expand_as(delta), atol=1e-5) and delta.abs().sum() > 0
    result = visualise(TinyNet(), interpolate(channel("conv2", 0), channel("conv2", 1)), param, steps=3)
    assert result.images.shape == (5, 3, 16, 16)


def test_cppn_renders_at_any_size() -> None:
    param = CPPNImage(1, 3, 16, hidden=8, layers=3)
    with torch.no_grad():
        for p in param.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    big = param.render((32, 48))
    assert big.shape == (1, 3, 32, 48) and param().shape == (1, 3, 16, 16)


def test_objectives_compose() -> None:
    acts = {("a", "output"): torch.randn(3, 4, 5, 5), ("b", "keys"): torch.randn(3, 6)}
    a, b = channel("a", 1), channel("b", [0, 1, 2], where="keys")
    combined = a + 2 * b - a * 0.5
    expected = a(acts) + 2 * b(acts) - 0.5 * a(acts)
    assert torch.allclose(combined(acts), expected)
    assert set(combined.taps) == {("a", "output"), ("b", "keys")}
    d = torch.randn(4)
    assert torch.allclose(direction("a", d)(acts), torch.einsum("nchw,c->n", acts[("a", "output")], d) / 25, atol=1e-5)
    mixed = interpolate(a, b)(acts)
    assert torch.allclose(mixed[[0, 2]], torch.stack([a(acts)[0], b(acts)[2]]))
    assert isinstance(a + 1.0, Objective)


def test_context_direction_is_the_match_score() -> None:
    model = TinyNet()
    memory = LayerMemory(model, "conv2")
    memory.set_moment(torch.eye(memory.key_channels, dtype=torch.float64))
    d = torch.randn(2, memory.key_channels)
    x = torch.rand(2, 3, 16, 16)
    from dissect.featurevis import _activations, _resolve

    obj = context_direction(memory, d)
    score = obj(_activations(model, nn.Module.__call__, x, _resolve(model, obj)))
    assert torch.allclose(score, memory.match(d, x).flatten(1).mean(1), atol=1e-5)
    result = visualise(model, obj, FourierImage(1, 3, 16), steps=20)
    assert result.values[0] > score.min()


@pytest.mark.slow  # scikit-learn's k-means
def test_key_cluster_objective() -> None:
    model = TinyNet()
    memory = LayerMemory(model, "conv2")
    memory.set_moment(torch.eye(memory.key_channels, dtype=torch.float64) * 2)

    class Images:
        description = "uniform"

        def __call__(self, seeds):
            return torch.stack([torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])

    clusters = memory.cluster_keys(Images(), list(range(8)), k=3)
    result = visualise(model, key_cluster(clusters, 2), FourierImage(1, 3, 16), steps=10)
    assert result.values.isfinite().all()
    with pytest.raises(RequestError, match="out of range"):
        key_cluster(clusters, 3)


def test_generator_latent() -> None:
    G = TinyGenerator()
    z = torch.randn(2, 4)
    for space in ("z", "w"):
        param = LatentParam(G, z, space=space)
        before = visualise(G, channel("conv", 0), LatentParam(G, z, space=space), steps=0).values
        result = visualise(G, channel("conv", 0), param, steps=20, lr=0.1)
        assert (result.values > before).all()
        assert result.images.shape == (2, 3, 8, 8) and result.inputs.shape == (2, 4 if space == "z" else 5)
    assert hook_count(G) == 0
    with pytest.raises(RequestError, match="latent"):
        visualise(G, channel("conv", 0), LatentParam(G, z), transforms=standard_transforms(8))
    with pytest.raises(ModelError, match="space='z'"):
        LatentParam(TinyNet(), z, space="w")


def test_style_transfer() -> None:
    model = TinyNet()
    content, style = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16).round() * 2 - 1
    short = style_transfer(model, content, style, ["conv2"], ["conv1", "conv2"], steps=1)
    long = style_transfer(model, content, style, ["conv2"], ["conv1", "conv2"], steps=40)
    assert long.values[0] > short.values[0]
    assert hook_count(model) == 0


def test_colour_correlation() -> None:
    assert torch.allclose(colour_correlation(torch.rand(4, 1, 8, 8)), torch.ones(1, 1))
    grey = torch.rand(4, 1, 8, 8).expand(-1, 3, -1, -1) + 0.01 * torch.rand(4, 3, 8, 8)
    root = colour_correlation(grey)
    assert root.norm(dim=0).max() == pytest.approx(1.0)
    assert (root @ root.T).allclose(torch.full((3, 3), 1 / 3), atol=0.02)  # nearly all variance along grey
    world = world_colour_correlation(n=8)
    assert world.shape == (3, 3) and world.isfinite().all()


def untouched(param: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in param.parameters()]


@pytest.mark.parametrize(
    ("objective", "error", "match"),
    [
        (channel("unused", 0), LayerError, "does not reach"),
        (channel("conv9", 0), LayerError, "no layer named"),
        (channel("conv2", 6), RequestError, "out of range"),
        (channel("conv2", [0, 1, 2]), RequestError, "one per image"),
        (unit("conv2", 0, y=8), RequestError, "outside"),
        (direction("conv2", torch.randn(5)), RequestError, "channels"),
    ],
)
def test_bad_objectives_fail_before_any_step(objective: Objective, error: type, match: str) -> None:
    model = TinyNet()
    param = FourierImage(2, 3, 16)
    saved = untouched(param)
    calls = []
    with pytest.raises(error, match=match):
        visualise(model, objective, param, steps=5, callback=lambda *a: calls.append(a))
    assert not calls and all(torch.equal(a, b) for a, b in zip(saved, untouched(param)))
    assert hook_count(model) == 0


def test_model_that_does_not_take_images() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ModelError, match="LatentParam"):
        visualise(mlp, channel("2", 0), PixelImage(1, 3, 16), steps=5)
    with pytest.raises(ModelError, match="LatentParam"):
        visualise(TinyGenerator(), channel("conv", 0), PixelImage(1, 3, 16), steps=5)
    with pytest.raises(ModelError, match="images of shape"):
        visualise(TinyNet(channels=1), channel("conv1", 0), PixelImage(1, 3, 16), steps=5)
    assert hook_count(mlp) == 0


@pytest.mark.parametrize(("dtype", "param_dtype"), [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_dtype_follows_the_model(dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    model = TinyNet().to(dtype)
    result = visualise(model, channel("conv2", 0), FourierImage(1, 3, 16), steps=2)
    assert result.images.dtype == param_dtype and result.values.isfinite().all()


class ImageSampler:
    """Seeded 16-pixel images in [-1, 1]: the inputs of a user's image classifier."""

    description = "uniform images 16x16"

    def __call__(self, seeds) -> torch.Tensor:
        return torch.stack([torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds])


def classifier() -> tuple[nn.Module, ImageSampler]:
    """Entry point ``test_featurevis:classifier``: a model that takes images, as a user's classifier does."""
    torch.manual_seed(0)
    return TinyNet().eval(), ImageSampler()


def _visualise_app() -> None:
    """A dashboard with only the sidebar and the Visualise page (AppTest runs this function's body as the app)."""
    from dashboard import sidebar, visualise_page

    ws, seeds, settings = sidebar.render()
    if ws is not None:
        visualise_page.render(ws, seeds, settings)


@pytest.mark.slow
def test_dashboard_page(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "tests" / "e2e"))
    monkeypatch.syspath_prepend(str(root))
    from streamlit.testing.v1 import AppTest

    from dashboard import workspace

    monkeypatch.setattr(workspace, "STATS_DIR", tmp_path)
    at = AppTest.from_function(_visualise_app, default_timeout=300).run()
    at.radio(key="model_source").set_value("Your model (entry point)").run()
    at.text_input(key="entry_point").set_value("tiny_model:generator").run()
    at.slider(key="featurevis_steps").set_value(8).run()
    at.button(key="featurevis_run").click().run()
    assert not at.exception, at.exception
    assert any("unit 0 of synthesis.b16.conv1 (8 steps)" in c.value for c in at.caption)
    at.segmented_control(key="featurevis_what").set_value("Context direction").run()
    assert any("context is empty" in i.value for i in at.info)
    at.radio(key="featurevis_model").set_value("Segmenter").run()
    at.button(key="featurevis_run").click().run()
    assert not at.exception, at.exception
    assert any("of segmenter" in c.value and "(8 steps)" in c.value for c in at.caption)
    at.text_input(key="entry_point").set_value("test_featurevis:classifier").run()
    assert at.radio(key="featurevis_model").options[0] == "test_featurevis:classifier: optimise an image"
    at.radio(key="featurevis_model").set_value(at.radio(key="featurevis_model").options[0]).run()
    at.segmented_control(key="featurevis_what").set_value("Unit").run()
    at.button(key="featurevis_run").click().run()
    assert not at.exception, at.exception
    assert any("unit 0 of conv" in c.value and "(8 steps)" in c.value for c in at.caption)
