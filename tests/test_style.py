"""Style controls (dissect.style) on a tiny generator, unedited and with a rank-one rewrite applied."""

from __future__ import annotations

import copy

import pytest
import torch

from dissect.errors import LayerError, ModelError, NonFiniteError, RequestError
from dissect.memory import LayerMemory
from dissect.models.loaders import LatentSampler
from dissect.models.stylegan import Generator
from dissect.rewrite import Context, Erase, Rewriter, solve
from dissect.style import (
    GROUPS,
    Shift,
    Style,
    group_ws,
    interpolate,
    layer_groups,
    noise_layers,
    render,
    styles,
    synthesize,
    ws_layers,
)

SMALL = {4: 32, 8: 32, 16: 16, 32: 8, 64: 8}
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def G(one_thread):
    torch.manual_seed(0)
    G = Generator(z_dim=32, w_dim=32, channels=SMALL).eval().requires_grad_(False)
    for name in noise_layers(G):  # a fresh generator has zero noise strength: noise would change nothing
        G.get_submodule(name).noise_strength.fill_(0.5)
    G.mapping.w_avg.normal_()  # trained generators have a mean w away from 0
    return G


@pytest.fixture(scope="module")
def sampler():
    return LatentSampler(32, "tiny")


def test_groups_cover_every_w_once_in_order(G):
    names = ws_layers(G)
    assert len(names) == G.num_ws == 14
    assert names[:3] == ["synthesis.b4.conv1", "synthesis.b4.torgb", "synthesis.b8.conv0"]
    rows = group_ws(G)
    assert rows == {"coarse": [0, 1, 2, 3, 4], "middle": [5, 6, 7, 8, 9, 10], "fine": [11, 12, 13]}
    assert layer_groups(G)["fine"] == ["synthesis.b64.conv0", "synthesis.b64.conv1", "synthesis.b64.torgb"]
    assert "synthesis.b4.torgb" not in noise_layers(G) and len(noise_layers(G)) == 9


def test_groups_at_32_pixels_keep_a_fine_group():
    G32 = Generator(z_dim=8, w_dim=8, resolution=32, channels=SMALL)
    groups = layer_groups(G32)
    assert all(groups[g] for g in GROUPS) and groups["fine"][0].startswith("synthesis.b32")


def test_default_style_is_the_plain_forward(G, sampler):
    with torch.no_grad():
        assert torch.equal(render(G, sampler, SEEDS), G(sampler(SEEDS)))


def test_truncation(G, sampler):
    with torch.no_grad():
        mean = render(G, sampler, SEEDS, Style(truncation=0.0))
        half = render(G, sampler, SEEDS, Style(truncation=0.5))
        assert torch.allclose(mean[0], mean[1], atol=1e-5) and torch.allclose(mean[0], mean[2], atol=1e-5)
        assert torch.allclose(half, G(sampler(SEEDS), truncation_psi=0.5), atol=1e-6)
    with pytest.raises(RequestError, match="ψ"):
        Style(truncation=2.0)


def test_mixing_takes_whole_groups_from_the_second_seed(G, sampler):
    z, z2 = sampler([0]), sampler([7])
    ws = styles(G, z, Style(mix_seed=7, mix=("coarse",)), z2)
    own, other = styles(G, z), styles(G, z2)
    assert torch.equal(ws[:, :5], other[:, :5]) and torch.equal(ws[:, 5:], own[:, 5:])
    with torch.no_grad():
        all_groups = render(G, sampler, [0], Style(mix_seed=7, mix=GROUPS))
        coarse = render(G, sampler, [0], Style(mix_seed=7, mix=("coarse",)))
        assert torch.allclose(all_groups, G(z2), atol=1e-6)
        assert not torch.allclose(coarse, G(z), atol=1e-3) and not torch.allclose(coarse, G(z2), atol=1e-3)
    with pytest.raises(RequestError, match="second seed"):
        Style(mix=("fine",))
    with pytest.raises(RequestError, match="group"):
        Style(mix_seed=1, mix=("top",))


def test_noise_per_layer(G, sampler):
    with torch.no_grad():
        const = render(G, sampler, SEEDS)
        off = render(G, sampler, SEEDS, Style(noise={"fine": "off"}))
        fresh = render(G, sampler, SEEDS, Style(noise={"synthesis.b32.conv1": "resample"}))
        again = render(G, sampler, SEEDS[1:], Style(noise={"synthesis.b32.conv1": "resample"}))
        other = render(G, sampler, SEEDS, Style(noise={"synthesis.b32.conv1": "resample"}, noise_seed=1))
    assert not torch.allclose(off, const, atol=1e-4) and not torch.allclose(fresh, const, atol=1e-4)
    assert torch.equal(fresh[1:], again)  # resampled noise depends on the seed, not on the batch
    assert not torch.allclose(other, fresh, atol=1e-4)
    assert not torch.allclose(fresh[0], fresh[1], atol=1e-4)
    with torch.no_grad():  # every fixed noise map is back
        assert torch.equal(render(G, sampler, SEEDS), const)
    with pytest.raises(LayerError, match="noise layer"):
        render(G, sampler, SEEDS, Style(noise={"synthesis.b4.torgb": "off"}))
    with pytest.raises(RequestError, match="noise mode"):
        Style(noise={"fine": "loud"})


