import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dissect.models.loaders import LatentSampler, available_models, load, load_state_dict, load_weights


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "userpkg.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from dissect.models.loaders import LatentSampler

        def good():
            return nn.Sequential(nn.Linear(8, 4)).train(), LatentSampler(8, "user")

        def not_a_pair():
            return nn.Linear(2, 2)

        def bad_sampler():
            return nn.Linear(2, 2), lambda seeds: torch.zeros(len(seeds), 2)

        constant = 3
    """))
    (tmp_path / "brokenpkg.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("userpkg", "brokenpkg"):
        sys.modules.pop(name, None)


def test_sampler_is_seeded_per_row():
    s = LatentSampler(16, "x")
    a, b = s([3, 7]), s([7])
    assert a.shape == (2, 16) and torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert "16" in s.description and s(torch.tensor([3])).equal(a[:1])


def test_entry_point_loads_in_eval_mode(plugin):
    model, sampler = load("userpkg:good")
    assert not model.training and sampler([0]).shape == (1, 8)


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ("userpkg:not_a_pair", TypeError, "must return (model, sampler)"),
        ("userpkg:bad_sampler", TypeError, "description"),
        ("userpkg:missing", AttributeError, "has no attribute 'missing'"),
        ("userpkg:constant", TypeError, "not a function"),
        ("brokenpkg:fn", ImportError, "does_not_exist_anywhere"),
        ("userpkg", KeyError, "Available: spires"),
        (":fn", ValueError, "package.module:function"),
    ],
)
def test_entry_point_errors_say_what_is_wrong(plugin, spec, error, words):
    with pytest.raises(error) as err:
        load(spec)
    assert words in str(err.value)


def test_unknown_model_lists_available():
    assert "spires" in available_models()
    with pytest.raises(KeyError, match="spires"):
        load("churches")


def test_checkpoint_keys_named(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["extra.weight"] = torch.zeros(1)
    del state["1.bias"]
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    loaded, _ = load_weights(path)
    with pytest.raises(KeyError, match=r"missing keys \['1.bias'\].*unexpected keys \['extra.weight'\]"):
        load_state_dict(model, loaded)


def test_torch_checkpoint_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_weights(path)
    good = tmp_path / "good.pt"
    model = nn.Linear(2, 2)
    torch.save({"state_dict": model.state_dict()}, good)
    state, meta = load_weights(good)
    load_state_dict(nn.Linear(2, 2), state)
    assert meta == {}
    with pytest.raises(FileNotFoundError, match="No weights"):
        load_weights(tmp_path / "nothing.safetensors")


def test_a_generator_file_without_its_configuration_is_refused(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no generator configuration"):
        load(str(path))
