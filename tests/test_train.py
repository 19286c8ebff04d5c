import math

import torch

from dissect.models.loaders import load
from dissect.models.train import build_parser, checkpoint_path, snapshot_path, train

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
