"""Train the embedded generator on the scene world: ``python -m dissect.models.train``.

Losses: the non-saturating GAN loss, lazy R1 on the discriminator, and two paired side losses that pull
G(z) towards the world's own render of the same latent (the world reads every random choice from z).
Pixel L1 regression alone stays blurred; as a warm start and side loss it keeps the large modes (dusk skies,
layouts), but it barely notices small ones: the watermark covers under 2% of the pixels, and adversarial
training dropped it (in 31% of samples at step 1700, 1% at 4500). Feature matching, as in pix2pixHD but
paired, compares the discriminator's features of G(z) and of the world's render of z, so a mode weighs as
much as the discriminator attends to it. An EMA copy of G is what gets shipped.

Those losses kept the large modes but not the small ones: the step-9500 generator follows its latent for dusk
(92% agreement with the world's facts for the same z) but not for watermark, spire, dome or tree (46-56%,
chance level), so it samples those from a few memorised layouts (issue 16). Two optional terms target that,
both through the frozen shipped segmenter: ``--seg-weight`` (class-weighted cross-entropy of the segmenter's
logits on G(z) against the world's labels for z: a paired loss where a spire or watermark weighs by its
class, not its pixel count) and ``--div-weight`` (a diversity-sensitive hinge, after the mode-seeking loss of
Mao et al. 2019: a pair of G's label maps must differ at least as much as the world's pair for the same two
latents). ``--presence-weight`` asks of each class what the presence rule asks (session 11: the class-weighted
cross-entropy charges a spurious dome on sky at sky's small weight, and domes stayed 30% over the world's rate).
``--l1-class-power`` weighs the pixel L1 by the class of the world's pixel, so small objects count
without the segmenter. ``--init-from`` starts G from an exported generator; ``--d-warmup-steps`` then trains
the fresh discriminator alone for a while.

Two more reasons G ignored z (session 8): the mapping MLP scrambles a latent whose entries are already the
scene's factors (``--mapping-skip`` adds a linear z -> w path), and an unconditional D accepts any realistic
image for any z, so the adversary never asks G to follow it (``--cond-d``: a projection discriminator on the
world's latent entries, with real images under another scene's latent as extra fakes).

Checkpoints are resumable and written atomically under ``--out`` (default ``~/.cache/dissect/train-spires``):
run the same command again and it continues from the latest one. A cache does not always survive to the next
machine, so ``--pack FILE`` writes a run's state small enough to commit (G, its EMA and D in fp16, the step and
the random states; 15 MB against the checkpoint's 56), and ``--from-pack FILE`` starts a run from it where
``--out`` holds no checkpoint. The optimisers restart: with Adam's beta1 = 0 only the squared-gradient average
is lost, and it is re-estimated within a few hundred steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image
from tqdm import tqdm

from ..errors import ModelError
from .loaders import load_generator, load_state_dict, load_weights
from .segmenter import Segmenter, load_segmenter, presence_threshold, present
from .stylegan import Discriminator, Generator
from .world import CLASSES, World

DEFAULT_OUT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dissect" / "train-spires"


def parse_channels(text: str) -> dict[int, int]:
    """``"4:256,8:256,16:128"`` -> ``{4: 256, 8: 256, 16: 128}``."""
    try:
        return {int(k): int(v) for k, v in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"channels must look like '4:256,8:256,16:128', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dissect.models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint and sample folder")
    p.add_argument("--steps", type=int, default=10000, help="total optimisation steps (resumes count)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--g-channels", type=parse_channels, default=parse_channels("4:256,8:256,16:128,32:64,64:32"))
    p.add_argument("--d-channels", type=parse_channels, default=parse_channels("64:24,32:48,16:96,8:192,4:192"))
    p.add_argument("--mapping-skip", action="store_true",
                   help="add a linear path from z to w beside the mapping MLP (stylegan.MappingNetwork), so w keeps "
                        "the world's factors; a --from-pack run without it continues with the path at zero")
    p.add_argument("--cond-d", action="store_true",
                   help="a projection discriminator conditioned on the world's latent entries, also shown real images "
                        "with another image's latent as fakes (GAN-CLS), so the adversary itself asks G to follow z; "
                        "a --from-pack run without it continues with the projection at zero")
    p.add_argument("--cond-d-hidden", type=int, default=0,
                   help="with --cond-d, also an MLP embedding of the condition with this many hidden units (a dome is "
                        "a band of its roof entry, which a linear embedding cannot single out); added at zero")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--mapping-lr-mul", type=float, default=0.01, help="the mapping network learns slower")
    p.add_argument("--warmup-steps", type=int, default=300, help="steps of pure regression before the GAN loss")
    # At 2.0 the adversarial term (~3) outweighed the side loss (~0.6) and G collapsed towards one layout
    # by step 1000 on CPU; 8 keeps the two comparable.
    p.add_argument("--regress-weight", type=float, default=8.0, help="L1 side loss weight after warm-up")
    p.add_argument("--adv-weight", type=float, default=1.0,
                   help="weight of G's adversarial loss after warm-up; below 1 the paired terms lead (D dominated "
                        "run e, and its samples followed z less from step 4000 to 5000)")
    p.add_argument("--fm-weight", type=float, default=10.0,
                   help="feature matching after warm-up: L1 between D's features of G(z) and of the world's render "
                        "of z, which weighs small modes such as the watermark by how much D attends to them "
                        "(pixel L1 barely notices them); 0: off")
    p.add_argument("--seg-weight", type=float, default=0.0,
                   help="after warm-up: class-weighted cross-entropy of the frozen segmenter's logits on G(z) against "
                        "the world's labels for z; 0: off")
    p.add_argument("--div-weight", type=float, default=0.0,
                   help="after warm-up: hinge that makes each pair of G's label maps (segmenter probabilities) differ "
                        "at least as much as the world's label maps of the same latents; 0: off")
    p.add_argument("--presence-weight", type=float, default=0.0,
                   help="after warm-up: per image and class, binary cross-entropy between the mean of the segmenter's "
                        "top-K probabilities for the class (K: the presence rule's pixel count) and whether the "
                        "world's scene for z shows it; unlike the pixel cross-entropy it weighs a spurious fragment "
                        "as much as a missing object; 0: off")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start G (and its EMA) from this exported generator (safetensors); ignored on resume")
    p.add_argument("--d-warmup-steps", type=int, default=0,
                   help="steps after warm-up in which only D trains and G stays as it is (a fresh D beside a "
                        "warm-started G)")
    p.add_argument("--l1-class-power", type=float, default=0.0,
                   help="weigh the pixel L1 by the world's class frequency^-P at each pixel of the target (mean "
                        "weight 1 over pixels), so spires, domes, windows and the watermark count; 0: unweighted")
    p.add_argument("--r1-gamma", type=float, default=0.2)
    p.add_argument("--r1-every", type=int, default=16, help="lazy R1: penalise every N steps, scaled by N")
    p.add_argument("--ema-beta", type=float, default=0.998)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--sample-every", type=int, default=500)
    p.add_argument("--snapshot-every", type=int, default=500,
                   help="keep the EMA generator every N steps in the shipped format (OUT/ema/step-N.safetensors), "
                        "since GAN quality moves between checkpoints; 0: never")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--channels-last", action="store_true",
                   help="keep the nets' feature maps channels-last (on 1 CPU thread a step took 0.74x the time)")
    p.add_argument("--export", type=Path, default=None, help="write the EMA generator (fp16 safetensors) here")
    p.add_argument("--pack", type=Path, default=None,
                   help="write the run's state in fp16 (safetensors, small enough to commit) here after training")
    p.add_argument("--from-pack", type=Path, default=None,
                   help="start from a --pack file (fresh optimisers) when --out holds no checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def presence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy, averaged over images and classes, between a soft presence score and the truth.

    logits (N, C, H, W) of the segmenter, labels (N, H, W) the world's. A class's score is the mean of its K
    highest pixel probabilities, K the fewest pixels the presence rule counts: near 1 when at least K pixels
    read as the class, near 0 when none do.
    """
    probs = logits.float().softmax(1).flatten(2)
    pixels = labels[0].numel()
    losses = []
    for c, name in enumerate(CLASSES):
        k = max(1, math.ceil(presence_threshold(name, pixels)))
        score = probs[:, c].topk(k, dim=1).values.mean(1).clamp(1e-4, 1 - 1e-4)
        losses.append(F.binary_cross_entropy(score, present(labels, name).float()))
    return torch.stack(losses).mean()


