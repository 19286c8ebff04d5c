"""The `dissect` command line, run in-process on a small random generator behind an entry point of this module."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dissect import cli
from dissect.cli import main
from dissect.errors import ModelError
from dissect.hooks import layers
from dissect.models.loaders import LatentSampler
from dissect.models.segmenter import Segmenter, load_segmenter, save_segmenter
from dissect.models.stylegan import Generator
from dissect.rewrite import read_edits

LAYER = "synthesis.b16.conv1"


def _generator(seed: int) -> tuple[Generator, LatentSampler]:
    torch.manual_seed(seed)
    G = Generator(z_dim=32, w_dim=32, resolution=64, channels={4: 32, 8: 32, 16: 16, 32: 8, 64: 8}).eval()
    return G, LatentSampler(32, "tiny")


def tiny_model() -> tuple[Generator, LatentSampler]:
    return _generator(0)


def other_model() -> tuple[Generator, LatentSampler]:
    """The same architecture with other weights: edits made for tiny_model must be refused."""
    return _generator(1)


def raising_model() -> tuple[Generator, LatentSampler]:
    raise RuntimeError("no checkpoint at /data/g.pt")


class _Names:
    description = "names, not latents"

    def __call__(self, seeds):
        return [f"seed {s}" for s in seeds]


def wrong_sampler() -> tuple[Generator, _Names]:
    return _generator(0)[0], _Names()


TINY = f"{__name__}:tiny_model"
OTHER = f"{__name__}:other_model"
SUBCOMMANDS = ["layers", "stats", "clusters", "rewrite", "eval"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def segmenter_path(workdir):
    torch.manual_seed(0)
    path = workdir / "segmenter.safetensors"
    save_segmenter(Segmenter().eval(), path)
    return path


@pytest.fixture(scope="module")
def request_path(workdir):
    path = workdir / "request.json"
    path.write_text(json.dumps({
        "layer": LAYER,
        "copy": {"seed": 3, "box": [8, 8, 24, 24]},
        "paste": {"seed": 7, "center": [40, 40]},
        "context": {"rank": 2, "regions": [{"seed": 1, "box": [0, 0, 20, 20]}, {"seed": 2, "box": [30, 30, 50, 60]}]},
    }))
    return path


@pytest.fixture(scope="module")
def solved(workdir, request_path):
    """A request solved, saved as an edit file, and exported: (edit file, exported weights, stdout)."""
    edit, weights = workdir / "edit.safetensors", workdir / "edited.safetensors"
    args = ["rewrite", "--model", TINY, "--edit", str(request_path), "--stats-n", "32",
            "--cache-dir", str(workdir / "cache"), "--save-edit", str(edit), "--export", str(weights)]
    assert main(args) == 0
    return edit, weights


def _run(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [[]] + [[c] for c in SUBCOMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dissect {command[0]}" if command else "usage: dissect")
    if command == ["rewrite"]:
        assert all(f'"{kind}"' in out for kind in ("copy", "erase", "pairs", "output_target"))  # the request format


def test_layers_lists_every_editable_layer(capsys):
    code, out, _ = _run(capsys, ["layers", "--model", TINY])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "type", "in", "out", "kernel", "output"]
    G, sampler = tiny_model()
    assert len(lines) == 1 + len(layers(G, sampler([0])))
    row = next(line.split() for line in lines if line.startswith(LAYER + " "))
    assert row == [LAYER, "ModulatedConv2d", "16", "16", "3x3", "16x16"]


def test_stats_creates_and_reuses_a_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["stats", "--model", TINY, "--layer", LAYER, "--n", "16", "--cache-dir", str(cache)]
    code, out, _ = _run(capsys, args)
    assert code == 0 and "16x16" in out and str(cache) in out
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    stamp = files[0].stat().st_mtime_ns
    code, again, _ = _run(capsys, args)
    assert code == 0 and again == out
    assert list(cache.iterdir()) == files and files[0].stat().st_mtime_ns == stamp


def test_rewrite_exports_edited_weights_and_edit_files_reproduce_them(solved, workdir, capsys):
    edit, weights = solved
    base = tiny_model()[0].state_dict()
    edited = load_file(str(weights))
    # The edited layer's demodulation stays at the base weight, and the export says so.
    assert set(edited) == set(base) | {f"{LAYER}.demod_reference"}
    base_norms = base[f"{LAYER}.conv.weight"].square().sum(dim=(2, 3))
    assert torch.equal(edited[f"{LAYER}.demod_reference"], base_norms)
    changed = {k for k in base if not torch.equal(base[k], edited[k])}
    assert changed == {f"{LAYER}.conv.weight"}

    again = workdir / "again.safetensors"
    code, out, _ = _run(capsys, ["rewrite", "--model", TINY, "--edit", str(edit), "--export", str(again)])
    assert code == 0 and f"{LAYER}: rank 2" in out
    reproduced = load_file(str(again))
    assert all(torch.equal(reproduced[k], edited[k]) for k in edited)


def test_rewrite_solves_an_erase_request_with_a_png_mask(tmp_path, capsys):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[40:56, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "mark.png")
    request = tmp_path / "erase.json"
    request.write_text(json.dumps([{"layer": LAYER, "erase": {"units": 4, "regions": [
        {"seed": 5, "mask": "mark.png"}, {"seed": 6, "box": [40, 8, 56, 40]}]}}]))
    edit = tmp_path / "erase.safetensors"
    code, out, _ = _run(capsys, ["rewrite", "--model", TINY, "--edit", str(request), "--no-refine", "--stats-n", "16",
                                 "--cache-dir", str(tmp_path / "cache"), "--save-edit", str(edit)])
    assert code == 0 and f"{LAYER}: rank 1, closed_form, strength 1;" in out and edit.is_file()


def test_rewrite_reads_pointwise_and_strength_from_a_request(tmp_path, capsys):
    request = tmp_path / "erase.json"
    request.write_text(json.dumps({"layer": LAYER, "pointwise": True, "strength": 2.5,
                                   "erase": {"units": 4, "regions": [{"seed": 6, "box": [40, 8, 56, 40]}]}}))
    edit = tmp_path / "erase.safetensors"
    code, out, _ = _run(capsys, ["rewrite", "--model", TINY, "--edit", str(request), "--no-refine", "--stats-n", "16",
                                 "--cache-dir", str(tmp_path / "cache"), "--save-edit", str(edit)])
    assert code == 0 and f"{LAYER}: rank 1, closed_form, pointwise, strength 2.5;" in out
    (saved,) = read_edits(str(edit))
    assert saved.pointwise and saved.strength == 2.5


def test_rewrite_refuses_an_edit_made_for_another_model(solved, workdir, capsys):
    code, _, err = _run(capsys, ["rewrite", "--model", OTHER, "--edit", str(solved[0]),
                                 "--export", str(workdir / "x.safetensors")])
    assert code == 2 and "sha256" in err and err.count("\n") == 1
    assert not (workdir / "x.safetensors").exists()


def test_eval_reports_classes_before_and_after(solved, segmenter_path, capsys):
    code, out, _ = _run(capsys, ["eval", "--model", TINY, "--edit", str(solved[0]), "--n", "4", "--batch-size", "4",
                                 "--segmenter", str(segmenter_path), "--classes", "watermark,tree"])
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["watermark"], ["tree"])}
    assert set(rows) == {"watermark", "tree"} and all(len(r) == 4 for r in rows.values())
    change = float(out.rsplit("mean |pixel change|", 1)[1].split()[0])
    assert change > 0  # the edit changes the renders


def test_clusters_names_clusters_and_writes_png(tmp_path, segmenter_path, capsys):
    out_png = tmp_path / "grid" / "clusters.png"
    code, out, _ = _run(capsys, ["clusters", "--model", TINY, "--layer", LAYER, "--k", "3", "--n", "6",
                                 "--per-image", "32", "--stats-n", "16", "--cache-dir", str(tmp_path / "cache"),
                                 "--segmenter", str(segmenter_path), "--show", "4", "--out", str(out_png)])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["cluster", "class", "IoU", "locations"]
    assert sorted(int(line.split()[0]) for line in lines[1:4]) == [0, 1, 2]
    with Image.open(out_png) as image:
        assert image.mode == "RGB" and image.height >= 128


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["layers", "--model", "nope"], "Unknown model 'nope'"),
        (["layers", "--model", "no_such_module_xyz:fn"], "Could not import"),
        (["stats", "--model", TINY, "--layer", "synthesis.b16.convX"], "no layer named 'synthesis.b16.convX'"),
        (["stats", "--model", TINY, "--layer", "synthesis"], "cannot be viewed as a memory"),
        (["rewrite", "--model", TINY, "--edit", "{tmp}/missing.safetensors", "--export", "{tmp}/o"], "No edit file"),
        (["rewrite", "--model", TINY, "--edit", "{tmp}/garbage.safetensors", "--export", "{tmp}/o"],
         "garbage.safetensors"),
        (["rewrite", "--model", TINY, "--edit", "{tmp}/bad.json", "--export", "{tmp}/o"],
         "names exactly one kind, one of the keys 'paste', 'erase'"),
        (["rewrite", "--model", TINY, "--edit", "{tmp}/garbage.safetensors"], "Nothing to write"),
        (["rewrite", "--model", TINY, "--edit", "{tmp}/weak.json", "--export", "{tmp}/o"], "'strength' is a positive"),
        (["layers", "--model", f"{__name__}:raising_model"],
         f"Entry point '{__name__}:raising_model' raised RuntimeError: no checkpoint at /data/g.pt"),
        (["layers", "--model", f"{__name__}:wrong_sampler"], "returned list for sampler([0])"),
        (["rewrite", "--model", TINY, "--edit", "{tmp}/seed.json", "--export", "{tmp}/o"],
         "seed 'x' in seed.json copy.seed is not an integer"),
        (["rewrite", "--model", TINY, "--edit", "{tmp}/units.json", "--export", "{tmp}/o"],
         "units.json [0]: erase: 'units' is a positive whole number of key channels, got 2.5"),
    ],
)
def test_user_errors_are_one_line_with_status_2(args, message, tmp_path, capsys):
    (tmp_path / "garbage.safetensors").write_text("not safetensors")
    (tmp_path / "bad.json").write_text(json.dumps({"layer": LAYER, "copy": {"seed": 1, "box": [0, 0, 8, 8]}}))
    (tmp_path / "weak.json").write_text(json.dumps({"layer": LAYER, "strength": 0, "erase": {
        "regions": [{"seed": 1, "box": [0, 0, 8, 8]}]}}))
    (tmp_path / "seed.json").write_text(json.dumps({"layer": LAYER, "copy": {"seed": "x", "box": [0, 0, 8, 8]},
                                                    "paste": {"seed": 2}}))
    (tmp_path / "units.json").write_text(json.dumps([{"layer": LAYER, "erase": {
        "units": 2.5, "regions": [{"seed": 1, "box": [0, 0, 8, 8]}]}}]))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    # Never the user's cache, should a command get as far as collecting statistics.
    code, out, err = _run(capsys, args if args[0] == "layers" else [*args, "--cache-dir", str(tmp_path)])
    assert code == 2
    assert err.startswith(f"dissect {args[0]}: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err


def test_bad_arguments_and_traceback_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["stats", "--model", TINY])  # --layer missing
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--edit", "x", "--n", "0"])
    assert exit_.value.code == 2
    with pytest.raises(ModelError, match="Unknown model"):
        main(["layers", "--model", "nope", "--traceback"])


def test_a_bug_shows_its_traceback(monkeypatch):
    def broken(args):
        raise TypeError("a bug, not a user mistake")

    monkeypatch.setattr(cli, "cmd_layers", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["layers", "--model", TINY])


@pytest.mark.parametrize(("context", "message"), [
    ({"rank": 17}, "Rank 17 is above the key dimension of layer 'synthesis.b16.conv1': its keys have 16 channels"),
    ({"rank": 2, "regions": [{"seed": 1, "box": [0, 0, 4, 4]}]}, "Rank 2 needs at least 2 context keys"),
    ({"rank": "2"}, "rank '2' in rank.json context.rank is not an integer"),
])
def test_requests_are_refused_before_c_is_collected(context, message, tmp_path, capsys):
    context = {"regions": [{"seed": 1, "box": [0, 0, 32, 32]}], **context}
    (tmp_path / "rank.json").write_text(json.dumps({"layer": LAYER, "erase": {
        "units": 4, "regions": [{"seed": 1, "box": [0, 0, 8, 8]}]}, "context": context}))
    cache = tmp_path / "cache"
    code, _, err = _run(capsys, ["rewrite", "--model", TINY, "--edit", str(tmp_path / "rank.json"), "--export",
                                 str(tmp_path / "o"), "--cache-dir", str(cache)])
    assert code == 2 and message in err and err.count("\n") == 1
    assert not cache.exists() or not list(cache.iterdir())  # C was never collected


def test_erase_units_above_the_key_dimension_are_refused_before_c(tmp_path, capsys):
    (tmp_path / "units.json").write_text(json.dumps({"layer": LAYER, "erase": {
        "units": 40, "regions": [{"seed": 1, "box": [0, 0, 8, 8]}]}}))
    code, _, err = _run(capsys, ["rewrite", "--model", TINY, "--edit", str(tmp_path / "units.json"), "--export",
                                 str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "units 40 in units.json erase.units is not between 1 and the key dimension" in err
    assert not (tmp_path / "cache").exists()


def test_the_statistics_cache_location_is_the_librarys():
    from dissect.stats import DEFAULT_CACHE_DIR

    stats = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["stats"]._actions
                 if a.dest == "cache_dir")
    assert stats.default == DEFAULT_CACHE_DIR


def test_eval_counts_presence_by_the_one_rule_and_prints_the_scale(solved, segmenter_path, tmp_path, capsys):
    from dissect import measure
    from dissect.cli import FRESH_SEEDS

    args = ["eval", "--model", TINY, "--edit", str(solved[0]), "--n", "4", "--batch-size", "4", "--segmenter",
            str(segmenter_path), "--cache-dir", str(tmp_path), "--classes", "sky,watermark", "--unrelated", "watermark"]
    code, out, _ = _run(capsys, args)
    assert code == 0 and "presence rule (watermark 48" in out and "noise re-render" in out and "different image" in out
    labels = measure.render(tiny_model()[0], tiny_model()[1], range(FRESH_SEEDS, FRESH_SEEDS + 4),
                            load_segmenter(path=segmenter_path)).labels
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] in (["sky"], ["watermark"])}
    assert rows == {name: f"{measure.prevalence(labels, name):.1%}" for name in ("sky", "watermark")}
    assert len(list(tmp_path.glob("scale-*.json"))) == 1  # the base model's scale, cached with the statistics
    code, out, _ = _run(capsys, args + ["--min-pixels", "1"])
    assert code == 0 and "at least 1 pixels" in out


# -- value targets in the JSON: explicit pairs on the generator, an output target on a classifier ---------------

PLAIN = f"{LAYER}.conv"  # the generator layer's own weight: value targets store there, not through its rest


class _Images:
    description = "tiny images 3x32x32"

    def __call__(self, seeds):
        return torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in seeds])


def tiny_classifier() -> tuple[torch.nn.Module, _Images]:
    """Logits (N, 4) from images: no image output, masks at the input's resolution."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))
    return model.eval(), _Images()


