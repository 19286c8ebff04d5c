"""A small classifier of the scene world's roofs, trained without watermarks (after Santurkar et al., NeurIPS 2021).

The task: what roof the town's churches have, ``spire``, ``dome`` or ``flat`` (scenes whose buildings disagree
are left out), read exactly from the world's latent. The classifier (:class:`RoofNet`) sees only scenes without the
world's "STOCK" watermark during training, so watermarked scenes are new to it. Every scene has a watermarked and
a clean twin (:func:`twins`: the same latent with the watermark's latent entry forced on or off), so a rewrite can
map a watermarked image's keys to its clean twin's values at the same locations.

``load_classifier()`` returns the shipped model and a sampler of clean images (the data C is taken over);
``python -m dissect.models.train_classifier`` trains it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from .world import DOME, FIELD_INDEX, SPIRE, WATERMARK, World

__all__ = ["ROOFS", "RoofNet", "ImageSampler", "roof_labels", "twins", "dataset", "covered", "load_classifier", "accuracy"]

WEIGHTS = Path(__file__).parent / "weights" / "roof-classifier.safetensors"
ROOFS = ("spire", "dome", "flat")
_FORCE = 4.0  # a watermark latent of -4 (uniform 3e-5) always draws the watermark, +4 never


def roof_labels(world: World, z: Tensor) -> Tensor:
    """``(N,)`` int64: 0 spire, 1 dome, 2 flat; -1 where one building has a spire and another a dome."""
    facts = world.scene_facts(z)
    spire, dome = facts["has_spire"], facts["has_dome"]
    labels = torch.full_like(spire, 2, dtype=torch.long)
    labels[spire] = 0
    labels[dome] = 1
    labels[spire & dome] = -1
    return labels


def twins(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(watermarked, clean)`` latents: ``z`` with the watermark forced on, and forced off; all else equal."""
    on, off = z.clone(), z.clone()
    on[:, FIELD_INDEX["watermark"]] = -_FORCE
    off[:, FIELD_INDEX["watermark"]] = _FORCE
    return on, off


def dataset(world: World, seeds: Iterable[int], watermark: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(images (M, 3, H, W), labels (M,), marks (M, H, W))`` for the seeds whose scene has a label, every one
    rendered with the watermark forced ``watermark``; ``marks`` is 1 on the watermark's pixels."""
    z = world.sample_latents(seeds)
    labels = roof_labels(world, z)
    z = z[labels >= 0]
    z = twins(z)[0 if watermark else 1]
    images, pixel_labels = world.render(z)
    return images, labels[labels >= 0], (pixel_labels == WATERMARK).float()


def covered(world: World, seeds: Iterable[int]) -> tuple[torch.Tensor, ...]:
    """Scenes of ``seeds`` whose watermark covers part of a roof (where it can matter): ``(watermarked, clean,
    labels, marks)``, images ``(M, 3, H, W)``, labels ``(M,)``, watermark masks ``(M, H, W)``."""
    z = world.sample_latents(seeds)
    labels = roof_labels(world, z)
    on, off = (t[labels >= 0] for t in twins(z))
    labels = labels[labels >= 0]
    (marked, marked_pixels), (clean, clean_pixels) = world.render(on), world.render(off)
    marks = marked_pixels == WATERMARK
    keep = (marks & ((clean_pixels == SPIRE) | (clean_pixels == DOME))).flatten(1).any(1)
    return marked[keep], clean[keep], labels[keep], marks[keep].float()


class ImageSampler:
    """``sampler(seeds) -> images (N, 3, H, W)``: world scenes without the watermark (the classifier's data)."""

    def __init__(self, size: int = 64) -> None:
        self.world = World(size)
        self.description = f"world{size}:clean"

    def __call__(self, seeds: Iterable[int] | Tensor) -> Tensor:
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        return self.world.render(twins(self.world.sample_latents(seeds))[1])[0]


class RoofNet(nn.Module):
    """``net(images (N, 3, 64, 64) in [-1, 1]) -> logits (N, 3)``: four 3x3 convolutions with batch norm (the
    third, ``features.6``, keeps the 16x16 grid and is the layer rewritten), global max pooling (a roof is a
    small object: its presence, not its area, decides), a linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.config = {"width": width}
        w = width

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*conv(3, w // 2, 2), *conv(w // 2, w, 2), *conv(w, w, 1), *conv(w, 2 * w, 2))
        self.head = nn.Linear(2 * w, len(ROOFS))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).amax(dim=(2, 3)))


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    hits = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
               for i in range(0, len(images), batch_size))
    return hits / len(images)


def load_classifier(path: str | Path = WEIGHTS, device: torch.device | str = "cpu") -> tuple[RoofNet, ImageSampler]:
    """The shipped roof classifier (or one ``train_classifier`` exported to ``path``) in eval mode, and its sampler."""
    from .loaders import load_state_dict, load_weights

    state, meta = load_weights(path)
    if "classifier" not in meta:
        raise ValueError(f"{path} has no classifier metadata; export it with `python -m dissect.models.train_classifier`.")
    model = RoofNet(**json.loads(meta["classifier"]))
    load_state_dict(model, state, source=str(path))
    return model.float().to(device).eval(), ImageSampler()