def test_noise_maps_are_restored_after_an_error(G, sampler):
    before = G.synthesis.b64.conv1.noise_const.clone()
    with pytest.raises(LayerError):  # the shift's layer is never reached: raised after the swap
        render(G, sampler, SEEDS, Style(noise={"fine": "off"}), [Shift("mapping.layers.0", torch.zeros(32))])
    assert torch.equal(G.synthesis.b64.conv1.noise_const, before)


def test_interpolation_ends_and_paths(G, sampler):
    za, zb = sampler([0]), sampler([1])
    for space in ("z", "w"):
        ws = interpolate(G, za, zb, 5, space)
        assert ws.shape == (5, G.num_ws, 32)
        assert torch.allclose(ws[0], styles(G, za)[0], atol=1e-5) and torch.allclose(ws[-1], styles(G, zb)[0], atol=1e-5)
    w_path = interpolate(G, za, zb, 3, "w")
    assert torch.allclose(w_path[1], (w_path[0] + w_path[2]) / 2, atol=1e-6)
    assert not torch.allclose(interpolate(G, za, zb, 3, "z")[1], w_path[1], atol=1e-4)
    with pytest.raises(RequestError):
        interpolate(G, za, zb, 1)
    with pytest.raises(RequestError):
        interpolate(G, za, zb, 3, "x")


def test_shifts_in_z_w_and_a_layer(G, sampler):
    z = sampler(SEEDS)
    with torch.no_grad():
        base = render(G, sampler, SEEDS)
        dz = render(G, sampler, SEEDS, shifts=[Shift("z", torch.ones(32))])
        assert torch.allclose(dz, G(z + 1), atol=1e-6)
        dw = render(G, sampler, SEEDS, shifts=[Shift("w", torch.ones(32))])
        assert torch.allclose(dw, G.synthesis(styles(G, z) + 1), atol=1e-6)
        layer = render(G, sampler, SEEDS, shifts=[Shift("synthesis.b16.conv1", torch.ones(16, 16, 16))])
        assert not torch.allclose(layer, base, atol=1e-4)
        fine = styles(G, z, shifts=[Shift("w", torch.ones(32), ("fine",))])
        assert torch.equal(fine[:, :11], styles(G, z)[:, :11]) and torch.allclose(fine[:, 11:], styles(G, z)[:, 11:] + 1)
    with pytest.raises(RequestError, match="style group"):
        Shift("z", torch.ones(32), ("fine",))
    with pytest.raises(LayerError, match="shape"):
        render(G, sampler, SEEDS, shifts=[Shift("synthesis.b16.conv1", torch.ones(16))])
    with pytest.raises(LayerError, match="exactly one call"):
        render(G, sampler, SEEDS, shifts=[Shift("mapping.layers.0", torch.zeros(32))])
    for space in ("z", "w"):  # a vector fitted on another model: said so, not a broadcasting error
        with pytest.raises(RequestError, match=rf"shift in {space} must have shape \(32,\).*got \(16,\)"):
            render(G, sampler, SEEDS, shifts=[Shift(space, torch.ones(16))])
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        Shift("w", torch.full((32,), float("nan")))


def test_not_a_stylegan():
    with pytest.raises(ModelError, match="StyleGAN"):
        ws_layers(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_an_edited_model_works_under_every_control(G, sampler):
    """A rank-one erase at b16.conv1: every control renders the edited model (finite, changed where the unedited
    one was not), and undo gives the unedited images back exactly."""
    G = copy.deepcopy(G)  # the module's generator stays unedited
    memory = LayerMemory(G, "synthesis.b16.conv1")
    memory.fit_moment(sampler, 64, progress=False)
    z = sampler([10, 11])
    masks = torch.zeros(2, 64, 64)
    masks[:, 40:60, 40:60] = 1
    controls = [
        Style(),
        Style(truncation=0.6),
        Style(mix_seed=5, mix=("coarse", "fine")),
        Style(noise={"middle": "off", "synthesis.b64.conv1": "resample"}),
    ]
    shifts = [[], [Shift("w", torch.full((32,), 0.3))], [Shift("synthesis.b16.conv1", torch.full((16, 16, 16), 0.2))]]
    with torch.no_grad():
        before = [render(G, sampler, SEEDS, s, sh) for s in controls for sh in shifts]
        ws_path = interpolate(G, sampler([0]), sampler([1]), 3, "z")
        path_before = synthesize(G, ws_path, [0, 0, 0])
    rewriter = Rewriter(G)
    rewriter.apply(solve(memory, Erase(z, masks, units=8), Context(z, masks, rank=1), refine=False))
    with torch.no_grad():
        after = [render(G, sampler, SEEDS, s, sh) for s in controls for sh in shifts]
        path_after = synthesize(G, interpolate(G, sampler([0]), sampler([1]), 3, "z"), [0, 0, 0])
    for b, a in zip(before + [path_before], after + [path_after]):
        assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-5)
    rewriter.undo()
    with torch.no_grad():
        again = [render(G, sampler, SEEDS, s, sh) for s in controls for sh in shifts]
    for b, a in zip(before, again):
        assert torch.equal(a, b)