CLASSIFIER = f"{__name__}:tiny_classifier"


def _rewrite_request(tmp_path, capsys, model, request, *extra):
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    edit = tmp_path / "edit.safetensors"
    code, out, err = _run(capsys, ["rewrite", "--model", model, "--edit", str(path), "--stats-n", "16",
                                   "--cache-dir", str(tmp_path / "cache"), "--save-edit", str(edit), *extra])
    return code, out, err, edit


def test_rewrite_stores_pairs_from_value_seeds(tmp_path, capsys):
    from dissect.memory import LayerMemory
    from dissect.rewrite import Rewriter
    from dissect.valuetargets import Pairs

    box = [16, 16, 40, 40]
    code, out, err, edit = _rewrite_request(tmp_path, capsys, TINY, {
        "layer": PLAIN, "pairs": {"regions": [{"seed": 3, "box": box}, {"seed": 4, "box": box}], "values_from": [5, 6]},
    })
    assert code == 0, err
    assert f"{PLAIN}: rank 1, closed_form, strength 1;" in out
    (saved,) = read_edits(str(edit))
    request = saved.request["target"]
    assert isinstance(request, Pairs) and request.seeds == [3, 4] and request.value_seeds == [5, 6]

    # Applied, the weight's output in the boxes moves towards what it emits for the value seeds there.
    model, sampler = tiny_model()
    memory = LayerMemory(model, PLAIN)
    keys_in, wanted = sampler([3, 4]), memory.record(sampler([5, 6])).linear
    inside = torch.zeros(wanted.shape[-2:], dtype=torch.bool)
    scale = wanted.shape[-1] / 64
    inside[int(box[0] * scale) : int(box[2] * scale), int(box[1] * scale) : int(box[3] * scale)] = True
    before = (memory.record(keys_in).linear - wanted)[..., inside].square().mean()
    Rewriter(model).apply(saved)
    after = (memory.record(keys_in).linear - wanted)[..., inside].square().mean()
    assert after < 0.9 * before


