"""Streaming statistics against numpy float64: precision, merging, files, order statistics, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dissect.errors import DissectError
from dissect.stats import (
    DEFAULT_CACHE_DIR,
    Covariance,
    Mean,
    Quantile,
    SecondMoment,
    Stat,
    StatsFileError,
    TopK,
    _shifted_sums,  # the GPU path's batched products, exercised on the CPU
    load_stats,
    rows,
    save_stats,
)

pytestmark = pytest.mark.usefixtures("one_thread")



def rel(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def feed(stat: Stat, x: torch.Tensor, sizes=(65536, 4095, 70001)) -> Stat:
    """Add ``x`` in batches of cycling sizes (none a multiple of the 4096-row chunk)."""
    i, k = 0, 0
    while i < len(x):
        stat.add(x[i : i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return stat


@pytest.fixture(scope="module")
def big() -> tuple[torch.Tensor, np.ndarray]:
    """10^6 float32 rows of 16 channels, mean 1e3 and std 1 (correlated), and their float64 copy."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=gen) / 4 + torch.eye(16)
    x = (torch.randn(10**6, 16, generator=gen) @ mix + 1e3).float()
    return x, x.double().numpy()


def test_moments_of_large_magnitude_float32_rows_match_numpy_float64(big):
    x, xn = big
    n = len(xn)
    mean, moment, cov = feed(Mean(), x), feed(SecondMoment(), x), feed(Covariance(), x)
    ref_cov = np.cov(xn, rowvar=False)
    assert mean.count == moment.count == cov.count == n
    assert np.abs(mean.mean().numpy() - xn.mean(0)).max() <= 1e-9 * 1e3
    assert rel(moment.moment(), xn.T @ xn / n) <= 1e-6
    assert rel(cov.covariance(), ref_cov) <= 1e-6
    assert rel(cov.mean(), xn.mean(0)) <= 1e-12
    # The data is hard: the textbook float32 covariance, E[x xᵀ] - μ μᵀ, misses the bound by far.
    x32 = x[:100_000]
    naive = (x32.T @ x32 / len(x32) - torch.outer(x32.mean(0), x32.mean(0))).double()
    assert rel(naive, np.cov(xn[:100_000], rowvar=False, bias=True)) > 1e-3


def test_moments_of_skewed_relu_like_keys_match_numpy_float64():
    # Centred ReLU outputs are the hardest case for float32 products seen (about 5e-7).
    gen = torch.Generator().manual_seed(5)
    for channels, offset in ((64, 0.0), (16, 0.0), (32, 1e3)):
        x = torch.relu(torch.randn(100_000, channels, generator=gen) + 0.2) + offset
        xn = x.double().numpy()
        cov = feed(Covariance(), x, sizes=(65536, 640))
        assert rel(cov.covariance(), np.cov(xn, rowvar=False)) <= 1e-6
        assert rel(cov.moment(), xn.T @ xn / len(xn)) <= 1e-6


def test_batched_products_of_the_gpu_path_agree_with_the_chunk_loop():
    x = torch.relu(torch.randn(3 * 4096 + 17, 32) + 0.2)
    shift = x[:100].double().mean(0).float().double()
    loop, batched = _shifted_sums(x, shift, True, batched=False), _shifted_sums(x, shift, True, batched=True)
    assert torch.allclose(loop[0], batched[0], rtol=1e-12, atol=1e-9) and torch.allclose(
        loop[1], batched[1], rtol=1e-12
    )
    y = x.double().numpy() - shift.numpy()
    assert rel(batched[1], y.T @ y) <= 1e-6


def test_few_channels_are_multiplied_in_float64():
    x = torch.relu(torch.randn(50_000, 8) + 0.2)
    xn = x.double().numpy()
    assert rel(feed(Covariance(), x).covariance(), np.cov(xn, rowvar=False)) <= 1e-12


def test_float64_rows_are_accumulated_exactly():
    x = torch.randn(30_000, 9, dtype=torch.float64) * 3 + 5
    xn = x.numpy()
    cov = feed(Covariance(), x, sizes=(7000, 5))
    assert rel(cov.covariance(), np.cov(xn, rowvar=False)) <= 1e-13
    assert rel(cov.moment(), xn.T @ xn / len(xn)) <= 1e-14


def test_lower_float32_matmul_precision_falls_back_to_float64():
    x = torch.randn(20_000, 8) + 1e3
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        cov = feed(Covariance(), x, sizes=(5000,))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert rel(cov.covariance(), np.cov(x.double().numpy(), rowvar=False)) <= 1e-12


