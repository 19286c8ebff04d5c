"""Feature visualisation: does the parameterisation decide how far the optimisation gets (Mordvintsev et al., 2018)?

    python benchmarks/bench_featurevis.py [--units 20] [--steps 64] [--size 64] [--hook-calls 1000] \\
        [--lucent-python /tmp/lucent-venv/bin/python]

For each model, ``--units`` channels (half at each of two layers, spread evenly over the channels) are optimised at
once, one image per unit, for ``--steps`` Adam steps (lr 0.05) of the same seeded start, by each parameterisation
(pixels, Fourier 1/f, Fourier 1/f + colour decorrelated with the world's colour correlation), each without and with
``standard_transforms``. The objective reached is each unit's mean activation on the final image, untransformed
(``values``); ``robust`` is its mean over 8 seeded random transforms of that image. Models: the shipped segmenter
and, as a control, torchvision's resnet18 with random weights (``weights=None``, seed 0).

* ``fourier_decorrelated_vs_pixel`` = median over the segmenter's units and both transform settings of
  value(Fourier + decorrelated) / value(pixels);
* ``transforms_gain`` = median over the segmenter's units and the three parameterisations of
  value(with transforms) / value(without);
* ``seconds_per_step``: one 64-pixel image on the segmenter, Fourier + decorrelated + transforms (median of 3);
* ``hooks_leaked``: forward hooks left on the segmenter after ``--hook-calls`` calls of ``visualise`` (one step
  on an 8-pixel image each; a quarter of them end in an exception from the callback, a quarter in a bad-unit
  error before any step);
* ``lucent``: torch-lucent in its own venv, on the same segmenter units with its FFT + decorrelated image and its
  standard transforms (its images in [0, 1] mapped to the segmenter's [-1, 1]); ``ran``, or why not.

The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEGMENTER_LAYERS = ("down.2.5", "down.3.5")  # after ReLU: 64 channels at 1/4, 128 at 1/8 of the image side
RESNET_LAYERS = ("layer2", "layer3")


def spread(channels: int, n: int) -> list[int]:
    """``n`` channels spread evenly over ``channels``."""
    return [round(i * (channels - 1) / max(n - 1, 1)) for i in range(n)]


def lucent_worker(args: argparse.Namespace) -> None:
    """Run in the lucent venv: lucent's render_vis on the segmenter units; prints one JSON line."""
    out: dict = {}
    try:
        import lucent
        from lucent.optvis import objectives, param, render, transform

        from dissect.featurevis import hook_count
        from dissect.models.segmenter import load_segmenter

        torch.set_num_threads(1)
        seg = load_segmenter()
        out["version"] = getattr(lucent, "__version__", "0.1.8")
        units = json.loads(args.lucent_units)
        results = {}
        for layer, chans in units.items():
            name = layer.replace(".", "_")  # lucent names layers with underscores
            obj = sum(objectives.channel(name, c, batch=i) for i, c in enumerate(chans))
            torch.manual_seed(0)
            start = time.perf_counter()
            images = render.render_vis(
                seg, obj, param_f=lambda n=len(chans): param.image(args.size, batch=n, fft=True, decorrelate=True),
                transforms=transform.standard_transforms + [lambda x: x * 2 - 1], thresholds=(args.steps,),
                preprocess=False, show_image=False, progress=False, fixed_image_size=args.size,
            )[-1]
            seconds = time.perf_counter() - start
            results[layer] = {"images": torch.from_numpy(images).permute(0, 3, 1, 2).mul(2).sub(1).tolist(),
                              "seconds_per_step": seconds / args.steps}
        out["results"] = results
        out["hooks_after_calls"] = hook_count(seg)
        out["calls"] = len(units)
        out["status"] = "ran"
    except Exception as exc:  # any failure of lucent on our torch is the finding
        out["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    print(json.dumps(out))


def run_lucent(args: argparse.Namespace, units: dict[str, list[int]]) -> dict:
    python = Path(args.lucent_python)
    if not python.exists():
        return {"status": "not_installed"}
    check = subprocess.run([str(python), "-c", "import lucent"], capture_output=True, text=True)
    if check.returncode:
        return {"status": f"not_installed: {check.stderr.strip().splitlines()[-1][:200]}"}
    cmd = [str(python), __file__, "--lucent-worker", "--lucent-units", json.dumps(units), "--steps", str(args.steps),
           "--size", str(args.size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"status": f"failed: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=20)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--hook-calls", type=int, default=1000)
    parser.add_argument("--lucent-python", default="/tmp/lucent-venv/bin/python")
    parser.add_argument("--lucent-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lucent-units", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.lucent_worker:
        lucent_worker(args)
        return

    import torchvision

    from dissect.errors import RequestError
    from dissect.featurevis import (
        FourierImage,
        PixelImage,
        channel,
        hook_count,
        standard_transforms,
        visualise,
        world_colour_correlation,
    )
    from dissect.hooks import TraceDict
    from dissect.models.segmenter import load_segmenter

    size, steps = args.size, args.steps
    corr = world_colour_correlation()
    seg = load_segmenter()
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    params = {
        "pixels": lambda n: PixelImage(n, 3, size),
        "fourier": lambda n: FourierImage(n, 3, size),
        "fourier+decorrelated": lambda n: FourierImage(n, 3, size, decorrelate=corr),
    }
    robust_gen = [standard_transforms(size) for _ in range(8)]

    def robust(model: torch.nn.Module, layer: str, chans: list[int], images: torch.Tensor) -> torch.Tensor:
        from dissect.featurevis import _activations, _resolve

        obj = channel(layer, chans)
        gen = torch.Generator().manual_seed(1)
        values = []
        with torch.no_grad():
            for ts in robust_gen:
                x = images
                for t in ts:
                    x = t(x, gen)
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                values.append(obj(_activations(model, torch.nn.Module.__call__, x, _resolve(model, obj))))
        return torch.stack(values).mean(0)

    def units_of(model: torch.nn.Module, layers: tuple[str, ...]) -> dict[str, list[int]]:
        """``--units`` channels split over ``layers``, spread over each layer's channels (found by one forward)."""
        with torch.no_grad(), TraceDict(model, layers) as traces:
            model(torch.zeros(1, 3, size, size))
        per = [args.units // len(layers) + (i < args.units % len(layers)) for i in range(len(layers))]
        return {layer: spread(traces[layer].output.shape[1], n) for layer, n in zip(layers, per)}

    table: dict[tuple[str, str, bool], torch.Tensor] = {}
    seconds: dict[tuple[str, str, bool], float] = {}  # per step of a batch of one layer's units
    robust_table: dict[tuple[str, str, bool], torch.Tensor] = {}
    seg_units = units_of(seg, SEGMENTER_LAYERS)
    print(f"{args.units} units per model, {steps} steps, {size}x{size} images, Adam lr 0.05")
    print(f"{'model':10s} {'parameterisation':22s} {'transforms':>10s} | {'median':>7s} {'mean':>7s} {'robust':>7s} | s")
    for model_name, model, units in (("segmenter", seg, seg_units), ("resnet18", resnet, units_of(resnet, RESNET_LAYERS))):
        for pname, make in params.items():
            for transformed in (False, True):
                values, robusts, per_step, start = [], [], [], time.perf_counter()
                for layer, chans in units.items():
                    result = visualise(model, channel(layer, chans), make(len(chans)), steps=steps,
                                       transforms=standard_transforms(size) if transformed else None)
                    values.append(result.values)
                    per_step.append(result.seconds / steps)
                    robusts.append(robust(model, layer, chans, result.images))
                key = (model_name, pname, transformed)
                table[key], robust_table[key] = torch.cat(values), torch.cat(robusts)
                seconds[key] = statistics.median(per_step)
                print(f"{model_name:10s} {pname:22s} {str(transformed):>10s} | {table[key].median():7.3f} "
                      f"{table[key].mean():7.3f} {robust_table[key].mean():7.3f} | {time.perf_counter() - start:.0f}")

    def ratios(model_name: str, a: tuple[str, bool], b: tuple[str, bool]) -> list[float]:
        return (table[(model_name, *a)] / table[(model_name, *b)].clamp_min(1e-6)).tolist()

    summary = {}
    for model_name in ("segmenter", "resnet18"):
        r = ratios(model_name, ("fourier+decorrelated", False), ("pixels", False)) + \
            ratios(model_name, ("fourier+decorrelated", True), ("pixels", True))
        g = [x for p in params for x in ratios(model_name, (p, True), (p, False))]
        rg = [x for p in params for x in (robust_table[(model_name, p, True)]
                                          / robust_table[(model_name, p, False)].clamp_min(1e-6)).tolist()]
        summary[model_name] = (statistics.median(r), statistics.median(g), statistics.median(rg))
        print(f"{model_name}: fourier_decorrelated_vs_pixel {summary[model_name][0]:.3f}, transforms_gain "
              f"{summary[model_name][1]:.3f} (on the untransformed image), {summary[model_name][2]:.3f} (robust)")

    # Time per step: one image, the article's full recipe.
    chans = [seg_units[SEGMENTER_LAYERS[0]][0]]
    per_step = []
    for _ in range(3):
        result = visualise(seg, channel(SEGMENTER_LAYERS[0], chans), FourierImage(1, 3, size, decorrelate=corr),
                           steps=16, transforms=standard_transforms(size))
        per_step.append(result.seconds / 16)
    seconds_per_step = statistics.median(per_step)
    print(f"seconds per step (1 image, {size}px, Fourier + decorrelated + transforms): {seconds_per_step:.4f}")

    # Hooks after many calls, a quarter ending in an exception and a quarter refused before any step.
    def interrupt(step: int, value: float, images: torch.Tensor) -> None:
        raise KeyboardInterrupt

    start = time.perf_counter()
    for i in range(args.hook_calls):
        try:
            objective = channel("down.2.5", 999 if i % 4 == 2 else i % 64)
            visualise(seg, objective, FourierImage(1, 3, 8), steps=1, transforms=standard_transforms(8),
                      callback=interrupt if i % 4 == 1 else None)
        except (KeyboardInterrupt, RequestError):
            pass
    hooks_leaked = hook_count(seg)
    print(f"hooks left after {args.hook_calls} calls: {hooks_leaked} ({time.perf_counter() - start:.0f} s)")

    lucent = run_lucent(args, seg_units)
    status = lucent["status"].split(":")[0] if lucent["status"] != "ran" else "ran"
    if lucent["status"] == "ran":
        ours = torch.cat([table[("segmenter", "fourier+decorrelated", True)]])
        from dissect.featurevis import _activations, _resolve

        theirs = []
        for layer, chans in seg_units.items():
            images = torch.tensor(lucent["results"][layer]["images"])
            obj = channel(layer, chans)
            with torch.no_grad():
                theirs.append(obj(_activations(seg, torch.nn.Module.__call__, images, _resolve(seg, obj))))
        theirs_t = torch.cat(theirs)
        lucent_step = statistics.median(r["seconds_per_step"] for r in lucent["results"].values())
        print(f"lucent {lucent.get('version')}: objective median {theirs_t.median():.3f} (ours {ours.median():.3f}); "
              f"median ratio ours / lucent {statistics.median((ours / theirs_t.clamp_min(1e-6)).tolist()):.3f}; "
              f"{lucent_step:.4f} s per step for a batch of {args.units // 2} (ours "
              f"{seconds[('segmenter', 'fourier+decorrelated', True)]:.4f}); hooks left on the model after "
              f"{lucent['calls']} render_vis calls: {lucent['hooks_after_calls']}")
    else:
        print(f"lucent: {lucent['status']}")
    r, g, _ = summary["segmenter"]
    print(f"bench_featurevis: units={args.units} fourier_decorrelated_vs_pixel={r:.3f} transforms_gain={g:.3f} "
          f"seconds_per_step={seconds_per_step:.4f} hooks_leaked={hooks_leaked} lucent={status}")


if __name__ == "__main__":
    main()
