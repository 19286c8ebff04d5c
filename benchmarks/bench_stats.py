"""Speed of collecting a layer's second moment, against plain forwards in the same run, and of SecondMoment.add.

    python benchmarks/bench_stats.py [--samples 128] [--batch 32] [--repeats 7] [--threads 1] [--device cpu]

On the generator (``dissect.models.stylegan.Generator``, random weights: 64x64 output, five resolution
stages) at ``synthesis.b16.conv1`` (keys: 128 channels at 16x16), over the same seeded samples:

* ``collect_vs_full_forward`` = time of ``collect(..., SecondMoment())`` / time of full forwards (<= 0.7);
* ``collect_vs_forward_to_layer`` = time of ``collect`` / time of forwards stopped at the layer (<= 1.10):
  the statistics' overhead;
* ``add_vs_naive`` = rows/s of ``SecondMoment.add`` / rows/s of float64 ``x.T @ x`` per batch (>= 1.0),
  on the layer's keys in the batches ``collect`` feeds.

All three timed loops draw their latents from the same sampler. After a warm-up, each round times
every loop once, back to back, so that other processes slow them alike; a ratio is the median over
``--repeats`` rounds of that round's ratio. Where CUDA is available the same figures follow for a
StyleGAN2-size layer (``synthesis.b64.conv1`` of a 128x128 generator with 512 channels up to 64x64: keys
of 512 channels at 64x64). The last line is the summary for the first configuration.

One CPU thread by default, as in bench_world: a second thread waits on whatever else shares the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dissect.hooks import Trace, key_module_name
from dissect.models.loaders import LatentSampler
from dissect.models.stylegan import Generator
from dissect.stats import SecondMoment, collect, rows

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

    def collect_moment() -> None:
        collect(G, layer, sampler, samples, SecondMoment(), batch_size=batch, device=device, progress=False)

    t = rounds({"full": full_forward, "to_layer": forward_to_layer, "collect": collect_moment}, repeats, device)

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
        f"collect {med['collect']:.3f} s\n"
        f"  SecondMoment.add {n_rows / med['add']:.3g} rows/s, "
        f"naive float64 x.T @ x {n_rows / med['naive']:.3g} rows/s"
    )
    return {
        "collect_vs_full_forward": ratio(t["collect"], t["full"]),
        "collect_vs_forward_to_layer": ratio(t["collect"], t["to_layer"]),
        "add_vs_naive": ratio(a["naive"], a["add"]),
    }


def summary(prefix: str, ratios: dict[str, float]) -> str:
    return f"{prefix}: " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), device {device}")
    main_ratios = bench("generator-64", args.samples, args.batch, args.repeats, device)
    print(summary("  generator-64", main_ratios))
    if device.type == "cuda":
        print(summary("  stylegan2-size", bench("stylegan2-size", args.samples, args.batch, args.repeats, device)))
    print(summary("bench_stats", main_ratios))


if __name__ == "__main__":
    main()