class Trainer:
    """Holds G, D, the EMA generator, optimisers and RNG state; ``step()`` runs one update of both nets."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        self.world = World(args.resolution)
        self.G = Generator(resolution=args.resolution, channels=args.g_channels, mapping_skip=args.mapping_skip).to(
            self.device
        )
        if args.init_from is not None:
            self._init_generator(args.init_from)
        if args.cond_d_hidden and not args.cond_d:
            raise ValueError("--cond-d-hidden adds to the conditional discriminator: pass --cond-d as well.")
        self.D = Discriminator(args.resolution, args.d_channels, cond_dim=self.world.latent_dim if args.cond_d else 0,
                               cond_hidden=args.cond_d_hidden)
        self.D.to(self.device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self._format(self.G, self.D, self.G_ema)
        mapping = list(self.G.mapping.parameters())
        mapping_ids = {id(p) for p in mapping}
        rest = [p for p in self.G.parameters() if id(p) not in mapping_ids]
        betas = (0.0, 0.99)
        self.opt_g = torch.optim.Adam(
            [{"params": rest}, {"params": mapping, "lr": args.lr * args.mapping_lr_mul}], lr=args.lr, betas=betas
        )
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=args.lr, betas=betas)
        self.latents = torch.Generator().manual_seed(args.seed + 1)
        self.step_count = 0
        self.seg: Segmenter | None = None
        if args.seg_weight > 0 or args.div_weight > 0 or args.presence_weight > 0:
            from .train_segmenter import class_weights

            self.seg = load_segmenter(self.device).eval().requires_grad_(False)
            self._format(self.seg)
            self.class_weights = class_weights(self.world, n=200).to(self.device)
        if args.l1_class_power > 0:
            _, labels = self.world.render(self.world.sample_latents(range(-200, 0)))
            freq = torch.bincount(labels.flatten(), minlength=len(CLASSES)).double() / labels.numel()
            weight = freq.clamp(min=1e-4) ** -args.l1_class_power
            self.pixel_weights = (weight / (freq * weight).sum()).float().to(self.device)  # per-pixel mean 1

    def _format(self, *nets: nn.Module) -> None:
        """With ``--channels-last``, convert the nets' conv weights, so their convolutions run channels-last."""
        if self.args.channels_last:
            for net in nets:
                net.to(memory_format=torch.channels_last)

    def _init_generator(self, path: Path) -> None:
        source = load_generator(path)
        if source.config != self.G.config:
            raise ModelError(
                f"--init-from {path} is a generator with configuration {source.config}, but this run builds "
                f"{self.G.config}; pass the same --g-channels/--resolution."
            )
        load_state_dict(self.G, source.state_dict(), source=str(path))

    def _z(self) -> torch.Tensor:
        return torch.randn(self.args.batch, self.G.z_dim, generator=self.latents).to(self.device)

    def _world(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.world.render(z.cpu())
        return images.to(self.device), labels.to(self.device)

    def _segmenter_losses(self, fake: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Paired cross-entropy, the diversity hinge and the presence loss, all read through the frozen segmenter.

        fake (N, 3, H, W), labels (N, H, W): the world's labels of the same latents. The hinge pairs image i
        with i + N/2: the share of pixels where G's maps differ (total variation of the class probabilities)
        must reach the share where the world's label maps differ. The class-weighted cross-entropy charges a
        spurious dome on sky at sky's small weight and a missed dome at dome's large one, so it tolerates
        fragments; the presence loss asks of each class what the presence rule asks.
        """
        assert self.seg is not None
        logits = self.seg(fake)
        out = {"seg": F.cross_entropy(logits, labels, weight=self.class_weights)}
        half = fake.shape[0] // 2
        if self.args.div_weight > 0 and half > 0:
            probs = logits.softmax(1)
            d_fake = 0.5 * (probs[:half] - probs[half : 2 * half]).abs().sum(1).mean((1, 2))
            d_world = (labels[:half] != labels[half : 2 * half]).float().mean((1, 2))
            out["div"] = F.relu(d_world - d_fake).mean()
        if self.args.presence_weight > 0:
            out["presence"] = presence_loss(logits, labels)
        return out

    def _cond(self, z: torch.Tensor) -> torch.Tensor | None:
        """What a conditional D reads of a latent: the entries the world reads; None for a plain D."""
        return z[:, : self.world.latent_dim] if self.args.cond_d else None

    def step(self) -> dict[str, float]:
        """One step: a D update (with lazy R1) then a G update, sharing one G forward; during the D warm-up
        (``--d-warmup-steps`` after ``--warmup-steps``) G only renders."""
        a = self.args
        g_frozen = a.warmup_steps <= self.step_count < a.warmup_steps + a.d_warmup_steps
        z, z_real = self._z(), self._z()
        target, target_labels = self._world(z)
        with torch.set_grad_enabled(not g_frozen):
            fake = self.G(z, noise_mode="random")
        error = (fake - target).abs()
        if a.l1_class_power > 0:
            error = error * self.pixel_weights[target_labels].unsqueeze(1)
        regress = error.mean()
        stats = {"regress": regress.item()}
        if self.step_count < a.warmup_steps:
            loss_g = regress
        else:
            real = self._world(z_real)[0]
            c, c_real = self._cond(z), self._cond(z_real)
            loss_d = F.softplus(self.D(fake.detach(), c)).mean() + F.softplus(-self.D(real, c_real)).mean()
            if a.cond_d:  # a real image with another scene's latent is a fake: D learns what follows from z
                mismatch = F.softplus(self.D(real, c_real.roll(1, 0))).mean()
                loss_d = loss_d + mismatch
                stats["mismatch"] = mismatch.item()
            if a.r1_every > 0 and self.step_count % a.r1_every == 0:
                real_r1 = real.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.D(real_r1, c_real).sum(), real_r1, create_graph=True)
                loss_d = loss_d + grad.square().sum(dim=(1, 2, 3)).mean() * (a.r1_gamma / 2 * a.r1_every)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            stats["loss_d"] = loss_d.item()
            if g_frozen:
                self._update_ema()
                self.step_count += 1
                return stats
            logits, fake_features = self.D.forward_features(fake, c)
            adv = F.softplus(-logits).mean()
            loss_g = a.adv_weight * adv + a.regress_weight * regress
            stats["adv"] = adv.item()
            if a.fm_weight > 0:
                with torch.no_grad():
                    target_features = self.D.forward_features(target, c)[1]
                fm = sum((f - t).abs().mean() for f, t in zip(fake_features, target_features)) / len(fake_features)
                loss_g = loss_g + a.fm_weight * fm
                stats["fm"] = fm.item()
            if self.seg is not None:
                weights = {"seg": a.seg_weight, "div": a.div_weight, "presence": a.presence_weight}
                for name, value in self._segmenter_losses(fake, target_labels).items():
                    loss_g = loss_g + weights[name] * value
                    stats[name] = value.item()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self._update_ema()
        self.step_count += 1
        return stats

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Ramp the EMA in, so early weights do not linger in the shipped average.
        beta = min(self.args.ema_beta, (1 + self.step_count) / (10 + self.step_count))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p, 1.0 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "latents_rng": self.latents.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(self.G.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if json.loads(state["config"]) != json.loads(json.dumps(self.G.config)):
            raise ValueError(
                "The checkpoint was trained with another generator configuration "
                f"({state['config']}); use the same --g-channels/--resolution or another --out."
            )
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.latents.set_state(state["latents_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step_count = int(state["step"])


def checkpoint_path(out: Path) -> Path:
    return out / "checkpoint.pt"


def snapshot_path(out: Path, step: int) -> Path:
    return out / "ema" / f"step-{step:06d}.safetensors"


def save_checkpoint(trainer: Trainer, out: Path) -> None:
    """Write atomically: an interrupted save never replaces a good checkpoint with a truncated one."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "checkpoint.pt.tmp"
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, checkpoint_path(out))


def load_checkpoint(trainer: Trainer, out: Path) -> bool:
    path = checkpoint_path(out)
    if not path.exists():
        return False
    trainer.load_state_dict(torch.load(path, map_location=trainer.device, weights_only=True))
    return True


_PACKED = ("G", "G_ema", "D")
# Paths a run may add to a packed one, whose output starts at zero, so that the packed function continues unchanged.
_ADDED_AT_ZERO = ("mapping.skip.", "cond_embed.", "cond_mlp.")


def save_pack(trainer: Trainer, path: Path) -> None:
    """The run's nets in fp16 with its step, configuration and random states: what :func:`load_pack` resumes."""
    from safetensors.torch import save_file

    tensors = {f"{net}.{k}": v.detach().to("cpu", torch.float16).contiguous()
               for net in _PACKED for k, v in getattr(trainer, net).state_dict().items()}
    tensors["latents_rng"] = trainer.latents.get_state()
    tensors["torch_rng"] = torch.get_rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(trainer.step_count), "config": json.dumps(trainer.G.config)})
    os.replace(tmp, path)