def test_results_are_float64_on_the_data_device():
    x = torch.randn(100, 3)
    for value in (feed(Mean(), x).mean(), feed(SecondMoment(), x).moment(), feed(Covariance(), x).covariance()):
        assert value.dtype == torch.float64 and value.device == x.device
    assert feed(Quantile(), x).quantiles([0.5]).shape == (1, 3)
    values, ids = feed(TopK(4), x).topk()
    assert values.shape == ids.shape == (4, 3) and ids.dtype == torch.int64


# -- merging -----------------------------------------------------------------------------------------------------


def make_all() -> list[Stat]:
    return [Mean(), SecondMoment(), Covariance(), TopK(7), Quantile(resolution=64, seed=3)]


def assert_same(a: Stat, b: Stat, tol: float = 1e-12) -> None:
    assert (a.count, a.skipped) == (b.count, b.skipped)
    if isinstance(a, Covariance):
        assert torch.allclose(a.covariance(), b.covariance(), rtol=tol, atol=tol)
    if isinstance(a, SecondMoment):
        assert torch.allclose(a.moment(), b.moment(), rtol=tol, atol=tol)
    if isinstance(a, Mean):
        assert torch.allclose(a.mean(), b.mean(), rtol=tol, atol=tol)
    if isinstance(a, TopK):
        assert torch.equal(a.topk()[0], b.topk()[0]) and torch.equal(a.topk()[1], b.topk()[1])


@given(
    n=st.integers(2, 400),
    cut=st.floats(0, 1),
    channels=st.integers(1, 5),
    offset=st.sampled_from([0.0, 1e3]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_two_halves_merged_equal_one_pass(n, cut, channels, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, generator=gen, dtype=torch.float64) + offset
    k = int(cut * n)
    for whole, first, second in zip(make_all(), make_all(), make_all(), strict=True):
        whole.add(x)
        first.add(x[:k])
        second.add(x[k:])
        first.merge(second)
        if isinstance(whole, Quantile):
            if whole.rank_error() == 0 and first.rank_error() == 0:  # no compaction: both exact
                assert torch.equal(whole.quantiles([0, 0.3, 1]), first.quantiles([0, 0.3, 1]))
        else:
            assert_same(whole, first, tol=1e-10 * max(1.0, offset))


def test_merge_of_large_magnitude_float32_halves(big):
    x, xn = big
    x, xn = x[:200_000], xn[:200_000]
    first, second = feed(Covariance(), x[:70_000]), feed(Covariance(), x[70_000:])
    first.merge(second)
    assert rel(first.covariance(), np.cov(xn, rowvar=False)) <= 1e-6


def test_merge_rejects_other_kinds_and_channels():
    with pytest.raises(TypeError, match="kinds and arguments must match"):
        Mean().merge(SecondMoment())
    with pytest.raises(TypeError):
        TopK(3).merge(TopK(4))
    a, b = Mean(), Mean()
    a.add(torch.randn(4, 3))
    b.add(torch.randn(4, 2))
    with pytest.raises(ValueError, match="channels"):
        a.merge(b)


# -- files -------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_of_every_kind(tmp_path):
    x = torch.randn(5000, 6)
    x[17, 2] = float("nan")
    for stat in make_all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stat.add(x[:3000])
        path = tmp_path / f"{type(stat).__name__}.safetensors"
        stat.save(path)
        loaded = type(stat).load(path)
        assert repr(loaded) == repr(stat)
        for key, value in stat.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        # Both go on identically, the quantile sketch's coin included.
        stat.add(x[3000:])
        loaded.add(x[3000:])
        assert_same(stat, loaded, tol=0)
        if isinstance(stat, Quantile):
            assert torch.equal(stat.quantiles([0.1, 0.5]), loaded.quantiles([0.1, 0.5]))


def test_empty_statistics_round_trip_and_several_per_file(tmp_path):
    stats = make_all()
    stats[1].add(torch.randn(10, 2))
    save_stats(tmp_path / "s.safetensors", stats)
    loaded = load_stats(tmp_path / "s.safetensors")
    assert [repr(s) for s in loaded] == [repr(s) for s in stats]
    assert list(tmp_path.iterdir()) == [tmp_path / "s.safetensors"]  # no temporary file left


def test_truncated_or_corrupt_files_are_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    feed(SecondMoment(), torch.randn(100, 4)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(StatsFileError, match="not a readable statistics file"):
        SecondMoment.load(path)
    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # a bit of the last tensor's payload: safetensors cannot see it, the checksum does
    path.write_bytes(bytes(flipped))
    with pytest.raises(StatsFileError, match="SHA-256"):
        load_stats(path)
    path.write_bytes(data)
    with pytest.raises(StatsFileError, match="not one Mean"):
        Mean.load(path)
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "missing.safetensors")
    assert issubclass(StatsFileError, DissectError)  # one line from the CLI, like every user-fixable problem


def test_the_default_cache_lives_under_the_users_cache_directory():
    assert DEFAULT_CACHE_DIR.parts[-2:] == ("dissect", "stats") and DEFAULT_CACHE_DIR.is_absolute()


# -- order statistics --------------------------------------------------------------------------------------------


def test_topk_values_and_global_row_ids():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, 5, generator=gen)
    x[123, 4] = float("inf")  # dropped with its whole row
    x[999, 0] = float("nan")
    topk = TopK(10)
    with pytest.warns(RuntimeWarning, match="dropped 2 rows"):
        feed(topk, x, sizes=(7000, 333))
    clean = x.clone()
    clean[[123, 999]] = -float("inf")  # never among the largest
    values, ids = torch.topk(clean, 10, dim=0)
    got_values, got_ids = topk.topk()
    assert torch.equal(got_ids, ids) and torch.equal(got_values, values.double())
    assert torch.equal(x.double().gather(0, got_ids), got_values)  # ids index the rows as added
    assert (topk.count, topk.skipped) == (len(x) - 2, 2)


def test_topk_with_fewer_rows_than_k():
    topk = TopK(5)
    topk.add(torch.tensor([[1.0], [3.0], [2.0]]))
    values, ids = topk.topk()
    assert values.flatten().tolist() == [3.0, 2.0, 1.0] and ids.flatten().tolist() == [1, 2, 0]


def assert_rank_bound(sketch: Quantile, x: torch.Tensor, qs: list[float]) -> None:
    n = len(x)
    est = sketch.quantiles(qs)
    bound = sketch.rank_error()
    for j, q in enumerate(qs):
        at_most = (x <= est[j]).sum(0)
        below = (x < est[j]).sum(0)
        assert (at_most >= q * n - bound).all() and (below <= q * n + bound).all(), (q, bound)


@pytest.mark.parametrize("integers", [False, True])
def test_quantile_rank_error_bound(integers):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, 6, generator=gen) * torch.tensor([1, 10, 1e3, 1e-3, 1, 5])
    if integers:  # many ties
        x = (x * 3).round()
    sketch = Quantile(resolution=256, seed=0)
    feed(sketch, x, sizes=(30_000, 777, 4096))
    qs = [0.0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0]
    n, res = len(x), sketch.resolution
    assert 0 < sketch.rank_error() <= n * (math.log2(n / res) + 1) / res
    assert_rank_bound(sketch, x, qs)
    # Merged halves keep the guarantee.
    a, b = Quantile(resolution=256, seed=1), Quantile(resolution=256, seed=2)
    feed(a, x[:90_000], sizes=(9000,))
    feed(b, x[90_000:], sizes=(50_000,))
    a.merge(b)
    assert a.count == n and a.rank_error() <= n * (math.log2(n / res) + 1) / res
    assert_rank_bound(a, x, qs)


