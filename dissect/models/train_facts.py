"""Train the fact transformer (``python -m dissect.models.train_facts``) and export it as fp16 safetensors.

Each step draws a batch of true facts in random phrasings with random filler prefixes and minimises the
cross-entropy of the object token (the only token the evaluation reads). A few minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .facts import WEIGHTS, FactsCorpus, FactsGPT, answer_accuracy


def train(corpus: FactsCorpus, steps: int = 3000, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
          log_every: int = 250, **model_args: int) -> FactsGPT:
    """A :class:`FactsGPT` trained on ``corpus`` for ``steps`` AdamW steps (cosine schedule, warm-up)."""
    torch.manual_seed(seed)
    model = FactsGPT(len(corpus.vocab), **model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    start = time.perf_counter()
    for step in range(steps):
        tokens = torch.stack([corpus.sample(seed * 10_000_019 + step * batch_size + i) for i in range(batch_size)])
        loss = F.cross_entropy(model(tokens)[:, -2], tokens[:, -1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


def export(model: FactsGPT, corpus: FactsCorpus, path: str) -> None:
    """fp16 weights with the corpus and model configuration in the metadata (``load_facts`` reads them)."""
    meta = {"corpus": {"n_entities": corpus.n_entities, "seed": corpus.seed}, "model": model.config}
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"facts": json.dumps(meta)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", type=int, default=300)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    corpus = FactsCorpus(args.entities)
    model = train(corpus, args.steps, args.batch_size, args.lr, args.seed, d=args.d, layers=args.layers,
                  hidden=args.hidden)
    export(model, corpus, args.export)
    print(f"train_facts: accuracy={answer_accuracy(model, corpus):.4f} exported={args.export}")


if __name__ == "__main__":
    main()
