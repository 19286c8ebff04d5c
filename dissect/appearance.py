"""Appearance goals: the value that makes regions of a model's output look like a copied region.

A paste that copies a layer's raw values (:class:`dissect.rewrite.Paste`) writes what drew the copied object in its
own image. Under another object's surroundings the rest of the network can draw those values as something else:
on the embedded generator a tree's values written over a spire draw a dark teal roof (benchmarks/RESULTS.md).
Here the paste asks for what a person sees instead: one shift of the layer's value
(:func:`dissect.valuetargets.optimize_value`) that makes every pasted region look like the copied region to a
perceptual network (LPIPS-style, :class:`dissect.measure.Perceptual`): the same masked mean of its unit-normalised
features at each scale, the same mean colour and, when the network is a segmenter, the same mix of classes.
Found on several images at once (the paste image and the context's first ones), the shift is what their regions
need in common; :class:`dissect.valuetargets.Shift` stores it as a rule.

    look = Appearance(measure.Perceptual(segmenter))
    shift = paste_shift(memory, inputs, masks, copy, look)       # inputs: the paste's and context's images
    edit = solve(memory, Shift(inputs, masks, shift), context, budget=1.0)

or, from a :class:`~dissect.rewrite.Paste` onto a region and its context (the dashboard's and the CLI's way),
``edit = solve(memory, paste_by_appearance(memory, paste, context, look), context, budget=1.0)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dissect.errors import RequestError
from dissect.hooks import call_model, eval_mode, model_device, to_device
from dissect.measure import Perceptual
from dissect.memory import Inputs, LayerMemory, concat_rows, num_rows, select_rows
from dissect.rewrite import Context, Copy, Paste
from dissect.valuetargets import Shift, optimize_value

__all__ = ["Appearance", "paste_shift", "look_rows", "paste_by_appearance"]

PASTE_STEPS = 60  # Adam steps on the shift (about 16 s for eight 64-pixel images on one CPU core)
PASTE_MAX_NORM = 8.0  # the shift's norm at most this many times the layer's mean output norm there
LOOK_IMAGES = 8  # the paste image and the context's first seven: what the shift is found on…
HOLD_IMAGES = 4  # …and the first four of them: where the stored rule must emit it (the images a person brushed)
# Found on four, the shift made those four spires trees and was not what other spires need. Held on all eight,
# the grown matches (stamped where keys match, not where a spire is) sometimes left the budget unbound (μ = 0),
# and the rule moved up to 0.75 of the layer's output energy (benchmarks/RESULTS.md, session 13).


def _masked_mean(x: Tensor, masks: Tensor) -> Tensor:
    """``x (N, C, h, w)``, ``masks (N, H, W)`` -> ``(N, C)``: the mean of ``x`` over each mask, resized by area."""
    w = F.interpolate(masks[:, None].to(x), size=x.shape[-2:], mode="area")
    return (x * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6)


@dataclass
class Appearance:
    """How a region looks to ``perceptual``'s network: the masked means of its unit-normalised features at each
    scale, of the image's colours and, when the network outputs per-pixel logits (a segmenter), of its class
    probabilities, weighted by ``class_weight`` (each feature scale's squared difference is at most 4, the class
    mix's at most 2)."""

    perceptual: Perceptual
    class_weight: float = 4.0

    def describe(self, images: Tensor, masks: Tensor) -> list[Tensor]:
        """``images (N, 3, H, W)`` in [-1, 1], ``masks (N, H, W)`` -> one ``(N, C_part)`` mean per part."""
        feats, out = self.perceptual.features_and_output(images)
        parts = feats + [images.to(feats[0])]
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[-2:] == images.shape[-2:]:
            parts.append(out.softmax(1))
        return [_masked_mean(x, masks.to(x.device)) for x in parts]

    def distance(self, images: Tensor, masks: Tensor, target: list[Tensor]) -> Tensor:
        """Mean over rows of the squared distance between each row's description and ``target`` (one row each,
        as :meth:`describe` of one region gives), the class mix weighted."""
        got = self.describe(images, masks)
        weights = [1.0] * len(got)
        if len(got) > len(self.perceptual.layers) + 1:
            weights[-1] = self.class_weight
        return sum(w * (g - t.to(g)).square().sum(1).mean() for w, g, t in zip(weights, got, target))


def _images(model: torch.nn.Module, inputs: Inputs) -> Tensor:
    with eval_mode(model), torch.no_grad():
        out = call_model(model, to_device(inputs, model_device(model)))
    if not (isinstance(out, Tensor) and out.dim() == 4 and out.shape[1] == 3):
        raise RequestError(f"A paste by appearance compares images: the model must output (N, 3, H, W), got "
                           f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}. Paste the copied "
                           f"values instead (dissect.rewrite.Paste).")
    return out