def test_quantile_is_exact_while_small():
    x = torch.randn(500, 3, dtype=torch.float64)
    sketch = feed(Quantile(resolution=1024), x, sizes=(77,))
    assert sketch.rank_error() == 0
    ranks = [0, 1, 249, 499]
    expect = x.sort(dim=0).values[ranks]
    # q * n lands exactly on rank r + 1: the (r+1)-th smallest value.
    assert torch.equal(sketch.quantiles([(r + 1) / 500 for r in ranks]), expect)
    assert torch.equal(sketch.quantiles([0.0])[0], expect[0])
    with pytest.raises(ValueError, match=r"q in \[0, 1\]"):
        sketch.quantiles([1.5])


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [Mean, SecondMoment, Covariance, lambda: TopK(3), Quantile])
def test_nan_and_inf_rows_are_dropped_and_counted(make):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9000, 4, generator=gen)
    bad = [5, 4100, 8999]
    x[5, 0], x[4100, 3], x[8999, 1] = float("nan"), float("inf"), -float("inf")
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[bad] = False
    stat, clean = make(), make()
    with pytest.warns(RuntimeWarning, match="NaN or inf") as record:
        feed(stat, x, sizes=(4000,))
        stat.add(x[:10])  # a second drop is counted without another warning
    assert len(record) == 1
    feed(clean, x[keep], sizes=(4000,))
    clean.add(x[:10][keep[:10]])
    assert (stat.count, stat.skipped) == (int(keep.sum()) + 9, 4)
    if isinstance(stat, Quantile):
        assert torch.isfinite(stat.quantiles([0, 0.5, 1])).all()
    elif isinstance(stat, TopK):
        assert torch.equal(stat.topk()[0], clean.topk()[0])
    else:
        assert torch.isfinite(stat.mean()).all()
        assert torch.allclose(stat.mean(), clean.mean(), rtol=1e-6, atol=1e-7)
        if isinstance(stat, SecondMoment):
            assert torch.allclose(stat.moment(), clean.moment(), rtol=1e-6, atol=1e-7)


