"""A quick check of the dashboard's watermark recipe at chosen layers: the erase request the browser test brushes.

    python benchmarks/quick_erase.py synthesis.b16.conv1 synthesis.b32.conv0 synthesis.b32.conv1

Context: the first three of seeds 0-59 on which the segmenter sees a watermark, each masked by the watermark's
bounding box; Erase with the dashboard's default units zeroed (DEFAULT_UNITS); ranks 4 and 16. The figure is
watermark prevalence on the dashboard's 200 measure seeds. The comparison with the paper's baselines is eval_edits.py.
"""

import sys
from pathlib import Path

import torch

from dissect.memory import LayerMemory, bounding_boxes
from dissect.models import load
from dissect.models.segmenter import load_segmenter, present
from dissect.models.world import CLASSES
from dissect.rewrite import Context, Erase, Rewriter, solve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the dashboard's measure seeds and stats size
from eval_edits import prevalence, render  # noqa: E402

from dashboard.defaults import DEFAULT_UNITS, MEASURE_SEEDS, STATS_SAMPLES  # noqa: E402


def main() -> None:
    G, sampler = load("spires")
    seg = load_segmenter()
    with torch.no_grad():
        labels = seg.segment(G(sampler(range(60))))
    marked = present(labels, "watermark").nonzero()[:, 0].tolist()[:3]
    masks = bounding_boxes((labels[marked] == CLASSES.index("watermark")).float())
    z = sampler(marked)
    seeds = list(MEASURE_SEEDS)

    def watermarks() -> float:
        return prevalence(render(G, sampler, seg, seeds), "watermark")

    print(f"before: {watermarks():.3f}")
    for layer in sys.argv[1:]:
        memory = LayerMemory(G, layer)
        memory.fit_moment(sampler, STATS_SAMPLES)
        for rank in (4, 16):
            rewriter = Rewriter(G)
            rewriter.apply(solve(memory, Erase(z, masks, units=DEFAULT_UNITS), Context(z, masks, rank)))
            print(f"quick_erase: layer={layer} rank={rank} watermark_after={watermarks():.3f}", flush=True)
            rewriter.undo()


if __name__ == "__main__":
    main()
