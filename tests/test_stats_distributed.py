"""all_reduce across two gloo processes, each adding half the rows, equals one process adding them all."""

from __future__ import annotations

import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dissect.stats import Covariance, Mean, Quantile, SecondMoment, Stat, TopK, load_stats, save_stats

WORLD = 2


def make() -> list[Stat]:
    return [
        Mean(),
        SecondMoment(),
        Covariance(),
        TopK(9),
        Quantile(resolution=128),
        Covariance(),
        TopK(3),
        Covariance(),
    ]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 rows (their sums are exact, so one and two processes agree to rounding) and float32 rows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12_000, 6, generator=gen, dtype=torch.float64) * 2 + 1e3
    return x, (torch.randn(12_000, 6, generator=gen) + 1e3).float()


def fill(stats: list[Stat], x: torch.Tensor, x32: torch.Tensor, rank: int | None) -> None:
    """Rank ``r`` of ``WORLD`` adds the r-th contiguous share; ``rank=None`` adds everything in one process.

    The last three test uneven shares: float32 rows, then rows for the last rank only (the others reduce
    without ever seeing a row)."""
    part = (lambda t: t) if rank is None else (lambda t: t.chunk(WORLD)[rank])
    for stat in stats[:5]:
        for batch in part(x).split(2500):
            stat.add(batch)
    stats[5].add(part(x32))
    if rank is None or rank == WORLD - 1:
        stats[6].add(x[:50])
        stats[7].add(x[:50])


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, x32 = data()
        stats = make()
        fill(stats, x, x32, rank)
        for stat in stats:
            stat.all_reduce()
        save_stats(Path(out) / f"rank{rank}.safetensors", stats)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a - b).norm() / b.norm()) <= tol


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> list[list[Stat]]:
    out = tmp_path_factory.mktemp("distributed")
    # Spawned workers re-run the parent's __main__ file; under pytest that may be a script another test ran
    # (Streamlit's AppTest leaves the app there), so give them a bare __main__ to import instead.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    finally:
        sys.modules["__main__"] = main
    return [load_stats(out / f"rank{r}.safetensors") for r in range(WORLD)]


def test_all_reduce_equals_a_single_process(reduced):
    x, x32 = data()
    single = make()
    fill(single, x, x32, None)
    for stats in reduced:
        mean, moment, cov, topk, quantile, cov32, late, late_cov = stats
        assert [s.count for s in stats] == [s.count for s in single]
        assert close(mean.mean(), single[0].mean(), 1e-10)
        assert close(moment.moment(), single[1].moment(), 1e-10)
        assert close(cov.covariance(), single[2].covariance(), 1e-10)
        assert torch.equal(topk.topk()[0], single[3].topk()[0]) and torch.equal(topk.topk()[1], single[3].topk()[1])
        assert torch.equal(late.topk()[1], single[6].topk()[1])  # rank 0 added no rows to number before them
        assert close(late_cov.covariance(), single[7].covariance(), 1e-10)
        # Float32 halves carry each process's float32 rounding: held to the fast path's bound instead.
        ref = np.cov(x32.double().numpy(), rowvar=False)
        assert np.linalg.norm(cov32.covariance().numpy() - ref) / np.linalg.norm(ref) <= 1e-6
    # The sketch is merged in rank order on every process: it equals that merge done here.
    halves = []
    for rank in range(WORLD):
        part = make()
        fill(part, x, x32, rank)
        halves.append(part[4])
    merged = Quantile(resolution=128)
    for half in halves:
        merged.merge(half)
    for stats in reduced:
        assert stats[4].rank_error() == merged.rank_error() > 0
        assert torch.equal(stats[4].quantiles([0.1, 0.5, 0.9]), merged.quantiles([0.1, 0.5, 0.9]))


def test_all_reduce_needs_an_initialised_process_group():
    stat = Mean()
    stat.add(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="init_process_group"):
        stat.all_reduce()
