"""The segmenter that labels generated images with the world's classes, so edits can be measured.

A small U-Net trained on world images (see `dissect.models.train_segmenter`). It also offers pooled deep
features for Fréchet distances between image sets, and its own measurement on held-out world images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .world import CLASSES, World

WEIGHTS = Path(__file__).parent / "weights" / "segmenter.safetensors"
WIDTHS = (16, 32, 64, 128)  # channels at 1, 1/2, 1/4 and 1/8 of the image side
# World seeds set aside for measuring the segmenter; training draws its scenes far from them.
HELD_OUT_SEEDS = range(5_000_000, 5_001_000)
# The presence rule: the fewest segmenter pixels (of 64x64; scaled by area at other sizes) for an image to
# count as showing a class. With `benchmarks/eval_world.py --calibrate` on 2000 world images the rule agrees
# with the world's scene facts on >= 99.8% of images for any threshold in watermark 2..96, spire 2..16,
# dome 4..16, tree 2..40 pixels; each value sits inside its plateau, high enough that a few stray pixels on a
# generated image do not count (the mark has 196 pixels; the smallest spire about 20).
PRESENCE_PIXELS = {"watermark": 48, "spire": 10, "dome": 10, "tree": 16}
DEFAULT_PRESENCE_PIXELS = 16


def presence_threshold(name: str, pixels: int, min_pixels: int | None = None) -> float:
    """Fewest pixels of class ``name`` that count as present in an image of ``pixels`` pixels; ``min_pixels``,
    when given, overrides the rule with that many pixels at any size."""
    if name not in CLASSES:
        raise KeyError(f"Unknown class {name!r}; the classes are {', '.join(CLASSES)}.")
    if min_pixels is not None:
        return float(min_pixels)
    return PRESENCE_PIXELS.get(name, DEFAULT_PRESENCE_PIXELS) * pixels / 64**2


def present(labels: Tensor, name: str, min_pixels: int | None = None) -> Tensor:
    """``labels (N, H, W) -> (N,)`` bool: the images that show class ``name`` by the presence rule (the one rule
    of dissect; :mod:`dissect.measure` re-exports it), or by at least ``min_pixels`` pixels when given."""
    threshold = presence_threshold(name, labels.shape[-2:].numel(), min_pixels)
    return (labels == CLASSES.index(name)).flatten(1).sum(1) >= threshold


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 conv + batch norm + ReLU at one resolution."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Segmenter(nn.Module):
    """A little U-Net: four resolutions, skip connections, one logit per class and pixel.

    Args:
        num_classes: number of output classes (the world's `CLASSES` by default).
        widths: channels per resolution, finest first.
    """

    def __init__(self, num_classes: int = len(CLASSES), widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.down = nn.ModuleList()
        c_prev = 3
        for c in widths:
            self.down.append(_block(c_prev, c))
            c_prev = c
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.feature_dim = widths[-1] + widths[-2]

    def _encode_decode(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """images: (N, 3, H, W) -> finest decoder map (N, widths[0], H, W) and [bottleneck, first decoder map]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [-1, 1]; got {tuple(images.shape)}.")
        if images.shape[-1] % 8 or images.shape[-2] % 8:
            raise ValueError(f"image sides must be multiples of 8 (three 2x poolings); got {tuple(images.shape[-2:])}.")
        skips = []
        x = images
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        deep = [x]
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), skip], 1))
            if len(deep) == 1:
                deep.append(x)
        return x, deep

    def forward(self, images: Tensor) -> Tensor:
        """images: (N, 3, H, W) in [-1, 1] -> logits (N, num_classes, H, W)."""
        return self.head(self._encode_decode(images)[0])

    @torch.no_grad()
    def segment(self, images: Tensor) -> Tensor:
        """images: (N, 3, H, W) in [-1, 1] -> labels (N, H, W) int64, indices into `CLASSES`."""
        return self(images).argmax(1)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """images: (N, 3, H, W) in [-1, 1] -> (N, feature_dim) deep features, averaged over space.

        The bottleneck and the first decoder level, for Fréchet distances between image sets.
        """
        _, deep = self._encode_decode(images)
        return torch.cat([d.mean((2, 3)) for d in deep], 1)


def save_segmenter(seg: Segmenter, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save `seg`'s weights as fp16 safetensors (integer buffers as they are) with string `metadata`."""
    from safetensors.torch import save_file

    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in seg.state_dict().items()
    }
    save_file(state, str(path), metadata={"widths": ",".join(map(str, WIDTHS)), **(metadata or {})})


def load_segmenter(device: str | torch.device = "cpu", path: str | Path = WEIGHTS) -> Segmenter:
    """The shipped segmenter, in eval mode on `device`.

    Raises:
        FileNotFoundError: when the weights file is missing (train it with
            `python -m dissect.models.train_segmenter`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Segmenter weights not found at {path}. Reinstall the package, or train them with "
            f"`python -m dissect.models.train_segmenter --out {path}`."
        )
    with safe_open(str(path), "pt") as f:
        widths = tuple(int(c) for c in (f.metadata() or {}).get("widths", ",".join(map(str, WIDTHS))).split(","))
    seg = Segmenter(widths=widths)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    missing, unexpected = seg.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the Segmenter: missing keys {missing}, unexpected keys {unexpected}.")
    return seg.to(device).eval()


@torch.no_grad()
def evaluate(
    seg: Segmenter, seeds: Sequence[int] = HELD_OUT_SEEDS, size: int = 64, batch_size: int = 100
) -> dict[str, float]:
    """Pixel accuracy and intersection-over-union of `seg` on world scenes rendered from `seeds`.

    Returns:
        {"pixel_acc", "miou", "iou_<class>" for each class}; IoUs are over all pixels of all images,
        and a class absent from both truth and prediction counts as IoU 1.
    """
    world = World(size)
    device = next(seg.parameters()).device
    k = seg.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        images, labels = world.render(world.sample_latents(seeds[start : start + batch_size]).to(device))
        pred = seg.segment(images).cpu()
        confusion += torch.bincount(labels.cpu().flatten() * k + pred.flatten(), minlength=k * k).view(k, k)
    hits = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.ones_like(hits))
    out = {"pixel_acc": (hits.sum() / confusion.sum()).item(), "miou": iou.mean().item()}
    out.update({f"iou_{name}": iou[i].item() for i, name in enumerate(CLASSES[:k])})
    return out
