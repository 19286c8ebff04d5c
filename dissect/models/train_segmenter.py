"""Training the segmenter on freshly rendered world scenes.

    python -m dissect.models.train_segmenter --steps 3000 --out dissect/models/weights/segmenter.safetensors

Every step renders a new batch of scenes from seeds no evaluation uses, pastes objects between them (so that
a tree on a roof is still a tree), degrades the images the way a generator's samples differ from the world
(slight blur, noise, colour shifts, small translations), and takes an Adam step on a class-weighted
cross-entropy. Checkpoints go to `--ckpt-dir` every `--ckpt-every`
steps and a rerun with the same arguments resumes from the last one; seeds and augmentations are a
function of the step, so a resumed run continues the same sequence.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .segmenter import HELD_OUT_SEEDS, WEIGHTS, Segmenter, evaluate, save_segmenter
from .world import CLASSES, World

TRAIN_SEED_START = 10_000_000  # training scenes: seeds from here up, far above every evaluation range
CKPT_DIR = Path.home() / ".cache" / "dissect" / "segmenter"


def class_weights(world: World, n: int = 1000, power: float = 0.3) -> Tensor:
    """Per-class loss weights (K,) ~ frequency^-power, mean 1, from `n` training scenes.

    Small classes (windows, doors) weigh more, so their IoU is not traded for sky pixels.
    """
    _, labels = world.render(world.sample_latents(range(TRAIN_SEED_START - n, TRAIN_SEED_START)))
    freq = torch.bincount(labels.flatten(), minlength=len(CLASSES)).double() / labels.numel()
    w = freq.clamp(min=1e-4) ** -power
    return (w / w.mean()).float()


def augment(
    images: Tensor,
    labels: Tensor,
    gen: torch.Generator,
    max_shift: int = 3,
    max_blur: float = 1.5,
    max_noise: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """Degrade world images towards generator samples; labels move with the image.

    Args:
        images: (N, 3, H, W) in [-1, 1]; labels: (N, H, W); gen: the source of randomness;
        max_shift: pixels; max_blur: Gaussian sigma in pixels; max_noise: pixel noise std.
    Returns:
        images (N, 3, H, W) in [-1, 1] and labels (N, H, W).
    """
    n, _, h, w = images.shape

    def r(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen)

    # Small translations, edges replicated (the world's scenes extend past the frame that way).
    pad = max_shift
    padded = F.pad(images, (pad,) * 4, mode="replicate")
    padded_labels = F.pad(labels.unsqueeze(1).float(), (pad,) * 4, mode="replicate").squeeze(1).long()
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    images = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])
    labels = torch.stack([padded_labels[i, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])

    # Gaussian blur on half the images: one depthwise conv with a kernel per image.
    sigma = torch.where(r(n) < 0.5, 0.2 + (max_blur - 0.2) * r(n), torch.zeros(n))
    x = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-(x**2) / (2 * sigma.clamp(min=1e-3).view(n, 1) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1.view(n, 7, 1) * k1.view(n, 1, 7)).repeat_interleave(3, 0).unsqueeze(1)  # (N*3, 1, 7, 7)
    images = F.conv2d(F.pad(images.reshape(1, n * 3, h, w), (3,) * 4, mode="replicate"), k2, groups=n * 3)
    images = images.view(n, 3, h, w)

    # Colour: contrast, brightness and per-channel gain; then pixel noise.
    contrast = 1 + 0.2 * (r(n, 1, 1, 1) - 0.5)
    mean = images.mean((1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean + 0.1 * (r(n, 1, 1, 1) - 0.5)
    images = images * (1 + 0.12 * (r(n, 3, 1, 1) - 0.5))
    # Generator samples carry speckle; noise up to 0.15 keeps stray pixels from reading as small classes.
    images = images + max_noise * r(n, 1, 1, 1) * torch.randn(images.shape, generator=gen)
    return images.clamp(-1, 1), labels


# Objects that copy_paste moves between scenes, and the parts of a scene it prefers to drop them on.
PASTED = tuple(CLASSES.index(c) for c in ("spire", "dome", "tree", "window", "door", "cloud"))
BUILDING = tuple(CLASSES.index(c) for c in ("wall", "spire", "dome"))


def copy_paste(images: Tensor, labels: Tensor, gen: torch.Generator, p: float = 0.5, reach: int = 6
               ) -> tuple[Tensor, Tensor]:
    """Each image, with probability ``p``, gets one object of the next image in the batch pasted onto it, pixels
    and labels together (Ghiasi et al. 2021, copy-paste augmentation). The world never puts a tree on a roof,
    so without this the segmenter learns that a round thing on a roof is a dome, and an edit that pastes a tree
    there cannot be measured. The object is its class's pixels within ``reach`` of one of them, dropped half the
    time on a building (wall, spire, dome) and otherwise anywhere.

    Args:
        images: (N, 3, H, W); labels: (N, H, W); gen: the source of randomness.
    Returns:
        new images (N, 3, H, W) and labels (N, H, W).
    """
    images, labels = images.clone(), labels.clone()
    n, _, h, w = images.shape
    donors_images, donors_labels = images.roll(1, 0), labels.roll(1, 0)  # from the unchanged batch
    building = torch.tensor(BUILDING)

    def pick(where: Tensor) -> tuple[int, int]:
        ys, xs = where.nonzero(as_tuple=True)
        i = int(torch.randint(len(ys), (1,), generator=gen))
        return int(ys[i]), int(xs[i])

    for i in range(n):
        if torch.rand(1, generator=gen).item() >= p:
            continue
        present = [c for c in PASTED if (donors_labels[i] == c).any()]
        if not present:
            continue
        c = present[int(torch.randint(len(present), (1,), generator=gen))]
        cy, cx = pick(donors_labels[i] == c)
        window = torch.zeros(h, w, dtype=torch.bool)
        window[max(0, cy - reach) : cy + reach + 1, max(0, cx - reach) : cx + reach + 1] = True
        ys, xs = ((donors_labels[i] == c) & window).nonzero(as_tuple=True)
        onto = torch.isin(labels[i], building)
        if torch.rand(1, generator=gen).item() < 0.5 and onto.any():
            ty, tx = pick(onto)
        else:
            ty, tx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
        dy, dx = ty - cy, tx - cx
        keep = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        ys, xs = ys[keep], xs[keep]
        images[i, :, ys + dy, xs + dx] = donors_images[i][:, ys, xs]
        labels[i, ys + dy, xs + dx] = c
    return images, labels


def train(args: argparse.Namespace) -> Segmenter:
    """Train (or resume) per `args`; returns the trained segmenter in eval mode."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    world = World(args.size)
    seg = Segmenter().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(seg.parameters(), lr=args.lr)
    weights = class_weights(world)
    step = 0
    ckpt = Path(args.ckpt_dir) / "last.pt"
    if ckpt.is_file() and not args.fresh:
        state = torch.load(ckpt, weights_only=True)
        seg.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        print(f"resumed from {ckpt} at step {step}")

    def lr_at(t: int) -> float:
        """Short warm-up, then cosine decay to 2% of the peak."""
        warm = min(1.0, (t + 1) / 100)
        return args.lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t / args.steps, 1.0))))

    seg.train()
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="segmenter", disable=args.no_progress)
    start = time.time()
    for t in bar:
        seeds = range(TRAIN_SEED_START + t * args.batch, TRAIN_SEED_START + (t + 1) * args.batch)
        images, labels = world.render(world.sample_latents(seeds))
        gen = torch.Generator().manual_seed(t)
        images, labels = augment(*copy_paste(images, labels, gen, p=args.copy_paste), gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(t)
        logits = seg(images.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, labels, weight=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t % 10 == 0:
            acc = (logits.argmax(1) == labels).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{acc:.4f}", lr=f"{lr_at(t):.1e}")
            if args.no_progress and t % 100 == 0:
                print(f"step {t} loss {loss.item():.4f} acc {acc:.4f} {time.time() - start:.0f}s", flush=True)
        if (t + 1) % args.ckpt_every == 0 or t + 1 == args.steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": seg.state_dict(), "opt": opt.state_dict(), "step": t + 1}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)  # never leave a half-written checkpoint
    return seg.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=64, help="world image side to train on")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (leave cores to other jobs)")
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the fp16 safetensors")
    parser.add_argument("--ckpt-dir", type=Path, default=CKPT_DIR)
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--eval-images", type=int, default=len(HELD_OUT_SEEDS), help="held-out world images to score")
    parser.add_argument("--copy-paste", type=float, default=0.5,
                        help="share of images that get another scene's object pasted on (0: the world's layouts only)")
    parser.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a tqdm bar")
    args = parser.parse_args(argv)

    start = time.time()
    seg = train(args)
    minutes = (time.time() - start) / 60
    scores = evaluate(seg, list(HELD_OUT_SEEDS)[: args.eval_images], size=args.size)
    print(f"\nheld-out world images: {args.eval_images}  (seeds from {HELD_OUT_SEEDS.start})")
    print("| class | IoU |\n|---|---|")
    for name in CLASSES:
        print(f"| {name} | {scores[f'iou_{name}']:.4f} |")
    print(f"pixel_acc={scores['pixel_acc']:.4f} miou={scores['miou']:.4f} wall_minutes_this_run={minutes:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: f"{v:.4f}" for k, v in scores.items()}
    meta.update(steps=str(args.steps), batch=str(args.batch), eval_images=str(args.eval_images),
                copy_paste=str(args.copy_paste))
    save_segmenter(seg, args.out, meta)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
