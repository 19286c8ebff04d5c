"""collect(): keys from a stopped forward, the memory view's key module, Linear tokens, and the on-disk cache."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from dissect.errors import LayerError
from dissect.hooks import Trace
from dissect.models.stylegan import Generator
from dissect.stats import Covariance, Mean, SecondMoment, TopK, collect, fingerprint, load_stats, rows

pytestmark = pytest.mark.usefixtures("one_thread")



class Images:
    """Seeded 3x8x8 images; records each call's seeds. ``nan_seed`` renders an all-NaN image."""

    description = "test:normal(0,1)^(3,8,8):torch.Generator.manual_seed(seed)"

    def __init__(self, nan_seed: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.nan_seed = nan_seed

    def __call__(self, seeds: list[int]) -> torch.Tensor:
        self.calls.append(list(seeds))
        images = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(
            [im * float("nan") if s == self.nan_seed else im for s, im in zip(seeds, images, strict=True)]
        )

    def ran_batches(self) -> bool:
        """Whether anything beyond the one-sample probe ran since the last look."""
        ran = any(call != [0] for call in self.calls)
        self.calls.clear()
        return ran


class Rows(nn.Identity):
    """Records how many rows each of its calls saw: only the one-row probe that checks the key module runs
    once per forward should reach a module after the keys."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(len(x))
        return x


def conv_net(after: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module(
        "features", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    )
    net.add_module("head", after or nn.Conv2d(16, 3, 1))
    return net


def full_pass_keys(model: nn.Module, layer: str, sampler, n: int, batch: int) -> list[torch.Tensor]:
    keys = []
    for start in range(0, n, batch):
        with torch.no_grad(), Trace(model, layer, retain_input=True) as trace:
            model(sampler(list(range(start, min(n, start + batch)))))
        keys.append(rows(trace.input))
    return keys


def test_stopped_collect_equals_keys_of_a_full_pass():
    model = conv_net()
    mean, moment, topk = collect(
        model, "features.2", Images(), 37, [Mean(), SecondMoment(), TopK(4)], batch_size=10, progress=False
    )
    keys = full_pass_keys(model, "features.2", Images(), 37, 10)
    ref = SecondMoment()
    for batch in keys:
        ref.add(batch)
    assert torch.equal(moment.moment(), ref.moment()) and moment.count == 37 * 64
    every = torch.cat(keys).double()
    assert torch.allclose(mean.mean(), every.mean(0), rtol=1e-7, atol=1e-9)
    ref = every.T @ every / len(every)
    assert (moment.moment() - ref).norm() <= 1e-6 * ref.norm()
    values, ids = topk.topk()
    assert torch.equal(every.gather(0, ids), values)  # row id = sample * H*W + y * W + x
    # The forward ends at the layer: the head sees the one-row probe only.
    head = Rows()
    collect(conv_net(after=head), "features.2", Images(), 5, Mean(), batch_size=5, progress=False)
    assert head.seen == [1]


def test_output_side_and_eval_mode_restored():
    model = conv_net().train()
    out = collect(model, "features.2", Images(), 4, Mean(), side="output", progress=False)
    with torch.no_grad(), Trace(model, "features.2") as trace:
        model.eval()(Images()(list(range(4))))
    assert out.channels == 16 and torch.allclose(out.mean(), rows(trace.output).double().mean(0), atol=1e-6)
    model.train()
    model.features[1].eval()  # mixed modes come back as they were
    collect(model, "features.2", Images(), 2, Mean(), progress=False)
    assert model.training and model.features[0].training and not model.features[1].training
    assert all(p.grad is None for p in model.parameters())


def test_runs_in_eval_mode():
    class Probe(nn.Identity):
        seen: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), nn.Conv2d(3, 4, 1)).train()
    collect(model, "1", Images(), 3, Mean(), progress=False)
    assert Probe.seen == [False, False] and model[0].training  # the one-row probe, then the batch


class Scaled(nn.Module):
    """A composite layer in the memory view: its keys are the input of ``conv`` (twice the layer's input)."""

    memory_key_module = "conv"

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(2 * x))


def test_keys_of_a_memory_key_module_are_its_childs_input():
    model = nn.Sequential(Scaled(), Rows())
    mean = collect(model, "0", Images(), 6, Mean(), progress=False)
    assert model[1].seen == [1]
    assert torch.allclose(mean.mean(), 2 * rows(Images()(list(range(6)))).double().mean(0), atol=1e-6)


def test_generator_layer_keys():
    torch.manual_seed(0)
    G = Generator(z_dim=8, w_dim=8, resolution=32, channels={4: 8, 8: 8, 16: 8, 32: 8}, mapping_layers=1).eval()

    class Latents:
        description = "test:normal(0,1)^8"

        def __call__(self, seeds):
            return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds])

    moment = collect(G, "synthesis.b8.conv1", Latents(), 6, SecondMoment(), batch_size=4, progress=False)
    keys = full_pass_keys(G, "synthesis.b8.conv1.conv", Latents(), 6, 4)
    every = torch.cat(keys).double()
    ref = every.T @ every / len(every)
    assert moment.count == 6 * 64 and (moment.moment() - ref).norm() <= 1e-6 * ref.norm()