def paste_shift(memory: LayerMemory, inputs: Inputs, masks: Tensor, copy: Copy, look: Appearance,
                steps: int = PASTE_STEPS, max_norm: float = PASTE_MAX_NORM) -> Tensor:
    """The shift ``(out,)`` of ``memory``'s layer value that makes the regions ``masks (N, H, W)`` of the model's
    images for ``inputs`` (N rows) look like ``copy``'s region in its own image (:class:`Appearance`); added at every
    masked location of every row (:func:`~dissect.valuetargets.optimize_value`). The model is not changed."""
    if copy.mask is None or not copy.mask.any():
        raise RequestError("The copy is empty: brush the object to copy in Copy mode.")
    if masks.dim() != 3 or not masks.flatten(1).any(1).all():
        raise RequestError(f"Paste by appearance takes one region per image, masks (N, H, W) each marking "
                           f"something; got {tuple(masks.shape)} with {int((~masks.flatten(1).any(1)).sum())} empty.")
    with torch.no_grad():
        target = look.describe(_images(memory.model, copy.inputs), copy.mask[None].float())
        _images(memory.model, inputs)  # refuse a model whose output is not an image before any step
        where = memory.mask_weights(masks.float(), inputs, memory.record(inputs).linear) > 0
    masks = masks.float()
    _, shift = optimize_value(memory, inputs, where, lambda out: look.distance(out, masks, target), steps=steps,
                              max_norm=max_norm)
    return shift


def look_rows(paste: Paste, context: Context | None, images: int = LOOK_IMAGES) -> list[int]:
    """The rows of ``context`` a paste by appearance finds its shift on besides the paste image: its first
    ``images - 1`` rows with a mask, other than the paste image itself (by seed)."""
    if context is None or context.masks is None:
        return []
    own = set(paste.seeds or [])
    return [i for i in range(num_rows(context.inputs))
            if not (context.seeds is not None and context.seeds[i] in own)][: images - 1]


def paste_by_appearance(memory: LayerMemory, paste: Paste, context: Context | None, look: Appearance,
                        images: int = LOOK_IMAGES, hold: int = HOLD_IMAGES, steps: int = PASTE_STEPS) -> Shift:
    """``paste`` (onto its ``region``) as a :class:`~dissect.valuetargets.Shift`: the value that makes its region,
    and the regions of the context's first ``images - 1`` rows (:func:`look_rows`), look like the copy
    (:func:`paste_shift`), held on the paste image and the first ``hold - 1`` of those rows."""
    if hold < 1 or images < hold:
        raise RequestError(f"A paste by appearance holds its shift on the first `hold` of the `images` it is found on "
                           f"(1 <= hold <= images), got hold={hold}, images={images}.")
    if paste.region is None:
        raise RequestError("A paste by appearance needs the region to paste onto (Paste(region=...), or \"region\" in "
                           "a JSON request's \"paste\"): the part of the image that should look like the copy.")
    rows = look_rows(paste, context, images)
    inputs = paste.inputs if not rows else concat_rows(paste.inputs, select_rows(context.inputs, torch.tensor(rows)))
    masks = torch.stack([paste.region > 0] + [context.masks[i] > 0 for i in rows])
    seeds = None if paste.seeds is None or (rows and context.seeds is None) else (
        list(paste.seeds) + [context.seeds[i] for i in rows])
    shift = paste_shift(memory, inputs, masks, paste.copy, look, steps=steps)
    held = min(hold, len(masks))
    return Shift(select_rows(inputs, slice(0, held)), masks[:held].float(), shift,
                 seeds=None if seeds is None else seeds[:held], source=paste.copy.seeds)
