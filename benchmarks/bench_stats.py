"""Speed of collecting a layer's second moment, against plain forwards in the same run, and of SecondMoment.add;
speed of whitening by a Cholesky factor against a full eigendecomposition.

    python benchmarks/bench_stats.py [--samples 128] [--batch 32] [--repeats 7] [--threads 1] [--device cpu]
                                     [--whiten-sizes 1024 2048]

On the generator (``dissect.models.stylegan.Generator``, random weights: 64x64 output, five resolution
stages) at ``synthesis.b16.conv1`` (keys: 128 channels at 16x16, the input of its ``conv``), over the same
seeded samples:

* ``collect_vs_full_forward`` = time of ``collect(..., SecondMoment())`` / time of full forwards (<= 0.7);
* ``collect_vs_forward_to_layer`` = time of ``collect`` / time of forwards stopped right after the key module;
* ``collect_vs_forward_before_keys`` = time of ``collect`` / time of forwards stopped right *before* the key
  module, which is all a forward must run to show the keys (<= 1.05): the statistics' whole overhead;
* ``add_vs_naive`` = rows/s of ``SecondMoment.add`` / rows/s of float64 ``x.T @ x`` per batch (>= 1.0),
  on the layer's keys in the batches ``collect`` feeds;
* ``collect_vs_nnsight`` = time of ``collect`` / time of nnsight's natural loop for the same C (< 1): wrap the
  model in ``nnsight.NNsight``, per batch ``with model.trace(z) as t: x = <key module>.input.save(); t.stop()``,
  then add float64 ``xᵀx``. Only where nnsight imports: it is no dependency of dissect, so run this script from an
  environment of its own that has it (see benchmarks/RESULTS.md); the two C must agree (printed);
* ``whiten_eigh_vs_cholesky_<n>`` = time of ``C^{-1/2}`` from ``torch.linalg.eigh`` (what LayerMemory used) / time
  of ``LayerMemory``'s Cholesky whitening (the factor ``L``, then triangular solves ``L⁻¹ k``) for a random
  ``n x n`` C and 64 keys, one run each; the rank-4 directions of both agree (printed).

All timed loops draw their latents from the same sampler. After a warm-up, each round times
every loop once, back to back, so that other processes slow them alike; a ratio is the median over
``--repeats`` rounds of that round's ratio. Where CUDA is available the same figures follow for a
StyleGAN2-size layer (``synthesis.b64.conv1`` of a 128x128 generator with 512 channels up to 64x64: keys
of 512 channels at 64x64). The last line is the summary for the first configuration.

One CPU thread by default, as in bench_world: a second thread waits on whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dissect.hooks import StopForward, Trace, get_module, key_module_name
from dissect.memory import LayerMemory
from dissect.models.loaders import LatentSampler
from dissect.models.stylegan import Generator
from dissect.stats import SecondMoment, collect, rows

try:
    from nnsight import NNsight
    from nnsight import __version__ as nnsight_version
except ImportError:  # not a dependency: the nnsight comparison runs where it is installed
    NNsight = nnsight_version = None

CONFIGS = {
    "generator-64": dict(layer="synthesis.b16.conv1", generator={}),
    "stylegan2-size": dict(
        layer="synthesis.b64.conv1",
        generator=dict(
            z_dim=512, w_dim=512, resolution=128, channels={4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256}
        ),
    ),
}


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def rounds(loops: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each loop in each of ``repeats`` rounds, after one warm-up round."""
    for fn in loops.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, fn in loops.items():
            times[name].append(timed(fn, device))
    return times


def ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num / den``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def bench(name: str, samples: int, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    config = CONFIGS[name]
    torch.manual_seed(0)
    G = Generator(**config["generator"]).to(device).eval()
    layer = config["layer"]
    keys_at = key_module_name(G, layer)
    sampler = LatentSampler(G.z_dim, "bench")
    batches = [list(range(s, min(samples, s + batch))) for s in range(0, samples, batch)]

    @torch.no_grad()
    def full_forward() -> None:
        for seeds in batches:
            G(sampler(seeds).to(device))

    @torch.no_grad()
    def forward_to_layer() -> None:
        for seeds in batches:
            with Trace(G, keys_at, retain_output=False, stop=True):
                G(sampler(seeds).to(device))

    def stop(module: nn.Module, args: tuple) -> None:
        raise StopForward()

    @torch.no_grad()
    def forward_before_keys() -> None:
        handle = get_module(G, keys_at).register_forward_pre_hook(stop)
        try:
            for seeds in batches:
                try:
                    G(sampler(seeds).to(device))
                except StopForward:
                    pass
        finally:
            handle.remove()

    found: dict[str, torch.Tensor] = {}

    def collect_moment() -> None:
        found["collect"] = collect(G, layer, sampler, samples, SecondMoment(), batch_size=batch, device=device,
                                   progress=False).moment()

    loops = {"full": full_forward, "to_layer": forward_to_layer, "before_keys": forward_before_keys,
             "collect": collect_moment}
    if NNsight is not None:
        wrapped = NNsight(G)
        envoy = functools.reduce(getattr, keys_at.split("."), wrapped)

        @torch.no_grad()
        def nnsight_loop() -> None:
            total, count = None, 0
            for seeds in batches:
                with wrapped.trace(sampler(seeds).to(device)) as tracer:
                    x = envoy.input.save()
                    tracer.stop()
                r = rows(x).double()
                total = r.T @ r if total is None else total + r.T @ r
                count += len(r)
            found["nnsight"] = total / count

        loops["nnsight"] = nnsight_loop
    t = rounds(loops, repeats, device)

    keys = []
    with torch.no_grad():
        for seeds in batches:
            with Trace(G, keys_at, retain_input=True, retain_output=False, stop=True) as trace:
                G(sampler(seeds).to(device))
            keys.append(rows(trace.input).contiguous())
    n_rows, channels = sum(len(k) for k in keys), keys[0].shape[1]

    def add() -> None:
        moment = SecondMoment()
        for x in keys:
            moment.add(x)

    def naive() -> None:
        total = torch.zeros(channels, channels, dtype=torch.float64, device=device)
        for x in keys:
            xd = x.double()
            total += xd.T @ xd

    a = rounds({"add": add, "naive": naive}, repeats, device)
    med = {k: statistics.median(v) for k, v in {**t, **a}.items()}
    print(
        f"{name} on {device}: {layer} keys {n_rows // samples} rows x {channels} channels per sample; "
        f"{samples} samples in batches of {batch}, medians of {repeats} rounds\n"
        f"  full forward {med['full']:.3f} s, forward to layer {med['to_layer']:.3f} s, "
        f"forward before the keys {med['before_keys']:.3f} s, collect {med['collect']:.3f} s"
        + (f", nnsight loop {med['nnsight']:.3f} s" if "nnsight" in med else "") + "\n"
        f"  SecondMoment.add {n_rows / med['add']:.3g} rows/s, "
        f"naive float64 x.T @ x {n_rows / med['naive']:.3g} rows/s"
    )
    ratios = {
        "collect_vs_full_forward": ratio(t["collect"], t["full"]),
        "collect_vs_forward_to_layer": ratio(t["collect"], t["to_layer"]),
        "collect_vs_forward_before_keys": ratio(t["collect"], t["before_keys"]),
        "add_vs_naive": ratio(a["naive"], a["add"]),
    }
    if "nnsight" in t:
        ours = found["collect"].double().cpu()
        gap = float((found["nnsight"].cpu() - ours).norm() / ours.norm())
        print(f"  nnsight {nnsight_version} C agrees with collect's to {gap:.2g} (relative Frobenius)")
        ratios["collect_vs_nnsight"] = ratio(t["collect"], t["nnsight"])
    return ratios


def whitening(n: int) -> dict[str, float]:
    """Seconds of ``C^{-1/2}`` by ``eigh`` against LayerMemory's Cholesky whitening for a random ``n x n`` C."""
    torch.manual_seed(0)
    memory = LayerMemory(nn.Sequential(nn.Linear(n, 1)), "0")
    mix = torch.randn(n, n) * torch.logspace(0, -2, n)
    data = torch.randn(2 * n, n) @ mix.T
    memory.set_moment(data.T @ data / len(data))
    keys = torch.randn(64, n) @ mix.T

    def eigh_inverse_root() -> torch.Tensor:
        evals, evecs = memory.eigh()
        return (evecs * evals.rsqrt()) @ evecs.T

    start = time.perf_counter()
    keys.double() @ eigh_inverse_root()
    eigh_s = time.perf_counter() - start
    inv_sqrt = eigh_inverse_root()
    start = time.perf_counter()
    memory.whiten(keys)  # the factor (cached in the memory) and a triangular solve
    cholesky_s = time.perf_counter() - start
    z = torch.linalg.svd(keys.double() @ inv_sqrt, full_matrices=False)[2][:4] @ inv_sqrt
    d = memory.directions_from_keys(keys, torch.ones(len(keys)), rank=4).double()
    agree = float(torch.nn.functional.cosine_similarity(d, z, dim=1).abs().min())
    print(f"whitening {n}x{n}: eigh + C^-1/2 k {eigh_s:.2f} s, Cholesky + L^-1 k {cholesky_s:.3f} s; "
          f"rank-4 directions agree to |cos| >= {agree:.6f}")
    return {f"whiten_eigh_vs_cholesky_{n}": eigh_s / cholesky_s}


def summary(prefix: str, ratios: dict[str, float]) -> str:
    return f"{prefix}: " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--whiten-sizes", type=int, nargs="*", default=[1024, 2048],
                        help="C sizes for the whitening comparison (none to skip it)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), device {device}")
    if NNsight is None:
        print("nnsight is not installed here: collect_vs_nnsight is left out (see benchmarks/RESULTS.md)")
    main_ratios = bench("generator-64", args.samples, args.batch, args.repeats, device)
    print(summary("  generator-64", main_ratios))
    if device.type == "cuda":
        print(summary("  stylegan2-size", bench("stylegan2-size", args.samples, args.batch, args.repeats, device)))
    for n in args.whiten_sizes:
        main_ratios.update(whitening(n))
    print(summary("bench_stats", main_ratios))


if __name__ == "__main__":
    main()