def test_linear_layers_take_token_rows():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))

    class Tokens:
        description = "test:tokens(5,4)"

        def __call__(self, seeds):
            return torch.stack([torch.randn(5, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])

    cov = collect(model, "2", Tokens(), 9, Covariance(), batch_size=4, progress=False)
    with torch.no_grad():
        hidden = model[1](model[0](Tokens()(list(range(9))))).reshape(-1, 6).double()
    assert cov.count == 45 and torch.allclose(cov.covariance(), torch.cov(hidden.T), rtol=1e-6, atol=1e-9)


def test_nan_keys_are_counted_not_folded_in():
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        moment = collect(conv_net(), "features.2", Images(nan_seed=3), 8, SecondMoment(), batch_size=4, progress=False)
    assert (moment.count, moment.skipped) == (7 * 64, 64) and torch.isfinite(moment.moment()).all()


def test_progress_bar_counts_samples(capsys):
    collect(conv_net(), "features.2", Images(), 6, Mean(), batch_size=3, progress=True)
    assert "6/6" in capsys.readouterr().err


# -- cache -------------------------------------------------------------------------------------------------------


def cached(model, sampler, cache_dir, n=12, stats=None, layer="features.2"):
    return collect(
        model, layer, sampler, n, stats or [SecondMoment(), TopK(3)], batch_size=5, cache_dir=cache_dir, progress=False
    )


def test_cache_is_reused_until_a_weight_before_the_layer_changes(tmp_path):
    model, sampler = conv_net(), Images()
    first = cached(model, sampler, tmp_path)
    assert sampler.ran_batches() and len(list(tmp_path.iterdir())) == 1
    again = cached(model, sampler, tmp_path)
    assert not sampler.ran_batches()
    assert torch.equal(again[0].moment(), first[0].moment()) and torch.equal(again[1].topk()[1], first[1].topk()[1])
    with torch.no_grad():
        model.head.weight[0, 0] += 1.0  # after the layer
        model.features[2].weight[0, 0, 0, 0] += 1.0  # the layer itself: its keys do not change
    cached(model, sampler, tmp_path)
    assert not sampler.ran_batches()
    with torch.no_grad():
        model.features[0].weight[3, 1, 2, 0] += 1e-3  # one element before the layer
    changed = cached(model, sampler, tmp_path)
    assert sampler.ran_batches() and len(list(tmp_path.iterdir())) == 2
    assert not torch.equal(changed[0].moment(), first[0].moment())
    # n, the statistics asked for and the sampler are part of the key too.
    for n, stats in ((13, None), (12, [SecondMoment(), TopK(4)])):
        cached(model, sampler, tmp_path, n=n, stats=stats)
        assert sampler.ran_batches()
    other = Images()
    other.description = "another distribution"
    cached(model, other, tmp_path)
    assert other.ran_batches()


def test_fingerprint_covers_what_runs_before_the_layer():
    model, x = conv_net(), Images()([0])
    before = fingerprint(model, "features.2", x)
    assert before == fingerprint(model, "features.2", x)
    with torch.no_grad():
        model.features[2].bias[0] += 1
    assert fingerprint(model, "features.2", x) == before
    assert fingerprint(model, "features.2", x, side="output") != fingerprint(conv_net(), "features.2", x, side="output")
    with torch.no_grad():
        model.features[0].bias[0] += 1
    assert fingerprint(model, "features.2", x) != before


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_is_reported_and_recomputed(tmp_path, damage):
    model, sampler = conv_net(), Images()
    first = cached(model, sampler, tmp_path)
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        flipped = bytearray(data)
        flipped[-20] ^= 0x01
        path.write_bytes(bytes(flipped))
    sampler.calls.clear()
    with pytest.warns(RuntimeWarning, match="statistics cache unusable, recomputing"):
        again = cached(model, sampler, tmp_path)
    assert sampler.ran_batches()
    assert torch.equal(again[0].moment(), first[0].moment())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert len(load_stats(path)) == 2  # rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached(model, sampler, tmp_path)
    assert not sampler.ran_batches()


def test_a_failed_run_leaves_nothing_in_the_cache(tmp_path):
    class Failing(Images):
        def __call__(self, seeds):
            if seeds[0] >= 5:
                raise RuntimeError("sampler broke")
            return super().__call__(seeds)

    with pytest.raises(RuntimeError, match="sampler broke"):
        cached(conv_net(), Failing(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="not a writable directory.*cache_dir=None"):
        cached(conv_net(), Images(), blocker / "cache")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        sampler = Images()
        with pytest.raises(OSError, match="not a writable directory"):
            cached(conv_net(), sampler, locked)
        assert sampler.calls == []  # failed before any work
    finally:
        locked.chmod(0o700)


def test_bad_arguments(tmp_path):
    model = conv_net()
    with pytest.raises(KeyError, match="features.2"):
        collect(model, "features.9", Images(), 4, Mean(), progress=False)
    with pytest.raises(ValueError, match="side"):
        collect(model, "features.2", Images(), 4, Mean(), side="keys", progress=False)
    with pytest.raises(ValueError, match="n >= 1"):
        collect(model, "features.2", Images(), 0, Mean(), progress=False)
    used = Mean()
    used.add(torch.randn(2, 8))
    with pytest.raises(ValueError, match="fresh"):
        collect(model, "features.2", Images(), 4, used, progress=False)

    class Anonymous:
        def __call__(self, seeds):
            return Images()(seeds)

    assert collect(model, "features.2", Anonymous(), 2, Mean(), progress=False).count == 128
    with pytest.raises(ValueError, match="sampler.description"):
        collect(model, "features.2", Anonymous(), 2, Mean(), cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_input_statistics_never_run_the_key_module_beyond_the_probe():
    model = conv_net()
    seen: list[int] = []
    model.features[2].register_forward_hook(lambda module, args, out: seen.append(len(out)))
    collect(model, "features.2", Images(), 12, SecondMoment(), batch_size=4, progress=False)
    assert seen == [1]  # only the one-row check that it runs once; the batches stop before it


def test_a_key_module_run_twice_per_forward_is_refused_before_collecting():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    sampler = Images()
    with pytest.raises(LayerError, match="Layer 'conv' runs 2 times in one forward"):
        collect(Shared(), "conv", sampler, 8, SecondMoment(), batch_size=4, progress=False)
    assert sampler.calls == [[0]]  # refused after the one-row probe, before any batch