def test_rewrite_stores_an_output_target_on_a_classifier(tmp_path, capsys):
    from dissect.rewrite import Rewriter
    from dissect.valuetargets import OutputTarget

    regions = [{"seed": s, "box": [8, 8, 24, 24]} for s in (1, 2, 3)]
    code, out, err, edit = _rewrite_request(tmp_path, capsys, CLASSIFIER, {
        "layer": "2", "output_target": {"regions": regions, "targets": [3, 3, 3]}, "budget": 0.2,
    })
    assert code == 0, err
    (saved,) = read_edits(str(edit))
    assert isinstance(saved.request["target"], OutputTarget) and saved.request["target"].targets.tolist() == [3, 3, 3]

    model, sampler = tiny_classifier()
    with torch.no_grad():
        before = model(sampler([1, 2, 3])).softmax(-1)[:, 3]
        Rewriter(model).apply(saved)
        after = model(sampler([1, 2, 3])).softmax(-1)[:, 3]
    assert (after > before).all()


@pytest.mark.parametrize("body, message", [
    ({"pairs": {"regions": [{"seed": 3, "box": [16, 16, 40, 40]}], "values_from": [5, 6]}},
     "'values_from' lists one seed per key seed (1)"),
    ({"pairs": {"regions": [{"seed": 3, "box": [16, 16, 40, 40]}]}}, "'values_from' lists one seed per key seed"),
    ({"output_target": {"regions": [{"seed": 3, "box": [8, 8, 24, 24]}], "targets": [9]}},
     "targets must be indices in [0, 4)"),
    ({"output_target": {"regions": [{"seed": 3, "box": [8, 8, 24, 24]}], "targets": ["dome"]}},
     "'targets' lists one class or token index per seed"),
])
def test_value_target_requests_are_refused_in_one_line_before_c(body, message, tmp_path, capsys):
    model, layer = (TINY, PLAIN) if "pairs" in body else (CLASSIFIER, "2")
    code, _, err, edit = _rewrite_request(tmp_path, capsys, model, {"layer": layer, **body})
    assert code == 2 and message in err and err.count("\n") == 1 and not edit.exists()
    assert not (tmp_path / "cache").exists()  # refused before C was collected