# -- the dashboard's Style page, through streamlit's AppTest on the tiny entry-point model ------------------------


def grid_captions(at) -> list[str]:
    from dashboard import browse

    grids = [e.proto for e in at.get("bidi_component") if e.proto.component_name.endswith(browse.COMPONENT)]
    return [c for g in grids for c in browse.grid_captions(g.json)]


def _style_page_app() -> None:
    """The Style page alone, on the tiny model (AppTest runs this function's body as the app script)."""
    from dashboard import style_page, workspace
    from dashboard.requests import Settings

    ws = workspace.current() or workspace.switch("tiny_model:generator")
    style_page.render(ws, list(range(4)), Settings(rank=1, refine=False, iterations=0, units=4))


@pytest.fixture
def page(monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "tests" / "e2e"))  # the tiny model's entry point
    monkeypatch.syspath_prepend(str(root))
    from streamlit.testing.v1 import AppTest

    from dashboard import style_page

    monkeypatch.setattr(style_page, "FIT_SEEDS", range(600_000, 600_040))
    at = AppTest.from_function(_style_page_app, default_timeout=120).run()
    assert not at.exception, at.exception
    return at


@pytest.mark.slow
def test_style_page_controls_combine_with_an_edit(page):
    from dashboard import workspace

    at = page
    ws = at.session_state[workspace.KEY]
    assert grid_captions(at)[:4] == ["seed 0", "seed 1", "seed 2", "seed 3"]
    assert "unedited" in " ".join(c.value for c in at.caption)
    # An edit applied in the session: the page renders the edited model under every control.
    memory = LayerMemory(ws.model, "synthesis.b16.conv1")
    memory.fit_moment(ws.sampler, 32, progress=False)
    z, masks = ws.inputs([0, 1]), torch.zeros(2, 64, 64)
    masks[:, 40:60, 40:60] = 1
    ws.rewriter.apply(solve(memory, Erase(z, masks, units=4), Context(z, masks, rank=1), refine=False))
    ws.weights_changed()
    at.slider(key="style_psi").set_value(0.5).run()
    at.multiselect(key="style_mix").set_value(["coarse", "fine"]).run()
    at.selectbox(key="style_noise_middle").set_value("resample").run()
    assert not at.exception and not at.warning, (at.exception, [w.value for w in at.warning])
    assert "1 applied edit" in " ".join(c.value for c in at.caption)


@pytest.mark.slow
def test_style_page_says_what_an_attribute_lacks(page):
    at = page
    at.slider(key="alpha_watermark").set_value(1.0).run()  # the random tiny model draws no watermarks
    assert "No vector for watermark" in " ".join(w.value for w in at.warning)
    at.slider(key="alpha_watermark").set_value(0.0).run()
    at.text_input(key="attr_pos").set_value("3, 8, 20").run()
    at.text_input(key="attr_neg").set_value("0-2").run()
    at.slider(key="alpha_user").set_value(1.0).run()
    warnings = " ".join(w.value for w in at.warning)
    assert "3 positive and 3 negative" in warnings and "at least 10 of each" in warnings
    at.text_input(key="attr_pos").set_value("100-111").run()
    at.text_input(key="attr_neg").set_value("200-211").run()
    assert not at.warning and not at.exception
    at.selectbox(key="attr_space").set_value("synthesis.b16.conv1").run()
    assert not at.warning and not at.exception


@pytest.mark.slow
def test_style_tab_in_the_app(monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "tests" / "e2e"))
    at = AppTest.from_file(str(root / "dashboard" / "streamlit_app.py"), default_timeout=300).run()
    at.radio(key="model_source").set_value("Your model (entry point)").run()
    at.text_input(key="entry_point").set_value("tiny_model:generator").run()
    at.session_state["page"] = "Style"
    at.run()
    assert not at.exception, at.exception
    assert grid_captions(at)[:2] == ["seed 0", "seed 1"] and at.slider(key="style_psi").value == 1.0
