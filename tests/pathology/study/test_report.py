"""Means and t-intervals over seeds, the Pareto front, the Markdown table: checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pathology.study.report import markdown_table, mean_ci, pareto_front, summarise, write_report

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)


def test_mean_ci_of_three_values_by_hand() -> None:
    """[1, 2, 3]: mean 2, sd 1, half width t(0.975, 2) / sqrt(3)."""
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(T_975_DF2 / math.sqrt(3))
    assert mean - low == pytest.approx(T_975_DF2 / math.sqrt(3))


def test_mean_ci_is_clipped_to_the_metric_range() -> None:
    """[0.9, 1.0]: half width t(0.975, 1) * 0.0707 / sqrt(2) = 0.635, so the upper bound stops at 1."""
    mean, low, high = mean_ci([0.9, 1.0], bounds=(0.0, 1.0))
    assert mean == pytest.approx(0.95)
    assert low == pytest.approx(0.95 - 12.706204736 * math.sqrt(0.005) / math.sqrt(2))
    assert high == 1.0


def test_mean_ci_of_one_value_has_no_interval() -> None:
    mean, low, high = mean_ci([0.7, float("nan")])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)


def test_pareto_front_by_hand() -> None:
    """(speed, accuracy): (10, .9) and (100, .6) are optimal; (100, .6) beats (50, .5), (10, .9) beats (10, .8)."""
    speed = np.array([10, 100, 50, 10])
    value = np.array([0.9, 0.6, 0.5, 0.8])
    assert pareto_front(speed, value).tolist() == [True, True, False, False]


def _results() -> pd.DataFrame:
    rows = []
    for res, mpp, acc in (("20x", 20.0, (0.9, 0.8)), ("2.5x", 2.5, (0.5, 0.6))):
        for seed, value in enumerate(acc):
            rows.append({"cell": f"c_{res}_{seed}", "task": "chromatin", "resolution": res, "mpp_or_power": mpp,
                         "unit": "power", "mhsa_blocks": "32:1", "tile_size": 32, "seed": seed, "status": "ok",
                         "tile_balanced_accuracy": value, "throughput": 100.0 + seed, "error": ""})
    rows.append({**rows[0], "cell": "broken", "seed": 9, "status": "error", "error": "x.svs: cannot open",
                 "tile_balanced_accuracy": float("nan")})
    return pd.DataFrame(rows)


def test_summary_pools_seeds_and_skips_failed_cells() -> None:
    summary = summarise(_results())
    assert summary["n_seeds"].tolist() == [2, 2]
    assert summary["tile_balanced_accuracy"].tolist() == pytest.approx([0.85, 0.55])
    # Field of view: 32 px at 10 / 20 = 0.5 µm/px is 16 µm; at 2.5x, 4 µm/px, 128 µm.
    assert summary["field_um"].tolist() == pytest.approx([16.0, 128.0])
    table = markdown_table(summary)
    assert "| chromatin | 20x | 32:1 | 32 | 16 | 2 | 0.85 [" in table


def test_write_report_lists_failures_and_links_plots(tmp_path) -> None:
    report = write_report(tmp_path, _results(), extra="## More")
    text = report.read_text()
    assert "4 of 5 cells finished" in text
    assert "`broken` failed: x.svs: cannot open" in text
    assert (tmp_path / "metric_vs_resolution.png").stat().st_size > 0
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert text.rstrip().endswith("## More")
    assert not list(tmp_path.glob(".*tmp*"))
