import pytest
import torch

from dissect.hooks import Trace, key_module_name, layers
from dissect.models.loaders import load_state_dict
from dissect.models.stylegan import Discriminator, Generator

SMALL = {4: 32, 8: 32, 16: 16, 32: 8, 64: 8}


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return Generator(z_dim=32, w_dim=32, channels=SMALL).eval()


def test_shapes_and_layer_names(G):
    z = torch.randn(3, 32)
    with torch.no_grad():
        img = G(z)
    assert img.shape == (3, 3, 64, 64) and torch.isfinite(img).all()
    assert G.num_ws == 2 + 3 * 4
    infos = {i.name: i for i in layers(G, z)}
    assert infos["synthesis.b16.conv1"].output_size == (16, 16)
    assert infos["synthesis.b16.conv0"].in_channels == 32 and infos["synthesis.b16.conv0"].out_channels == 16
    assert "synthesis.b16.conv1.conv" not in infos  # listed through its modulated parent
    assert key_module_name(G, "synthesis.b16.conv0") == "synthesis.b16.conv0.conv"


def test_const_noise_is_deterministic_random_is_not(G):
    z = torch.randn(2, 32)
    with torch.no_grad():
        for m in G.modules():
            if getattr(m, "noise_strength", None) is not None:
                m.noise_strength.fill_(0.5)
        a, b = G(z), G(z)
        c, d = G(z, noise_mode="random"), G(z, noise_mode="none")
        for m in G.modules():
            if getattr(m, "noise_strength", None) is not None:
                m.noise_strength.fill_(0.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    with pytest.raises(ValueError, match="noise_mode"):
        G(z, noise_mode="fixed")


def test_keys_are_upsampled_modulated_input(G):
    z = torch.randn(2, 32)
    with torch.no_grad(), Trace(G, "synthesis.b16.conv0.conv", retain_input=True, stop=True) as t:
        G(z)
    assert t.input.shape == (2, 32, 16, 16)


def test_style_mixing_and_truncation(G):
    z1, z2 = torch.randn(2, 32), torch.randn(2, 32)
    ws = G.mix(z1, z2, cutoff=5)
    w1, w2 = G.mapping(z1), G.mapping(z2)
    torch.testing.assert_close(ws[:, :5], w1[:, None].expand(-1, 5, -1))
    torch.testing.assert_close(ws[:, 5:], w2[:, None].expand(-1, G.num_ws - 5, -1))
    with torch.no_grad():
        assert G.synthesis(ws).shape == (2, 3, 64, 64)
        G.mapping.w_avg.copy_(torch.randn(32))
        w_trunc = G.mapping(z1, truncation_psi=0.0)
    torch.testing.assert_close(w_trunc, G.mapping.w_avg.expand(2, -1))
    with pytest.raises(ValueError, match="cutoff"):
        G.mix(z1, z2, cutoff=99)
    with pytest.raises(ValueError, match=r"\(N, 32\)"):
        G(torch.randn(2, 31))


def test_demodulation_makes_layer_invariant_to_weight_scale():
    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, channels=SMALL)
    layer = G.synthesis.b8.conv1
    x, w = torch.randn(4, 32, 8, 8), torch.randn(4, 16)
    with torch.no_grad():
        before = layer(x, w)
        layer.conv.weight.mul_(100.0)
        after = layer(x, w)
        rgb_before = G.synthesis.b8.torgb(x, w)
        G.synthesis.b8.torgb.conv.weight.mul_(2.0)
        rgb_after = G.synthesis.b8.torgb(x, w)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rgb_after, rgb_before * 2 - G.synthesis.b8.torgb.bias[None, :, None, None])


