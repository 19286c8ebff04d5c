import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dissect.errors import ModelError
from dissect.models.loaders import WEIGHTS_DIR, load, load_weights
from dissect.models.train import Trainer, build_parser, checkpoint_path, presence_loss, snapshot_path, train
from dissect.models.world import CLASSES, World

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from diversity import (  # noqa: E402
    latent_agreement,
    layout_iou,
    load_model,
    near_duplicate_pairs,
    near_duplicate_share,
    w_readability,
)

TINY = ["--batch", "4", "--g-channels", "4:16,8:16,16:8,32:8,64:8", "--d-channels", "64:8,32:8,16:8,8:8,4:8",
        "--warmup-steps", "1", "--r1-every", "2", "--sample-every", "0", "--snapshot-every", "0", "--threads", "1",
        "--no-progress"]


def _args(out, steps, *extra):
    return build_parser().parse_args(["--out", str(out), "--steps", str(steps), *TINY, *extra])


def test_few_steps_have_finite_losses_and_write_checkpoint_and_export(tmp_path):
    export = tmp_path / "g.safetensors"
    trainer = train(_args(tmp_path / "run", 4, "--ckpt-every", "2", "--export", str(export)))
    assert trainer.step_count == 4
    assert checkpoint_path(tmp_path / "run").exists() and export.exists()
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert log, "the training log must record the last step"
    stats = trainer.step()
    assert {"regress", "loss_d", "adv", "fm"} <= set(stats) and all(math.isfinite(v) for v in stats.values())
    assert all(torch.isfinite(p).all() for p in trainer.G_ema.parameters())


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight = train(_args(tmp_path / "a", 4, "--ckpt-every", "100"))
    train(_args(tmp_path / "b", 2, "--ckpt-every", "2"))
    resumed = train(_args(tmp_path / "b", 4, "--ckpt-every", "100"))
    assert resumed.step_count == 4
    for (name, p), q in zip(straight.G_ema.state_dict().items(), resumed.G_ema.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    for p, q in zip(straight.D.state_dict().values(), resumed.D.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_ema_snapshots_are_loadable_generators_of_their_step(tmp_path):
    run = tmp_path / "run"
    trainer = train(_args(run, 4, "--snapshot-every", "2"))
    assert sorted(p.name for p in (run / "ema").iterdir()) == ["step-000002.safetensors", "step-000004.safetensors"]
    G, sampler = load(str(snapshot_path(run, 4)))
    assert G(sampler([0, 1])).shape == (2, 3, 64, 64)
    for (name, p), q in zip(trainer.G_ema.state_dict().items(), G.state_dict().values()):
        torch.testing.assert_close(q.float(), p.half().float(), rtol=0, atol=0, msg=name)


def _exported(tmp_path, *extra):
    export = tmp_path / "init.safetensors"
    trainer = train(_args(tmp_path / "init-run", 2, "--export", str(export), *extra))
    return trainer, export


def test_init_from_starts_g_and_its_ema_from_an_exported_generator(tmp_path):
    _, export = _exported(tmp_path)
    G, _ = load(str(export))
    trainer = Trainer(_args(tmp_path / "run", 0, "--init-from", str(export)))
    for (name, p), q, e in zip(G.state_dict().items(), trainer.G.state_dict().values(), trainer.G_ema.state_dict().values()):
        torch.testing.assert_close(q, p.float(), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(e, p.float(), rtol=0, atol=0, msg=name)


def test_init_from_another_architecture_names_both_configurations(tmp_path):
    _, export = _exported(tmp_path)
    other = _args(tmp_path / "run", 0, "--init-from", str(export), "--g-channels", "4:16,8:16,16:8,32:8,64:4")
    with pytest.raises(ModelError, match=r"configuration .*64: 8}.*this run builds .*64: 4}"):
        Trainer(other)


def test_d_warmup_and_adv_weight_zero_give_g_no_adversarial_gradient(tmp_path):
    quiet = ("--warmup-steps", "0", "--regress-weight", "0", "--fm-weight", "0")
    def params(net):  # parameters only: the mapping's w_avg buffer moves with every forward
        return {k: v.detach().clone() for k, v in net.named_parameters()}

    warming = Trainer(_args(tmp_path / "a", 0, *quiet, "--d-warmup-steps", "5"))
    before_g, before_d = params(warming.G), params(warming.D)
    warming.step()
    assert all(torch.equal(before_g[k], v) for k, v in params(warming.G).items())
    assert not all(torch.equal(before_d[k], v) for k, v in params(warming.D).items())
    adversarial = Trainer(_args(tmp_path / "b", 0, *quiet))
    before_g = params(adversarial.G)
    adversarial.step()
    assert not all(torch.equal(before_g[k], v) for k, v in params(adversarial.G).items())
    unweighted = Trainer(_args(tmp_path / "c", 0, *quiet, "--adv-weight", "0"))
    before_g = params(unweighted.G)
    assert math.isfinite(unweighted.step()["adv"])  # reported, but weighs nothing
    assert all(torch.equal(before_g[k], v) for k, v in params(unweighted.G).items())


def test_class_weighted_l1_has_mean_weight_one_per_pixel_and_weighs_small_classes_more(tmp_path):
    trainer = Trainer(_args(tmp_path / "run", 0, "--l1-class-power", "0.5"))
    _, labels = trainer.world.render(trainer.world.sample_latents(range(-200, 0)))
    assert trainer.pixel_weights[labels].mean().item() == pytest.approx(1.0, abs=1e-4)
    sky, spire = trainer.pixel_weights[CLASSES.index("sky")], trainer.pixel_weights[CLASSES.index("spire")]
    assert spire > 5 * sky
    assert math.isfinite(trainer.step()["regress"])


def test_segmenter_losses_train_g_and_leave_the_segmenter_frozen(tmp_path):
    trainer = Trainer(_args(tmp_path / "run", 0, "--warmup-steps", "0", "--seg-weight", "1", "--div-weight", "1",
                            "--presence-weight", "1"))
    seg_before = copy.deepcopy(trainer.seg.state_dict())
    stats = trainer.step()
    assert {"seg", "div", "presence"} <= set(stats) and all(math.isfinite(v) for v in stats.values())
    assert all(torch.equal(seg_before[k], v) for k, v in trainer.seg.state_dict().items())
    assert not any(p.requires_grad for p in trainer.seg.parameters())


def test_diversity_hinge_is_the_world_pair_distance_g_falls_short_of(tmp_path):
    trainer = Trainer(_args(tmp_path / "run", 0, "--seg-weight", "1", "--div-weight", "1"))
    image = torch.zeros(1, 3, 64, 64)
    labels = torch.zeros(4, 64, 64, dtype=torch.long)
    labels[2, :16] = 1  # pair (0, 2) differs on a quarter of the pixels in the world; pair (1, 3) not at all
    same = trainer._segmenter_losses(image.expand(4, -1, -1, -1), labels)
    assert same["div"].item() == pytest.approx(0.25 / 2)  # identical fakes: the whole world distance is missing
    assert trainer._segmenter_losses(image.expand(4, -1, -1, -1), torch.zeros_like(labels))["div"].item() == 0.0


def test_presence_loss_charges_a_spurious_fragment_and_a_missing_object_alike():
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, 40:44, 40:44] = CLASSES.index("dome")  # image 0 shows a dome (16 pixels), image 1 none
    exact = F.one_hot(labels, len(CLASSES)).permute(0, 3, 1, 2).float() * 30
    assert presence_loss(exact, labels).item() < 1e-3
    spurious, missing = exact.clone(), exact.clone()
    spurious[1, CLASSES.index("dome"), 10:13, 10:14] = 60  # a 12-pixel fragment on image 1's sky
    missing[0, :, 40:44, 40:44] = exact[1, :, 40:44, 40:44]  # image 0's dome reads as sky
    charged = [presence_loss(x, labels).item() for x in (spurious, missing)]
    assert charged[0] > 0.3 and charged[1] > 0.3
    assert charged[0] == pytest.approx(charged[1], rel=0.05)
    one_pixel = exact.clone()
    one_pixel[1, CLASSES.index("dome"), 10, 10] = 60  # under the presence rule's 10 pixels: charged less
    assert presence_loss(one_pixel, labels).item() < charged[0] / 5


def test_near_duplicate_pairs_and_share_come_from_one_matrix():
    labels = torch.zeros(4, 10, 10, dtype=torch.long)
    labels[1, 0, :4] = 1  # 96% like image 0
    labels[2, :3] = 1  # 70% like image 0
    labels[3] = 2
    assert near_duplicate_pairs(labels) == [(0, 1)]
    assert near_duplicate_share(labels) == pytest.approx(2 / 12)
    assert near_duplicate_pairs(labels[2:]) == []


def test_benchmarks_name_a_model_file_that_is_not_a_generator(tmp_path):
    with pytest.raises(SystemExit, match=r"segmenter.safetensors' is not a generator .*no generator configuration"):
        load_model(str(WEIGHTS_DIR / "segmenter.safetensors"))
    _, export = _exported(tmp_path)
    state, metadata = load_weights(export)
    del state["synthesis.b8.conv0.affine.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata=metadata)
    with pytest.raises(SystemExit, match=r"missing keys \['synthesis.b8.conv0.affine.weight'\]"):
        load_model(str(broken))


def test_latent_agreement_is_high_for_the_world_itself_and_low_for_a_generator_that_ignores_z():
    world = World(64)
    z = world.sample_latents(range(64))
    images, labels = world.render(z)
    own = latent_agreement(images, labels, z)
    assert set(own) == {"watermark", "spire", "dome", "tree", "dusk"} and min(own.values()) >= 0.95
    shuffled = latent_agreement(images, labels, z.roll(1, 0))  # every image judged against another scene's facts
    assert sum(shuffled.values()) / len(shuffled) < 0.8


def test_layout_iou_is_one_for_the_world_itself_and_low_against_other_scenes():
    world = World()
    _, labels = world.render(world.sample_latents(range(40)))
    own = layout_iou(labels, labels)
    assert "sky" not in own and all(v == 1.0 for v in own.values() if v == v)
    other = layout_iou(labels, labels.roll(1, 0))
    assert other["wall"] < 0.5 and other["tree"] < 0.5


def test_w_readability_is_high_for_a_mapping_that_keeps_z_and_chance_for_one_that_drops_it():
    kept = w_readability(lambda z: z * 3.0 + 1.0, n=1000)  # 800 fits of 128 features: below 3000's 0.98
    assert kept["dusk"][0] >= 0.85 and kept["watermark"][0] >= 0.85
    assert all(abs(a - b) < 1e-9 for a, b in kept.values())  # an affine map of z reads as z
    dropped = w_readability(lambda z: torch.randn(len(z), 8, generator=torch.Generator().manual_seed(0)), n=1000)
    assert dropped["dusk"][0] < 0.8 <= dropped["dusk"][1]


def test_a_pack_carries_the_run_in_fp16_and_resumes_where_it_stopped(tmp_path, capsys):
    from dissect.models.train import load_pack

    pack = tmp_path / "run.safetensors"
    packed = train(_args(tmp_path / "a", 3, "--pack", str(pack)))
    loaded = Trainer(_args(tmp_path / "b", 5))
    load_pack(loaded, pack)
    assert loaded.step_count == 3
    assert torch.equal(loaded.latents.get_state(), packed.latents.get_state())
    for net in ("G", "G_ema", "D"):
        for (name, p), q in zip(getattr(packed, net).state_dict().items(), getattr(loaded, net).state_dict().values()):
            torch.testing.assert_close(q, p.half().to(p.dtype), rtol=0, atol=0, msg=f"{net}.{name}")
    capsys.readouterr()
    assert train(_args(tmp_path / "b", 5, "--from-pack", str(pack))).step_count == 5
    assert f"started from {pack} at step 3" in capsys.readouterr().out


def test_a_pack_without_the_mapping_skip_or_d_condition_continues_as_the_same_function_and_they_learn(tmp_path):
    from dissect.models.train import load_pack

    pack = tmp_path / "run.safetensors"
    packed = train(_args(tmp_path / "a", 2, "--pack", str(pack)))
    widened = Trainer(_args(tmp_path / "b", 3, "--mapping-skip", "--cond-d", "--cond-d-hidden", "8"))
    load_pack(widened, pack)
    assert widened.G.config["mapping_skip"] and not widened.G.mapping.skip.weight.any()
    assert not widened.D.cond_embed.weight.any() and not widened.D.cond_mlp[2].weight.any()
    z = torch.randn(4, widened.G.z_dim)
    with torch.no_grad():
        for net in ("G", "G_ema"):
            ref = copy.deepcopy(getattr(packed, net)).half().float().eval()
            torch.testing.assert_close(getattr(widened, net).eval()(z), ref(z), rtol=1e-5, atol=1e-5)
        images = packed.G_ema(z)
        ref = copy.deepcopy(packed.D).half().float().eval()
        torch.testing.assert_close(widened.D.eval()(images, z[:, :49]), ref(images), rtol=1e-4, atol=1e-4)
    widened.G.train(), widened.D.train()
    stats = widened.step()
    assert math.isfinite(stats["mismatch"])
    assert widened.G.mapping.skip.weight.abs().sum() > 0, "the skip path must learn"
    assert widened.D.cond_embed.weight.abs().sum() > 0, "the projection must learn"
    assert widened.D.cond_mlp[2].weight.abs().sum() > 0, "the MLP embedding must learn"
    with pytest.raises(ValueError, match="pass --cond-d as well"):
        Trainer(_args(tmp_path / "e", 3, "--cond-d-hidden", "8"))
    skip_pack = tmp_path / "skip.safetensors"
    train(_args(tmp_path / "c", 1, "--mapping-skip", "--pack", str(skip_pack)))
    with pytest.raises(ModelError, match="is not a pack of this run's generator configuration"):
        load_pack(Trainer(_args(tmp_path / "d", 3)), skip_pack)  # a run cannot drop a learnt path


def test_a_pack_of_another_configuration_or_a_broken_file_is_refused_by_name(tmp_path):
    pack = tmp_path / "run.safetensors"
    train(_args(tmp_path / "a", 1, "--pack", str(pack)))
    wide = ["--g-channels", "4:16,8:16,16:16,32:8,64:8"]
    with pytest.raises(ModelError, match=r"run.safetensors is not a pack of this run's generator configuration"):
        train(_args(tmp_path / "b", 2, "--from-pack", str(pack), *wide))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(pack.read_bytes()[:100])
    with pytest.raises(ModelError, match="broken.safetensors is not a readable safetensors file"):
        train(_args(tmp_path / "c", 2, "--from-pack", str(broken)))


def test_channels_last_runs_resume_exactly_and_export_plain_generators(tmp_path):
    straight = train(_args(tmp_path / "a", 4, "--ckpt-every", "100", "--channels-last"))
    assert straight.G.synthesis.b8.conv0.conv.weight.is_contiguous(memory_format=torch.channels_last)
    train(_args(tmp_path / "b", 2, "--ckpt-every", "2", "--channels-last"))
    export = tmp_path / "g.safetensors"
    resumed = train(_args(tmp_path / "b", 4, "--ckpt-every", "100", "--channels-last", "--export", str(export)))
    for (name, p), q in zip(straight.G_ema.state_dict().items(), resumed.G_ema.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    G = load_weights(export)[0]
    for name, p in resumed.G_ema.state_dict().items():
        torch.testing.assert_close(G[name].float(), p.half().float(), rtol=0, atol=0, msg=name)