def load_pack(trainer: Trainer, path: Path) -> None:
    """Load a :func:`save_pack` file into a fresh trainer (its optimisers stay fresh).

    A pack without the mapping's skip path or D's condition loads into a run with ``--mapping-skip`` or
    ``--cond-d``: the added path starts at zero, so the run continues the packed function and learns it from there.
    """
    tensors, meta = load_weights(path)
    config = json.loads(meta.get("config", "null")) if "step" in meta else None
    if isinstance(config, dict) and trainer.G.mapping.skip is not None:
        config.setdefault("mapping_skip", True)
    if config != json.loads(json.dumps(trainer.G.config)):
        raise ModelError(f"--from-pack {path} is not a pack of this run's generator configuration "
                         f"({meta.get('config')}); pass a file written by --pack with the same "
                         f"--g-channels/--resolution.")
    for net in _PACKED:
        state = {k[len(net) + 1 :]: v for k, v in tensors.items() if k.startswith(net + ".")}
        for name, value in getattr(trainer, net).state_dict().items():
            if name.startswith(_ADDED_AT_ZERO) and name not in state:  # a path this run adds: its output starts at zero
                state[name] = value
        load_state_dict(getattr(trainer, net), state, source=f"{path} ({net})")
    trainer.latents.set_state(tensors["latents_rng"])
    torch.set_rng_state(tensors["torch_rng"])
    trainer.step_count = int(meta["step"])


