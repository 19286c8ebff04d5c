"""Rewriting facts in a transformer, measured like CounterFact with exact answers (issue 19).

The shipped fact model (``dissect.models.facts``) knows one object per (entity, relation); each edit asks for a
different object. ROME-style edits (``dissect.models.facts.edit_facts``: ``k*`` averaged over filler prefixes,
``v*`` optimised so that the model answers the new object, stored by ``dissect.valuetargets.insert`` with the
least change in the metric of C) at ``blocks.{L}.mlp.proj``:

1. layer sweep: ``--sweep`` facts edited one at a time at every block; the best layer maximises the harmonic
   mean of efficacy, paraphrase and neighbourhood (CounterFact's score);
2. single edits at the best layer, one at a time: efficacy (edit phrasing, unseen prefix), paraphrase (the two
   other phrasings), neighbourhood (other entities, same relation, those sharing the subject's last token first);
3. a MEMIT-style batch: ``--batch`` facts in one edit at the best layer;
4. sequential edits: ``--sequential`` facts edited one after another, each solved against the weight the
   previous ones left: naive (exact storage, nothing protected) and protected (the edit core's default
   ``solve(..., protect=earlier edits)``, soft protection, with a smoothness budget ``--seq-budget`` per edit);
   at 1, 10, 100, 1000 edits, the efficacy of all edits so far and the accuracy on facts never edited;
5. causal tracing over ``--trace`` facts: where restoring a clean hidden state recovers the fact.

Usage::

    python benchmarks/eval_facts.py --single 50 --sweep 10 --batch 50 --trace 10   # RESULTS.md's run (32 min, loaded CPU)
    python benchmarks/eval_facts.py --single 20 --sweep 8 --sequential 100 --batch 20 --trace 5   # quick
    python benchmarks/eval_facts.py --layer 0 --sequential 1000 ...                 # skip the sweep
    python benchmarks/eval_facts.py --layer 0 --only-sequential --sequential 1000 --skip-naive   # protected run only

The causal-tracing grid is also drawn to ``--figure`` (a PNG heatmap).

Ends with ``eval_facts: efficacy=E paraphrase=P neighborhood=N seq1000_efficacy=S seq1000_naive_efficacy=Q
seq1000_neighborhood=M best_layer=L`` (on one line; unmeasured figures are ``nan``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dissect.memory import LayerMemory
from dissect.models.facts import (
    SEQ_LEN,
    WEIGHTS,
    answer_accuracy,
    applied,
    causal_trace,
    counterfactuals,
    edit_facts,
    edit_layer,
    evaluate,
    layer_sweep,
    load_facts,
)

CHECKPOINTS = (1, 10, 100, 1000)
# Each protected sequential edit may move this share of the layer's output energy: exact storage (budget=None)
# grows without bound where keys crowd, so sequential edits need a budget, and n of them move about n times it
# in all. 0.0003 keeps the untouched facts at 0.43 after 1000 edits where 0.001 keeps 0.19 (RESULTS.md).
SEQ_BUDGET = 0.0003
nan = float("nan")


def mean_scores(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def sequential(model, corpus, memory: LayerMemory, facts, checkpoints, protect: bool, **edit_args
               ) -> dict[int, dict[str, float]]:
    """Sequential edits, each solved on the current weight and added in place, with the earlier ones protected
    (``protect``) or not; restores the weight after."""
    edited = {(f.entity, f.relation) for f in facts}
    untouched = [f for f in corpus.all_facts() if (f.entity, f.relation) not in edited]
    weight = memory.weight
    saved = weight.detach().clone()
    out, history = {}, []
    try:
        for i, fact in enumerate(facts, 1):
            edit = edit_facts(memory, corpus, [fact], protect=history if protect else (), **edit_args)
            history.append(edit)
            with torch.no_grad():
                weight += memory.delta(edit.lam, edit.directions)
            if i in checkpoints:
                out[i] = {"efficacy": evaluate(model, corpus, facts[:i], n_neighbours=0)["efficacy"],
                          "untouched": answer_accuracy(model, corpus, untouched, prefix_seed=12345)}
                print(f"  {i} sequential edits: efficacy of all so far {out[i]['efficacy']:.3f}, "
                      f"accuracy on facts never edited {out[i]['untouched']:.3f}", flush=True)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    return out


def trace_figure(grid: torch.Tensor, path: Path, subject_last: int) -> None:
    """The causal-tracing grid as a PNG heatmap (rows: blocks, columns: token positions)."""
    from PIL import Image, ImageDraw

    cell, left, top = 28, 60, 20
    img = Image.new("RGB", (left + cell * grid.shape[1] + 10, top + cell * grid.shape[0] + 30), "white")
    draw = ImageDraw.Draw(img)
    hi = float(grid.max()) or 1.0
    for layer in range(grid.shape[0]):
        draw.text((4, top + layer * cell + 8), f"block {layer}", fill="black")
        for t in range(grid.shape[1]):
            v = float(grid[layer, t]) / hi
            colour = (int(255 * (1 - v * 0.8)), int(255 * (1 - v)), 255)
            draw.rectangle([left + t * cell, top + layer * cell, left + (t + 1) * cell - 1, top + (layer + 1) * cell - 1],
                           fill=colour)
    names = {subject_last: "subj", SEQ_LEN - 2: "ans"}
    for t in range(grid.shape[1]):
        draw.text((left + t * cell + 4, top + grid.shape[0] * cell + 6), names.get(t, str(t)), fill="black")
    draw.text((left, 4), f"p(true object), clean state restored at (block, token)  (max {hi:.2f})", fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(WEIGHTS))
    parser.add_argument("--sweep", type=int, default=20, help="facts edited per layer in the sweep")
    parser.add_argument("--single", type=int, default=100, help="single ROME edits at the best layer")
    parser.add_argument("--batch", type=int, default=100, help="facts in one MEMIT-style edit")
    parser.add_argument("--sequential", type=int, default=1000, help="sequential edits")
    parser.add_argument("--trace", type=int, default=20, help="facts for causal tracing")
    parser.add_argument("--moment", type=int, default=4000, help="sequences C is taken over")
    parser.add_argument("--layer", type=int, default=None, help="skip the sweep and edit this block")
    parser.add_argument("--figure", default="eval_facts_trace.png")
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps for each v*")
    parser.add_argument("--prefixes", type=int, default=3, help="filler prefixes each k* / v* is taken over")
    parser.add_argument("--seq-budget", type=float, default=SEQ_BUDGET,
                        help="smoothness budget of each protected sequential edit (share of the layer's output energy)")
    parser.add_argument("--only-sequential", action="store_true",
                        help="run only the sequential edits (needs --layer); other figures print as nan")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive sequential edits")
    parser.add_argument("--budget-only", action="store_true",
                        help="also run the sequential edits with the budget but no protection (a control)")
    args = parser.parse_args()
    if args.only_sequential:
        if args.layer is None:
            parser.error("--only-sequential needs --layer (the block the sweep chose)")
        args.trace = args.single = args.batch = 0
    torch.set_num_threads(1)
    start = time.perf_counter()
    edit_args = {"n_prefixes": args.prefixes, "steps": args.steps}
    model, sampler = load_facts(args.model)
    model = model.float()
    corpus = sampler.corpus
    print(f"model accuracy on every fact and phrasing: {answer_accuracy(model, corpus):.4f}")

    if args.trace:
        facts = [corpus.all_facts()[i] for i in torch.randperm(len(corpus.all_facts()),
                                                                generator=torch.Generator().manual_seed(7))[:args.trace]]
        traces = [causal_trace(model, corpus, f) for f in facts]
        grid = torch.stack([g for g, _, _ in traces]).mean(0)
        clean, corrupted = (sum(t[i] for t in traces) / len(traces) for i in (1, 2))
        _, last = corpus.batch(facts[:1], 0)
        print(f"causal tracing over {len(facts)} facts (phrasing 0): clean p={clean:.3f}, corrupted p={corrupted:.3f}")
        for layer in range(grid.shape[0]):
            print(f"  block {layer}: " + " ".join(f"{float(v):.2f}" for v in grid[layer]))
        print(f"  subject's last token at position {int(last[0])}; answer read at position {SEQ_LEN - 2}")
        trace_figure(grid, Path(args.figure), int(last[0]))

    if args.layer is None:
        sweep = layer_sweep(model, corpus, sampler, counterfactuals(corpus, args.sweep, seed=1), n_moment=args.moment,
                            **edit_args)
        for layer, s in sweep.items():
            print(f"sweep block {layer}: " + " ".join(f"{k}={v:.3f}" for k, v in s.items()))
        best = max(sweep, key=lambda layer: sweep[layer]["score"])
    else:
        best = args.layer
    memory = LayerMemory(model, edit_layer(best))
    memory.fit_moment(sampler, args.moment, progress=False)

    edits = counterfactuals(corpus, max(args.single, args.batch, args.sequential), seed=2)
    runs = []
    for fact in edits[:args.single]:
        with applied(memory, edit_facts(memory, corpus, [fact], **edit_args)):
            runs.append(evaluate(model, corpus, [fact]))
    single = mean_scores(runs) if runs else dict.fromkeys(("efficacy", "paraphrase", "neighborhood"), nan)
    if runs:
        print(f"single edits at block {best} ({args.single}): " + " ".join(f"{k}={v:.3f}" for k, v in single.items()))

    if args.batch:
        batch = edits[:args.batch]
        with applied(memory, edit_facts(memory, corpus, batch, **edit_args)):
            scores = evaluate(model, corpus, batch)
        print(f"one MEMIT-style edit of {args.batch} facts: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))

    # name -> (protect earlier edits, budget per edit)
    runs = {"protected": (True, args.seq_budget), "naive": (False, None), "budget only": (False, args.seq_budget)}
    wanted = ["protected"] + ([] if args.skip_naive else ["naive"]) + (["budget only"] if args.budget_only else [])
    last = dict.fromkeys(runs, {"efficacy": nan, "untouched": nan})
    for name in wanted if args.sequential else []:
        protect, budget = runs[name]
        print(f"{name} sequential edits at block {best} (budget {budget}):", flush=True)
        t = time.perf_counter()
        seq = sequential(model, corpus, memory, edits[:args.sequential], CHECKPOINTS, protect, **edit_args,
                         budget=budget)
        print(f"  ({time.perf_counter() - t:.0f} s)")
        last[name] = seq.get(1000, last[name])
    print(f"({time.perf_counter() - start:.0f} s)")
    print(f"eval_facts: efficacy={single['efficacy']:.3f} paraphrase={single['paraphrase']:.3f} "
          f"neighborhood={single['neighborhood']:.3f} seq1000_efficacy={last['protected']['efficacy']:.3f} "
          f"seq1000_naive_efficacy={last['naive']['efficacy']:.3f} "
          f"seq1000_neighborhood={last['protected']['untouched']:.3f} best_layer={best}")


if __name__ == "__main__":
    main()
