"""Helpers of the benchmark scripts whose outputs RESULTS.md quotes: request masks, the near-duplicate share, the
strength rule, baselines as edits and passes through the Rewriter."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dissect.errors import RequestError
from dissect.measure import Rendered
from dissect.memory import LayerMemory
from dissect.rewrite import Rewriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from diversity import near_duplicate_share  # noqa: E402
from eval_edits import WATERMARK, as_edit, in_passes, saturation_point, watermark_request  # noqa: E402


def test_watermark_request_masks_the_grown_box_of_the_first_marked_images():
    labels = torch.zeros(4, 64, 64, dtype=torch.long)
    labels[1, 20:24, 10:40] = WATERMARK  # 120 pixels: present by the presence rule
    labels[2, 3:5, 3:5] = WATERMARK  # 4 pixels: too few to count
    labels[3, 30:34, 5:25] = WATERMARK
    labels[3, 40, 50] = WATERMARK  # a stray pixel widens this image's box
    pool = Rendered(torch.zeros(4, 3, 64, 64), labels)
    seeds = [10, 11, 12, 13]
    z, masks, chosen = watermark_request(lambda s: torch.tensor(s, dtype=torch.float)[:, None], pool, seeds, 2)
    assert chosen == [11, 13] and z[:, 0].tolist() == [11.0, 13.0]
    expected = torch.zeros(2, 64, 64)
    expected[0, 19:25, 9:41] = 1
    expected[1, 29:42, 4:52] = 1
    assert torch.equal(masks, expected)
    with pytest.raises(ValueError, match="Only 2 watermarked images"):
        watermark_request(lambda s: torch.zeros(len(s), 1), pool, seeds, 3)
    _, _, fewer = watermark_request(lambda s: torch.zeros(len(s), 1), pool, seeds, 3, minimum=1)
    assert fewer == [11, 13]


def test_near_duplicate_share_counts_ordered_pairs_over_the_agreement():
    labels = torch.zeros(4, 10, 10, dtype=torch.long)
    labels[1, 0, :4] = 1  # 96% like image 0: a near duplicate
    labels[2, :2] = 1  # 80% like image 0
    labels[3] = 2  # like none
    # At 95%: (0, 1) and (1, 0). At 80%: also 0 and 2 (80%) and 1 and 2 (84%).
    assert near_duplicate_share(labels) == pytest.approx(2 / 12)
    assert near_duplicate_share(labels, agreement=0.8) == pytest.approx(6 / 12)


def test_the_calibrated_strength_is_where_more_stops_paying():
    strengths = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    assert saturation_point(strengths, (0.07, 0.32, 0.49, 0.57, 0.60, 0.62)) == 2.5  # 0.57 >= 0.9 * 0.62
    assert saturation_point(strengths, (0.01, 0.16, 0.32, 0.43, 0.51, 0.56)) == 3.0
    assert saturation_point(strengths, (0.5, 0.5, 0.5, 0.5, 0.5, 0.5)) == 1.0
    assert saturation_point(strengths, (0.0,) * 6) == 1.0  # nothing converts at any strength: leave it at 1
    assert saturation_point(strengths, (0.1, 0.2, 0.3, 0.4, 0.5, 0.9)) == 4.0
    assert saturation_point(strengths, (0.02, 0.31, 0.54, 0.64, 0.63, 0.50)) == 2.5  # past the peak: 90% of 0.64


def test_a_full_weight_change_is_an_edit_the_rewriter_applies_and_takes_back_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(5, 2))
    rewriter = Rewriter(model)
    for layer in ("0", "2"):
        memory = LayerMemory(model, layer)
        base = memory.weight.detach().clone()
        delta = torch.randn_like(base)
        edit = as_edit(memory, delta, "fine_tune")
        assert edit.lam.shape[:2] == (memory.out_channels, memory.key_channels) and edit.rank == memory.key_channels
        with rewriter.trial([edit.scaled(2.0)]):
            assert torch.allclose(memory.weight, base + 2 * delta, atol=1e-6)
        assert torch.equal(memory.weight, base) and rewriter.history == []


def test_passes_are_kept_while_they_help_and_all_taken_back_at_the_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    memory = LayerMemory(model, "0")
    rewriter = Rewriter(model)
    base = memory.weight.detach().clone()

    def total() -> float:
        return float(memory.weight.detach().sum())

    def run(steps: list[float | None]) -> list[float]:
        def edit_of(p: int):
            if steps[p] is None:
                raise RequestError("nothing left to draw from")
            return as_edit(memory, torch.full_like(base, steps[p]), f"pass {p + 1}")

        return in_passes(rewriter, len(steps), lambda p: p, edit_of, total, total)

    start = total()
    kept = run([1.0, 1.0, -5.0, 1.0])  # the third pass lowers the progress: undone, and the run stops
    assert kept == pytest.approx([start + 6, start + 12], abs=1e-4)
    assert run([1.0, None, 1.0]) == pytest.approx([start + 6], abs=1e-4)  # a refused request ends the run
    assert run([-1.0]) == []
    assert torch.equal(memory.weight, base) and rewriter.history == [] and rewriter.redoable == []
