"""Key statistics at LLM scale: C = E[k kᵀ] for a layer with d = 14336 keys (Llama-3-8B's down_proj input).

Nothing is downloaded: the keys are what a random Llama-style MLP feeds its down projection,
``down(silu(gate(h)) * up(h))`` with ``h ~ N(0, I_width)`` and ``down = Linear(d, 64)`` (the shape of the layer's
input is all that matters for C), collected by ``dissect.hooks.Trace`` and accumulated by
``dissect.stats.SecondMoment`` in float64, exactly as ``stats.collect`` does.

Measured:

* ``keys_per_s``: keys a second through ``SecondMoment.add`` (the statistic alone, one thread);
* ``peak_bytes_over_d2``: the process's peak resident memory while streaming and while solving, above what it
  held before the statistic existed, over d² (float64 C is 8 bytes/d²; the bound asked for is 2·d² float64
  elements plus one batch, i.e. 16 plus the batch's share);
* ``keys_to_converge``: keys after which the edit directions of held-out keys are stable. At checkpoints that
  double the key count, C (with the library's ridge, 1e-4 of its mean eigenvalue) is factorised in place by
  Cholesky (scipy's LAPACK ``potrf``, overwriting the moment: no second d² copy), giving each held-out key's
  ROME direction ``u = C⁻¹k / kᵀC⁻¹k`` (a rank-one edit ``ΔW = r uᵀ`` moves a key k' by ``r uᵀk'``). The change
  from the previous checkpoint is measured as the edit would feel it, over the data's keys:
  ``‖u_n - u_prev‖_C / ‖u_n‖_C`` with ``‖x‖_C = E[(xᵀk')²]^½``; converged when the largest over the held-out keys
  is below ``--tol``. (Plain ``‖C⁻¹k‖`` is dominated by directions the data hardly visits, where C is estimated
  worst and an edit acts least, and converges far more slowly.)
* ``--world-size 2``: the same statistic across gloo processes, each streaming its share of the keys, combined
  by ``SecondMoment.all_reduce``; compared with one process streaming them all.

Usage::

    python benchmarks/bench_scale.py --world-size 2        # convergence at d = 256, 512, 1024, then d = 14336
    python benchmarks/bench_scale.py --d 2048 --converge-d  # everything at d = 2048

The convergence test runs at the widths ``--converge-d`` (at d = 14336 each checkpoint's Cholesky takes minutes
on a CPU, and the keys needed are many times d); the full width streams ``--stream-keys`` keys and solves once.
Ends with ``bench_scale: d=D keys_to_converge=K keys_per_s=R peak_bytes_over_d2=M``: ``K`` measured at d when
d is among the convergence widths, else scaled in proportion to d from the largest width that converged (the
keys needed grow like d: 128 d at 512 and at 1024); ``R`` and ``M`` measured at d.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from dissect.hooks import Trace
from dissect.memory import DEFAULT_RIDGE
from dissect.models.loaders import LatentSampler
from dissect.stats import SecondMoment


class LlamaMLP(nn.Module):
    """A random Llama-style MLP: ``down(silu(gate(h)) * up(h))``; the keys of ``down`` are its ``d`` hidden units."""

    def __init__(self, width: int, d: int, out: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.gate = nn.Linear(width, d, bias=False)
        self.up = nn.Linear(width, d, bias=False)
        self.down = nn.Linear(d, out, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def keys(model: LlamaMLP, sampler: LatentSampler, seeds: list[int]) -> Tensor:
    """Keys of ``down`` for ``sampler(seeds)``: ``(len(seeds), d)`` float32 (the forward stops at ``down``)."""
    with torch.no_grad(), Trace(model, "down", retain_input=True, retain_output=False, stop=True) as trace:
        model(sampler(seeds))
    return trace.input


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (``VmRSS``) or its peak since the last :func:`reset_peak` (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def directions(stat: SecondMoment, held: Tensor, ridge: float = DEFAULT_RIDGE) -> tuple[Tensor, Tensor]:
    """Edit directions of held-out keys ``held (h, d)``: ``u = C⁻¹k / (kᵀC⁻¹k)`` (so ``uᵀk = 1``, ROME's scale) with
    the regularised ``C = E[k kᵀ] + ridge·tr(C)/d·I``, and ``L (d, d)``, C's Cholesky factor (lower triangle of a
    float64 Fortran-order array), both by one in-place factorisation."""
    moment = stat.moment()  # (d, d) float64: the one extra d² the solve needs
    moment.diagonal().add_(ridge * float(moment.diagonal().sum()) / moment.shape[0])
    # C is symmetric, so its C-order buffer read as Fortran order is C itself: potrf overwrites it in place.
    factor = scipy.linalg.cho_factor(moment.numpy().T, lower=True, overwrite_a=True, check_finite=False)
    k = held.double().numpy().T  # (d, h)
    u = scipy.linalg.cho_solve(factor, k, check_finite=False)
    u /= (u * k).sum(0, keepdims=True)
    return torch.from_numpy(u), factor[0]


def c_norm(factor: object, x: Tensor) -> Tensor:
    """``sqrt(xᵀ C x)`` per column of ``x (d, h)`` from C's Cholesky factor (``‖Lᵀx‖``, no copy of L): the RMS
    with which ``x`` responds to keys of the data, ``E[(xᵀk)²]^½``."""
    lx = scipy.linalg.blas.dtrmm(1.0, factor, x.numpy(), lower=1, trans_a=1)
    return torch.from_numpy(lx).norm(dim=0)


def converge(d: int, width: int, batch: int, max_keys: int, tol: float, n_held: int) -> dict[str, float | str]:
    """Stream keys into one SecondMoment with checkpoints doubling from d/8; see the module docstring."""
    model = LlamaMLP(width, d)
    sampler = LatentSampler(width, "llama-mlp")
    held = keys(model, sampler, list(range(10**9, 10**9 + n_held)))
    stat = SecondMoment()
    base = rss_bytes()
    reset_peak()
    seen, add_seconds, previous, result, stream_peak, solve_seconds = 0, 0.0, None, "none", 0, math.nan
    checkpoint = max(batch, d // 8)
    while seen < max_keys:
        k = keys(model, sampler, list(range(seen, seen + batch)))
        start = time.perf_counter()
        stat.add(k)
        add_seconds += time.perf_counter() - start
        seen += batch
        if seen >= checkpoint:
            stream_peak = rss_bytes("VmHWM") - base
            start = time.perf_counter()
            u, factor = directions(stat, held)
            solve_seconds = time.perf_counter() - start
            if previous is not None:
                change = float((c_norm(factor, u - previous) / c_norm(factor, u)).max())
                print(f"keys {seen} ({seen / d:.2f} d): largest change of the edit direction {change:.4f} "
                      f"(solve {solve_seconds:.0f} s)", flush=True)
                if change < tol:
                    result = str(seen)
                    break
            previous, checkpoint = u, checkpoint * 2
    peak = rss_bytes("VmHWM") - base
    return {"keys_to_converge": result, "keys_per_s": seen / add_seconds, "stream_peak": stream_peak / d**2,
            "peak": peak / d**2, "keys": seen, "batch_share": batch * (width + 3 * d) * 4 / d**2,
            "solve_seconds": solve_seconds}


def _worker(rank: int, world: int, port: int, d: int, width: int, n: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, sampler, stat = LlamaMLP(width, d), LatentSampler(width, "llama-mlp"), SecondMoment()
        for start in range(rank * n // world, (rank + 1) * n // world, 256):
            stat.add(keys(model, sampler, list(range(start, min(start + 256, (rank + 1) * n // world)))))
        stat.all_reduce()
        if rank == 0:
            torch.save(stat.moment(), out)
    finally:
        dist.destroy_process_group()


def distributed(world: int, d: int, width: int, n: int) -> float:
    """Largest relative difference between C from ``world`` gloo processes and from one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "moment.pt")
        mp.spawn(_worker, args=(world, port, d, width, n, out), nprocs=world)
        shared = torch.load(out, weights_only=True)
    model, sampler, single = LlamaMLP(width, d), LatentSampler(width, "llama-mlp"), SecondMoment()
    for start in range(0, n, 256):
        single.add(keys(model, sampler, list(range(start, min(start + 256, n)))))
    return float((shared - single.moment()).abs().max() / single.moment().abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=14336, help="key width (Llama-3-8B down_proj: 14336)")
    parser.add_argument("--width", type=int, default=256, help="width of the random MLP's input h")
    parser.add_argument("--batch", type=int, default=512, help="keys per SecondMoment.add")
    parser.add_argument("--stream-keys", type=int, default=2048, help="keys streamed at width d (then one solve)")
    parser.add_argument("--converge-d", type=int, nargs="*", default=[256, 512, 1024],
                        help="key widths of the convergence test (none: at d itself)")
    parser.add_argument("--max-keys", type=int, default=131072, help="each convergence test stops here")
    parser.add_argument("--tol", type=float, default=0.1, help="largest relative change of an edit direction deemed stable")
    parser.add_argument("--held-out", type=int, default=16, help="held-out keys whose directions are compared")
    parser.add_argument("--world-size", type=int, default=0, help="also check all_reduce over this many processes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.world_size > 1:
        diff = distributed(args.world_size, min(args.d, 512), args.width, 4096)
        print(f"bench_scale_distributed: world_size={args.world_size} d={min(args.d, 512)} max_rel_diff={diff:.2e}")
    found = {}
    for small in args.converge_d or [args.d]:
        conv = converge(small, args.width, args.batch, args.max_keys, args.tol, args.held_out)
        found[small] = conv["keys_to_converge"]
        print(f"convergence at d={small}: keys_to_converge={found[small]}", flush=True)
    r = converge(args.d, args.width, args.batch, args.stream_keys, math.inf, args.held_out) if args.d not in found else conv
    print(f"d={args.d}: streamed {r['keys']} keys at {r['keys_per_s']:.1f} keys/s; peak {r['stream_peak']:.2f} bytes/d² "
          f"while streaming, {r['peak']:.2f} with the solve ({r['solve_seconds']:.0f} s; one batch of keys and "
          f"activations is {r['batch_share']:.2f} bytes/d²)")
    # The keys a stable direction needs grow in proportion to d (128 d at 512 and 1024 with tol 0.1: the estimation
    # error is ~sqrt(d / n)); scaled from the largest width that converged, unless d itself was measured.
    done = [w for w in found if found[w] != "none"]
    k = found[args.d] if args.d in found else (str(round(int(found[max(done)]) / max(done) * args.d)) if done else "none")
    print(f"bench_scale: d={args.d} keys_to_converge={k} keys_per_s={r['keys_per_s']:.1f} "
          f"peak_bytes_over_d2={r['peak']:.2f}")


if __name__ == "__main__":
    main()
