"""Regenerate the key statistics shipped with the embedded generator (``dissect/models/weights/stats/``).

    python -m dissect.models.ship_stats [--model spires] [--n 2000] [--work ~/.cache/dissect/ship-stats]

Every spatial and mapping layer's C = E[k kᵀ] over seeds ``0 .. n-1``, collected in one forward pass per batch
(a :class:`~dissect.hooks.TraceDict` on every key module) instead of one partial pass per layer, then written
with the fingerprint of the weights it depends on (:func:`dissect.shipped.save`). Run it again after the
generator's weights change: a shipped C whose fingerprint no longer matches is never used.
The collected moments are kept under ``--work`` (per model, weights and n), so re-packaging after a change of
the fingerprint rule costs seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dissect import shipped, stats
from dissect.hooks import TraceDict, call_model, eval_mode, key_module_name, layers
from dissect.models.loaders import load


def shipped_layers(model: torch.nn.Module, example: object) -> list[str]:
    """The layers a user can choose: spatial ones (the dashboard's) and the mapping network's linear layers
    (the styles' affine layers are left out: they all read the same w)."""
    found = layers(model, example)
    return [i.name for i in found if (i.output_size and len(i.output_size) == 2) or i.name.startswith("mapping.")]


def collect_all(model: torch.nn.Module, sampler: object, names: list[str], n: int,
                batch_size: int = 32) -> dict[str, stats.SecondMoment]:
    """One SecondMoment per layer over seeds ``0 .. n-1``, all from the same forward passes."""
    keys = {name: key_module_name(model, name) for name in names}
    moments = {name: stats.SecondMoment() for name in names}
    with eval_mode(model), torch.no_grad(), tqdm(total=n, unit="sample", desc="collect") as bar:
        for start in range(0, n, batch_size):
            seeds = list(range(start, min(n, start + batch_size)))
            with TraceDict(model, list(keys.values()), retain_input=True, retain_output=False, stop=True) as td:
                call_model(model, sampler(seeds))
            for name, key in keys.items():
                moments[name].add(stats.rows(td[key].input, isinstance(td[key].module, torch.nn.Linear)))
            bar.update(len(seeds))
    return moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spires")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "dissect" / "ship-stats")
    parser.add_argument("--out", type=Path, default=shipped.SHIPPED_DIR)
    args = parser.parse_args()
    model, sampler = load(args.model)
    model.requires_grad_(False)
    names = shipped_layers(model, sampler([0]))
    weights = stats.fingerprint(model, "", sampler([0]), side="output")[:16]  # new weights never reuse old moments
    work = args.work / f"{args.model}-{weights}-n{args.n}.safetensors"
    if work.exists():
        moments = dict(zip(names, stats.load_stats(work), strict=True))
    else:
        start = time.perf_counter()
        moments = collect_all(model, sampler, names, args.n)
        work.parent.mkdir(parents=True, exist_ok=True)
        stats.save_stats(work, list(moments.values()))
        print(f"collected {len(names)} layers over {args.n} samples in {time.perf_counter() - start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, moment in moments.items():
        path = shipped.save(args.out, model, name, sampler, args.n, moment.moment())
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