def test_held_demodulation_keeps_the_output_and_ignores_later_weight_changes_in_eval_only():
    torch.manual_seed(0)
    layer = Generator(z_dim=16, w_dim=16, channels=SMALL).synthesis.b8.conv1.eval()
    x, w = torch.randn(4, 32, 8, 8), torch.randn(4, 16)
    with torch.no_grad():
        before = layer(x, w)
        layer.memory_hold()
        reference = layer.demod_reference.clone()
        assert torch.equal(layer(x, w), before)  # holding alone changes nothing, bitwise
        layer.conv.weight.mul_(2.0)
        layer.memory_hold()  # a second hold keeps the first reference
        assert torch.equal(layer.demod_reference, reference)
        held = layer(x, w)
        live = layer.train()(x, w)
    # Held: doubling W doubles the linear part; live demodulation would cancel it again.
    torch.testing.assert_close(live, before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(held, before, atol=1e-2)
    assert Generator(z_dim=16, w_dim=16, channels=SMALL).synthesis.b8.torgb.demod_reference is None


def test_a_held_generator_round_trips_through_its_state_dict():
    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, channels=SMALL).eval()
    layer = G.synthesis.b8.conv1
    z = torch.randn(2, 16)
    with torch.no_grad():
        layer.memory_hold()
        layer.conv.weight.add_(torch.randn_like(layer.conv.weight))
        edited = G(z)
    fresh = Generator(z_dim=16, w_dim=16, channels=SMALL).eval()
    load_state_dict(fresh, G.state_dict())  # the reference travels with the weights
    assert fresh.synthesis.b8.conv1.demod_reference is not None
    with torch.no_grad():
        assert torch.equal(fresh(z), edited)
    plain = {k: v for k, v in G.state_dict().items() if not k.endswith("demod_reference")}
    G.load_state_dict(plain)  # weights without a reference release the hold
    assert layer.demod_reference is None


def test_unsupported_resolution_lists_supported():
    with pytest.raises(ValueError, match="32, 64 or 128"):
        Generator(resolution=48)


def test_discriminator_shapes():
    D = Discriminator(64, {64: 8, 32: 8, 16: 16, 8: 16, 4: 16})
    assert D(torch.randn(6, 3, 64, 64)).shape == (6,)


def test_mapping_skip_starts_as_the_same_function_and_carries_z_linearly(tmp_path):
    from dissect.models.loaders import load
    from dissect.models.train import export_generator

    torch.manual_seed(0)
    plain = Generator(z_dim=16, w_dim=16, channels=SMALL).eval()
    skip = Generator(z_dim=16, w_dim=16, channels=SMALL, mapping_skip=True).eval()
    assert "mapping_skip" not in plain.config and skip.config["mapping_skip"] is True
    load_state_dict(skip, {**plain.state_dict(), "mapping.skip.weight": torch.zeros(16, 16)})
    z = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(skip(z), plain(z))
        skip.mapping.skip.weight.copy_(torch.eye(16))
        normalised = z * torch.rsqrt(z.square().mean(1, keepdim=True))
        torch.testing.assert_close(skip.mapping(z) - plain.mapping(z), normalised)
    export_generator(skip, tmp_path / "g.safetensors")
    loaded, _ = load(str(tmp_path / "g.safetensors"))
    assert loaded.config == skip.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.mapping(z), skip.mapping(z).half().float(), atol=1e-2, rtol=1e-2)


def test_a_conditional_discriminator_starts_as_the_plain_one_and_then_reads_its_condition():
    channels = {64: 8, 32: 8, 16: 16, 8: 16, 4: 16}
    torch.manual_seed(0)
    plain = Discriminator(64, channels).eval()
    cond = Discriminator(64, channels, cond_dim=5, cond_hidden=7).eval()
    load_state_dict(cond, {**plain.state_dict(), **{k: v for k, v in cond.state_dict().items() if "cond_" in k}})
    x, c = torch.randn(4, 3, 64, 64), torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(cond(x, c), plain(x))
        cond.cond_mlp[2].weight.normal_()
        assert not torch.allclose(cond(x, c), cond(x, c.roll(1, 0)))
        cond.cond_mlp[2].weight.zero_()
        cond.cond_embed.weight.normal_()
        assert not torch.allclose(cond(x, c), cond(x, c.roll(1, 0)))
    with pytest.raises(ValueError, match=r"takes a condition \(N, 5\), got none"):
        cond(x)
    with pytest.raises(ValueError, match=r"takes no condition, got \(4, 5\)"):
        plain(x, c)
