"""The walk-through's reference table: consistent with its own cost column, found by precision and steps."""

import pytest

from backend.core import walkthrough
from backend.core.stats import cost_per_10k_images


@pytest.mark.parametrize("row", walkthrough.ROWS, ids=lambda r: f"{r.precision}-{r.steps}")
def test_each_row_costs_what_its_qps_and_the_price_give(row):
    # A mistyped P95, QPS or cost shows here: the walk-through derived its cost column from QPS and price.
    assert cost_per_10k_images(walkthrough.PRICE_PER_HOUR, row.qps) == pytest.approx(row.cost_per_10k, abs=0.01)
    # QPS at concurrency 1 is at most 1 / mean latency, and the P95 is at least the mean.
    assert row.qps <= 1.0 / row.p95_s * 1.15


def test_rows_cover_both_precisions_at_20_30_50_steps():
    assert sorted((r.precision, r.steps) for r in walkthrough.ROWS) == [
        ("bf16", 20), ("bf16", 30), ("bf16", 50), ("fp32", 20), ("fp32", 30), ("fp32", 50)]
    assert walkthrough.reference_for("bf16", 20).p95_s == 0.908
    assert walkthrough.reference_for("fp32", 50).p95_s == 2.365


@pytest.mark.parametrize("precision, steps", [("bf16", 25), ("fp16", 20), (None, 20), ("bf16", None)])
def test_no_row_where_the_walkthrough_measured_none(precision, steps):
    assert walkthrough.reference_for(precision, steps) is None


def test_a_row_says_whose_figure_it_is():
    line = walkthrough.reference_for("bf16", 20).describe()
    assert line.startswith("AWS walk-through, inf2.xlarge, SD2.1 512x512, bf16, 20 steps: P95 0.908 s")
