"""Rewriting a classifier so that it ignores watermarks (after Santurkar et al., "Editing a classifier by rewriting
its prediction rules", NeurIPS 2021), against fine-tuning the same layer on the same examples.

The shipped roof classifier (``dissect.models.classifier``) never saw the world's watermark. From ``--examples``
watermarked training-distribution scenes and their clean twins (same latent, watermark off), a rank-1
:class:`dissect.valuetargets.Pairs` rewrite of ``features.6`` maps the keys of each watermarked image, on the
watermark's pixels, to the values its clean twin has at the same locations (``dissect.rewrite.solve``, C over
clean scenes). The baseline fine-tunes the same layer's weight and bias on the same watermarked examples with
their labels (Adam, ``--finetune-steps``). Both are measured on ``--n`` held-out scenes: clean, watermarked, and
watermarked where the watermark covers part of a roof (the summary's watermarked accuracies: elsewhere the
classifier is hardly affected by the watermark).

Usage::

    python benchmarks/eval_classifier_edit.py            # ~2 min on one thread
    python benchmarks/eval_classifier_edit.py --n 300 --examples 4

Ends with ``eval_classifier_edit: watermarked_acc_before=A watermarked_acc_after=B clean_acc_delta=D
finetune_watermarked_acc=F finetune_clean_acc_delta=G`` (one line; deltas in accuracy points, i.e. x100).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dissect.memory import LayerMemory
from dissect.models.classifier import WEIGHTS, accuracy, covered, dataset, load_classifier
from dissect.rewrite import Context, Rewriter, solve
from dissect.valuetargets import Pairs

LAYER = "features.6"
REQUESTS, HELD_OUT = 2_000_000, 1_000_000


def finetune(model: torch.nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor, steps: int,
             lr: float) -> dict[str, torch.Tensor]:
    """Fine-tune only ``layer``'s parameters on ``(images, labels)``; returns the original parameters."""
    module = model.get_submodule(layer)
    saved = {k: v.detach().clone() for k, v in module.named_parameters()}
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(WEIGHTS))
    parser.add_argument("--n", type=int, default=1000, help="held-out scenes")
    parser.add_argument("--examples", type=int, default=4, help="watermarked examples the edits learn from")
    parser.add_argument("--moment", type=int, default=1000, help="clean scenes C is taken over")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, sampler = load_classifier(args.model)
    world = sampler.world
    held = range(HELD_OUT, HELD_OUT + args.n)
    clean_x, clean_y, _ = dataset(world, held)
    all_x, all_y, _ = dataset(world, held, watermark=True)
    marked_x, _, marked_y, _ = covered(world, held)

    def scores() -> tuple[float, float, float]:
        return accuracy(model, clean_x, clean_y), accuracy(model, marked_x, marked_y), accuracy(model, all_x, all_y)

    clean_before, marked_before, all_before = scores()
    print(f"before: clean {clean_before:.4f} ({len(clean_y)} held-out scenes); watermarked {all_before:.4f}, and "
          f"{marked_before:.4f} on the {len(marked_y)} whose watermark covers part of a roof")

    req_x, twin_x, req_y, masks = (t[:args.examples] for t in covered(world, range(REQUESTS, REQUESTS + 40 * args.examples)))

    memory = LayerMemory(model, LAYER)
    memory.fit_moment(sampler, args.moment, progress=False)
    edit = solve(memory, Pairs(req_x, masks, value_inputs=twin_x), Context(req_x, masks, rank=args.rank), budget=None)
    rewriter = Rewriter(model)
    rewriter.apply(edit)
    clean_after, marked_after, all_after = scores()
    rewriter.undo()
    print(f"rank-{args.rank} rewrite from {args.examples} examples: clean {clean_after:.4f}, watermarked "
          f"{all_after:.4f}, on roofs {marked_after:.4f} (constraint loss {edit.loss_before:.4g} -> "
          f"{edit.loss_after:.4g}, expected change {edit.expected_change:.4f} of the layer's output energy)")

    saved = finetune(model, LAYER, req_x, req_y, args.finetune_steps, args.finetune_lr)
    clean_ft, marked_ft, all_ft = scores()
    with torch.no_grad():
        for name, p in model.get_submodule(LAYER).named_parameters():
            p.copy_(saved[name])
    print(f"fine-tuning {LAYER} on the same examples ({args.finetune_steps} steps): clean {clean_ft:.4f}, "
          f"watermarked {all_ft:.4f}, on roofs {marked_ft:.4f}")
    print(f"eval_classifier_edit: watermarked_acc_before={marked_before:.4f} watermarked_acc_after={marked_after:.4f} "
          f"clean_acc_delta={100 * (clean_after - clean_before):+.2f} finetune_watermarked_acc={marked_ft:.4f} "
          f"finetune_clean_acc_delta={100 * (clean_ft - clean_before):+.2f}")


if __name__ == "__main__":
    main()