def test_huge_finite_rows_do_not_overflow_the_float32_path():
    x = torch.randn(5000, 3)
    x[10] = 3e30  # finite in float32, but its square is not
    moment = feed(SecondMoment(), x, sizes=(5000,))
    xn = x.double().numpy()
    assert moment.skipped == 0
    assert rel(moment.moment(), xn.T @ xn / len(xn)) <= 1e-12


def test_empty_batches_are_a_no_op():
    for stat in make_all():
        stat.add(torch.empty(0, 3))
        assert (stat.count, stat.skipped, stat.channels) == (0, 0, None)
        stat.add(torch.randn(4, 3))
        stat.add(torch.empty(0, 3))
        assert stat.count == 4
    with pytest.raises(ValueError, match="add rows first"):
        Mean().mean()
    with pytest.raises(ValueError, match="at least 2"):
        feed(Covariance(), torch.randn(1, 3)).covariance()


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (2, 3, 4, 4)])
def test_wrong_rank_says_how_to_reshape(shape):
    with pytest.raises(ValueError, match=r"expects rows \(N, C\).*rows\(x\)"):
        SecondMoment().add(torch.randn(shape))


def test_channel_mismatch_and_dtype_errors():
    stat = Mean()
    stat.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match="5 channels after earlier batches with 4"):
        stat.add(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x.float"):
        stat.add(torch.ones(3, 4, dtype=torch.int64))


def test_rows_flattens_feature_maps_and_token_sequences():
    fmap = torch.randn(2, 3, 4, 5)
    flat = rows(fmap)
    assert flat.shape == (40, 3)
    assert torch.equal(flat[1 * 20 + 2 * 5 + 3], fmap[1, :, 2, 3])  # row = sample * H*W + y * W + x
    tokens = torch.randn(2, 7, 3)
    assert torch.equal(rows(tokens, channels_last=True), tokens.reshape(14, 3))
    assert rows(flat) is flat
    with pytest.raises(ValueError):
        rows(torch.randn(5))


# -- feature maps read in place ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 128, 16, 16), (3, 32, 64, 64), (2, 16, 80, 80), (5, 128, 4, 4)])
@pytest.mark.parametrize("make", [Mean, SecondMoment, Covariance])
def test_add_map_equals_add_of_rows(make, shape):
    """Maps at 16x16 and up take the in-place path (chunks split across and within samples, one map transposed,
    so not contiguous); 4x4 flattens. Both agree with add(rows(x)) and with float64."""
    gen = torch.Generator().manual_seed(5)
    maps = [torch.randn(shape, generator=gen) * 3 + 100 for _ in range(3)]
    maps[1] = maps[1].transpose(2, 3)
    mapped, flat = make(), make()
    for fmap in maps:
        mapped.add_map(fmap)
        flat.add(rows(fmap))
    ref = torch.cat([rows(fmap) for fmap in maps]).double().numpy()
    assert (mapped.count, mapped.skipped) == (flat.count, 0) == (len(ref), 0)
    assert rel(mapped.mean(), ref.mean(0)) <= 1e-9
    if isinstance(mapped, Covariance):
        assert rel(mapped.covariance(), np.cov(ref.T)) <= 1e-6
    elif isinstance(mapped, SecondMoment):
        assert rel(mapped.moment(), ref.T @ ref / len(ref)) <= 1e-9
        assert rel(mapped.moment(), flat.moment().numpy()) <= 1e-9


def test_add_map_drops_nonfinite_rows_and_checks_its_input():
    fmap = torch.randn(4, 128, 16, 16)
    fmap[1, 3, 2, 2] = float("nan")
    moment = SecondMoment()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        moment.add_map(fmap)
    assert (moment.count, moment.skipped) == (1023, 1)
    assert torch.isfinite(moment.moment()).all()
    with pytest.raises(ValueError, match=r"feature map \(N, C, \*spatial\).*add\(\)"):
        moment.add_map(torch.randn(3, 128))
    with pytest.raises(ValueError, match="64 channels after earlier batches with 128"):
        moment.add_map(torch.randn(2, 64, 16, 16))
    moment.add_map(torch.empty(0, 128, 16, 16))
    assert moment.count == 1023