def test_image_regions_on_a_layer_without_a_key_map_are_refused(tmp_path, capsys):
    code, _, err, _ = _rewrite_request(tmp_path, capsys, CLASSIFIER, {
        "layer": "6", "output_target": {"regions": [{"seed": 1, "box": [8, 8, 24, 24]}], "targets": [3]}})
    assert code == 2 and "layer '6' has no 2-D key map" in err and err.count("\n") == 1


def test_a_paste_by_appearance_from_json(workdir, segmenter_path, capsys):
    spec = {"layer": LAYER, "copy": {"seed": 3, "box": [8, 8, 24, 24]},
            "paste": {"seed": 7, "region": {"box": [30, 30, 46, 46]}, "by": "appearance"},
            "context": {"rank": 2, "regions": [{"seed": 1, "box": [0, 0, 20, 20]}, {"seed": 2, "box": [30, 30, 50, 60]}]}}
    path, edit = workdir / "look.json", workdir / "look.safetensors"
    args = ["rewrite", "--model", TINY, "--edit", str(path), "--stats-n", "32", "--cache-dir", str(workdir / "cache"),
            "--segmenter", str(segmenter_path), "--save-edit", str(edit)]
    path.write_text(json.dumps(spec))
    code, _, err = _run(capsys, args)
    assert code == 0, err
    (saved,) = read_edits(str(edit))
    target = saved.request["target"]
    assert type(target).__name__ == "Shift" and target.seeds == [7, 1, 2] and target.source == [3]
    assert target.masks[0].sum() == 16 * 16  # the paste's region, then the context's regions
    # Refused before any solve, naming the fix: an unknown way to paste, and appearance without a region.
    for change, message in (({"by": "colour"}, "'by' in 'paste'"), ({"region": None}, 'needs "region"')):
        paste = {k: v for k, v in {**spec["paste"], **change}.items() if v is not None}
        path.write_text(json.dumps({**spec, "paste": paste}))
        code, _, err = _run(capsys, args)
        assert code != 0 and message in err, err
