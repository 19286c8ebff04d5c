"""The simulated newcomer of benchmarks/eval_user.py: strokes of the default brush cover what they brush, as the
canvas would send them."""

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from eval_user import stroke_mask  # noqa: E402


def test_strokes_cover_the_region_with_a_brush_margin_and_nothing_far_away():
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[20:26, 30:44] = True  # a watermark-sized bar
    mask = stroke_mask(region, random.Random(0))
    assert mask.shape == (64, 64) and mask.dtype == torch.float32 and 0 <= mask.min() and mask.max() <= 1
    assert (mask[region] > 0).float().mean() > 0.95  # the brush covers what it is drawn over…
    far = torch.ones_like(region)
    far[14:32, 24:50] = False
    assert mask[far].sum() == 0  # …spills over by about a brush radius, not more
    assert (mask > 0).sum() > region.sum()  # a person's strokes are wider than the object


def test_strokes_differ_between_draws_but_repeat_for_a_seed():
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[10:30, 10:14] = True  # a thin spire
    a, b, c = (stroke_mask(region, random.Random(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
