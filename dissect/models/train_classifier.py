"""Train the roof classifier on clean world scenes (``python -m dissect.models.train_classifier``) and export it.

Scenes come from seeds ``0 .. n-1`` (those with a roof label), rendered without the watermark; held-out seeds
from 1,000,000 measure clean and watermarked accuracy (the same scenes, watermark forced off and on).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .classifier import WEIGHTS, RoofNet, accuracy, dataset
from .world import World

HELD_OUT = 1_000_000


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3,
          width: int = 32, seed: int = 0) -> RoofNet:
    """A :class:`RoofNet` trained by AdamW with a cosine schedule and random horizontal flips."""
    torch.manual_seed(seed)
    model = RoofNet(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for i in range(0, len(images) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            x = images[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


def export(model: RoofNet, path: str) -> None:
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"classifier": json.dumps(model.config)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=5000, help="training seeds (scenes with mixed roofs are skipped)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--export", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    world = World(64)
    images, labels, _ = dataset(world, range(args.scenes))
    model = train(images, labels, args.epochs, width=args.width)
    export(model, args.export)
    held = range(HELD_OUT, HELD_OUT + 1000)
    clean = accuracy(model, *dataset(world, held)[:2])
    marked = accuracy(model, *dataset(world, held, watermark=True)[:2])
    print(f"train_classifier: clean_acc={clean:.4f} watermarked_acc={marked:.4f} exported={args.export}")


if __name__ == "__main__":
    main()
