"""Shipped key statistics (dissect.shipped) and the fingerprint they are matched by."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dissect import shipped
from dissect.hooks import key_module_name
from dissect.memory import LayerMemory
from dissect.models.loaders import WEIGHTS_DIR, LatentSampler
from dissect.models.stylegan import Generator
from dissect.stats import fingerprint

LAYER, LATER = "synthesis.b16.conv1", "synthesis.b32.conv0"


def small_generator() -> tuple[Generator, LatentSampler]:
    torch.manual_seed(0)
    G = Generator(z_dim=16, w_dim=16, resolution=32, channels={4: 16, 8: 16, 16: 8, 32: 8}).eval()
    return G.requires_grad_(False), LatentSampler(16, "small")


def keys_fingerprint(G: Generator, layer: str, z: torch.Tensor) -> str:
    """What ``stats.collect`` keys a layer's C on."""
    return fingerprint(G, key_module_name(G, layer), z)


def test_a_hold_keeps_the_fingerprints_and_an_edit_changes_only_later_layers() -> None:
    G, sampler = small_generator()
    z = sampler([0])
    own, later = keys_fingerprint(G, LAYER, z), keys_fingerprint(G, LATER, z)
    memory = LayerMemory(G, LAYER)
    memory.hold()
    assert G.get_submodule(LAYER).demod_reference is not None
    assert keys_fingerprint(G, LAYER, z) == own  # the layer's own keys never depend on its rest
    assert keys_fingerprint(G, LATER, z) == later  # held at the current weight: the same function
    base = memory.weight.clone()
    memory.weight.add_(0.1)
    assert keys_fingerprint(G, LAYER, z) == own  # an edit keeps the edited layer's C…
    assert keys_fingerprint(G, LATER, z) != later  # …and changes what later layers receive
    memory.weight.copy_(base)  # undone: the hold alone is left
    assert keys_fingerprint(G, LATER, z) == later
    G.get_submodule("synthesis.b8.conv1").bias.add_(0.1)  # an earlier layer's rest does change the keys
    assert keys_fingerprint(G, LAYER, z) != own


def test_a_shipped_moment_is_used_only_for_the_same_weights_sampler_and_n(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    G, sampler = small_generator()
    c = torch.eye(8) * 3
    shipped.save(tmp_path, G, LAYER, sampler, 64, c)
    got = shipped.moment(G, LAYER, sampler, 64, tmp_path)
    assert got is not None and got.dtype == torch.float64 and torch.equal(got, c.double())
    assert shipped.moment(G, LAYER, sampler, 65, tmp_path) is None
    assert shipped.moment(G, LAYER, LatentSampler(16, "other"), 64, tmp_path) is None
    assert shipped.moment(G, LATER, sampler, 64, tmp_path) is None  # none shipped for that layer

    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    memory = LayerMemory(G, LAYER)
    assert torch.equal(memory.fit_moment(sampler, 64, progress=False), c.double())  # no collection
    G.get_submodule("synthesis.b8.conv1").conv.weight.mul_(1.5)  # another model: collected, not the shipped C
    assert not torch.equal(LayerMemory(G, LAYER).fit_moment(sampler, 64, progress=False), c.double())


@pytest.mark.skipif(not (WEIGHTS_DIR / "spires-generator.safetensors").exists(), reason="no embedded generator")
def test_the_embedded_generator_ships_c_for_every_layer_a_user_can_choose() -> None:
    from dissect.models import load
    from dissect.models.ship_stats import shipped_layers

    G, sampler = load("spires")
    names = shipped_layers(G, sampler([0]))
    assert "synthesis.b16.conv1" in names and "synthesis.b64.torgb" in names
    sizes = [p.stat().st_size for p in shipped.SHIPPED_DIR.glob("*.safetensors")]
    assert len(sizes) == len(names) and sum(sizes) < 8 * 2**20
    for name in names:
        c = shipped.moment(G, name, sampler, 2000)
        assert c is not None, f"{name}: regenerate with python -m dissect.models.ship_stats"
        assert c.shape[0] <= 256 and torch.allclose(c, c.T) and torch.trace(c) > 0
