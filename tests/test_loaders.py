import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dissect.errors import ModelError
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

        def raises():
            raise RuntimeError("checkpoint /data/g.pt\\nnot found")

        def latent_for_images():
            return nn.Sequential(nn.Conv2d(3, 4, 3)), LatentSampler(8, "user")

        class Rows:
            description = "two rows per seed"

            def __call__(self, seeds):
                return torch.zeros(2 * len(seeds), 8)

        def two_rows():
            return nn.Linear(8, 4), Rows()

        class Named:
            description = "a list of names"

            def __call__(self, seeds):
                return [f"seed {s}" for s in seeds]

        def names():
            return nn.Linear(8, 4), Named()

        class Broken:
            description = "broken"

            def __call__(self, seeds):
                raise ValueError("no seeds today")

        def broken_sampler():
            return nn.Linear(8, 4), Broken()

        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn = nn.BatchNorm1d(8)

            def forward(self, x, scale):
                return self.bn(x) * scale

        class PairSampler:
            description = "(x, scale)"

            def __call__(self, seeds):
                return torch.randn(len(seeds), 8), torch.ones(len(seeds), 1)

        def pair():
            return Pair().train(), PairSampler()
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
        ("userpkg:not_a_pair", ModelError, "must return (model, sampler)"),
        ("userpkg:bad_sampler", ModelError, "description"),
        ("userpkg:missing", ModelError, "has no attribute 'missing'"),
        ("userpkg:constant", ModelError, "not a function"),
        ("brokenpkg:fn", ModelError, "does_not_exist_anywhere"),
        ("userpkg", ModelError, "Available: facts, spires"),
        (":fn", ModelError, "package.module:function"),
        ("userpkg:raises", ModelError, "Entry point 'userpkg:raises' raised RuntimeError: checkpoint /data/g.pt not found"),
        ("userpkg:latent_for_images", ModelError, "The model of entry point 'userpkg:latent_for_images' fails on its "
                                                  "sampler's batch sampler([0]) with RuntimeError"),
        ("userpkg:two_rows", ModelError, "returned 2 rows ((2, 8)) for one seed"),
        ("userpkg:names", ModelError, "returned list for sampler([0])"),
        ("userpkg:broken_sampler", ModelError, "raised ValueError: no seeds today on sampler([0])"),
    ],
)
def test_entry_point_errors_say_what_is_wrong(plugin, spec, error, words):
    with pytest.raises(error) as err:
        load(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_entry_point_check_runs_tuple_inputs_and_leaves_buffers_alone(plugin):
    import userpkg

    built = userpkg.pair()
    before = {k: v.clone() for k, v in built[0].state_dict().items()}
    model, sampler = load("userpkg:pair")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert len(sampler([0, 1])) == 2


def test_unknown_model_lists_available():
    assert "spires" in available_models()
    with pytest.raises(ModelError, match="spires"):
        load("churches")


def test_checkpoint_keys_named(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["extra.weight"] = torch.zeros(1)
    del state["1.bias"]
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    loaded, _ = load_weights(path)
    with pytest.raises(ModelError, match=r"missing keys \['1.bias'\].*unexpected keys \['extra.weight'\]"):
        load_state_dict(model, loaded)


def test_torch_checkpoint_is_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(ModelError, match=r"evil.pt is not a checkpoint of tensors that loads with weights_only=True"):
        load_weights(path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ModelError, match="truncated.pt is not a checkpoint"):
        load_weights(truncated)
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
    with pytest.raises(ModelError, match="no generator configuration"):
        load(str(path))


def test_the_fact_gpt_loads_by_name_like_the_generator():
    from dissect.models.facts import SEQ_LEN, FactsGPT

    assert {"spires", "facts"} <= set(available_models())
    model, sampler = load("facts")
    assert isinstance(model, FactsGPT) and not model.training and sampler.description.startswith("facts:")
    tokens = sampler([0, 1])
    assert tokens.shape == (2, SEQ_LEN)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, SEQ_LEN, model.head.out_features) and torch.isfinite(logits).all()
    same, _ = load("dissect.models.facts:load_facts")  # the entry point gives the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


@pytest.mark.parametrize("config, words", [
    ('{"z_dim": 8, "no_such_argument": 1}', "does not build a Generator"),
    ("{not json", "is not valid JSON"),
    ("[8, 8]", "is a JSON list, not an object"),
])
def test_a_generator_configuration_that_does_not_build_is_a_model_error(tmp_path, config, words):
    path = tmp_path / "g.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"config": config})
    with pytest.raises(ModelError, match=words) as err:
        load(str(path))
    assert str(path) in str(err.value) and "python -m dissect.models.train --export" in str(err.value)


@pytest.mark.parametrize("facts, words", [
    ('{"corpus": {"n_entities": 1}, "model": {"vocab": 10}}', "does not build a FactsCorpus"),
    ('{"corpus": {}, "model": {"vocab": 10, "depth": 3}}', "does not build a FactsGPT"),
    ('{"corpus": {}}', "holds no 'corpus' and 'model'"),
])
def test_a_fact_model_configuration_that_does_not_build_is_a_model_error(tmp_path, facts, words):
    from dissect.models.facts import load_facts

    path = tmp_path / "facts.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"facts": facts})
    with pytest.raises(ModelError, match=words) as err:
        load_facts(path)
    assert str(path) in str(err.value) and "python -m dissect.models.train_facts" in str(err.value)
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ModelError, match="no facts-model configuration"):
        load_facts(path)


@pytest.mark.parametrize("damage", ["header", "truncated", "not safetensors"])
def test_a_corrupt_safetensors_file_is_a_model_error_naming_it(tmp_path, damage):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.arange(64.0)}, str(path), metadata={"config": "{}"})
    data = path.read_bytes()
    if damage == "header":
        data = data[:8] + b"\x00{]" + data[11:]
    elif damage == "truncated":
        data = data[: len(data) - 100]
    else:
        data = b"PK\x03\x04 a zip file, not tensors"
    path.write_bytes(data)
    with pytest.raises(ModelError, match="is not a readable safetensors file") as err:
        load_weights(path)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load(str(path))