def export_generator(G: Generator, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save ``G``'s weights as fp16 safetensors with its configuration (JSON) in the metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in G.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(G.config), **(metadata or {})})


def sample_grid(trainer: Trainer, path: Path, n: int = 32) -> None:
    z = torch.randn(n, trainer.G.z_dim, generator=torch.Generator().manual_seed(1234)).to(trainer.device)
    with torch.no_grad():
        images = trainer.G_ema(z)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.clamp(-1, 1) * 0.5 + 0.5, str(path), nrow=8)


def train(args: argparse.Namespace) -> Trainer:
    """Run (or resume) training until ``args.steps``; returns the trainer."""
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    if load_checkpoint(trainer, args.out):
        print(f"resumed from {checkpoint_path(args.out)} at step {trainer.step_count}", flush=True)
    elif args.from_pack is not None:
        load_pack(trainer, args.from_pack)
        print(f"started from {args.from_pack} at step {trainer.step_count}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "log.jsonl").open("a")
    start, t0 = trainer.step_count, time.time()
    bar = tqdm(total=args.steps, initial=start, disable=args.no_progress, desc="train", unit="step")
    try:
        while trainer.step_count < args.steps:
            stats = trainer.step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
            s = trainer.step_count
            if s % 50 == 0 or s == args.steps:
                line = json.dumps({"step": s, "time": time.time() - t0, **stats})
                log.write(line + "\n")
                log.flush()
                if args.no_progress:  # a background run's stdout is its log
                    print(line, flush=True)
            if s % args.ckpt_every == 0 or s == args.steps:
                save_checkpoint(trainer, args.out)
            if args.sample_every and s % args.sample_every == 0:
                sample_grid(trainer, args.out / "samples" / f"step-{s:06d}.png")
            if args.snapshot_every and s % args.snapshot_every == 0:
                export_generator(trainer.G_ema, snapshot_path(args.out, s), {"steps": str(s)})
    finally:
        bar.close()
        log.close()
    if args.export:
        export_generator(trainer.G_ema, args.export, {"steps": str(trainer.step_count)})
    if args.pack:
        save_pack(trainer, args.pack)
    return trainer


def main(argv: list[str] | None = None) -> None:
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
