"""Means and t-intervals over seeds, the Pareto front, the Markdown table: checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pathology.study.report import findings_markdown, markdown_table, mean_ci, pareto_front, summarise, write_report

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
    assert "| chromatin | 20x | 0.5 | 32:1 | gelu | 32 | 16 | 2 | 0.85 [" in table  # rows without act_layer: gelu


def test_resolution_axis_is_the_delivered_mpp_with_the_configured_power_beside_it(tmp_path) -> None:
    """A 0.2282 µm/px 40x scanner: 20x delivered 2 x 0.2282 = 0.4564 µm/px, so a 32-px tile is 14.6 µm
    (nominal: 16); 2.5x delivered 16 x 0.2282 = 3.651 µm/px, 116.8 µm (nominal: 128)."""
    results = _results()
    results["tile_mpp"] = results["resolution"].map({"20x": 2 * 0.2282, "2.5x": 16 * 0.2282})
    results.loc[results["cell"] == "broken", "tile_mpp"] = float("nan")  # failed before tiling finished
    summary = summarise(results)
    assert summary["tile_mpp"].tolist() == pytest.approx([0.4564, 3.6512])
    assert summary["field_um"].tolist() == pytest.approx([32 * 0.4564, 32 * 3.6512])
    table = markdown_table(summary)
    assert "| chromatin | 20x | 0.456 | 32:1 | gelu | 32 | 15 | 2 |" in table
    assert "| chromatin | 2.5x | 3.65 | 32:1 | gelu | 32 | 117 | 2 |" in table
    write_report(tmp_path, results)
    assert (tmp_path / "metric_vs_resolution.png").stat().st_size > 0
    assert pd.read_csv(tmp_path / "summary.csv")["field_um"].tolist() == pytest.approx([14.6048, 116.8384])


def test_write_report_lists_failures_and_links_plots(tmp_path) -> None:
    report = write_report(tmp_path, _results(), extra="## More")
    text = report.read_text()
    assert "4 of 5 cells finished" in text
    assert "`broken` failed: x.svs: cannot open" in text
    assert (tmp_path / "metric_vs_resolution.png").stat().st_size > 0
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert text.rstrip().endswith("## More")
    assert not list(tmp_path.glob(".*tmp*"))


ACCURACY = {("20x", "32:1"): (0.95, 0.97, 0.99), ("20x", "16:1,32:1"): (0.94, 0.96, 0.98),
            ("5x", "32:1"): (0.50, 0.52, 0.48), ("5x", "16:1,32:1"): (0.55, 0.45, 0.50)}
THROUGHPUT = {("20x", "32:1"): (100.0, 102.0, 30.0),  # seed 2 measured while the machine was busy
              ("20x", "16:1,32:1"): (80.0, 81.0, 79.0), ("5x", "32:1"): (400.0, 401.0, 399.0),
              ("5x", "16:1,32:1"): (300.0, 301.0, 299.0)}


def _study_results() -> pd.DataFrame:
    """Two resolutions x two placements x three seeds of a two-class task; 5x is at chance."""
    rows = []
    for (res, mhsa), accuracies in ACCURACY.items():
        for seed, (accuracy, speed) in enumerate(zip(accuracies, THROUGHPUT[res, mhsa])):
            name = f"chromatin_{res}_{mhsa}_seed{seed}"
            rows.append({"cell": name, "task": "chromatin", "resolution": res, "mpp_or_power": float(res[:-1]),
                         "unit": "power", "mhsa_blocks": mhsa, "tile_size": 64, "seed": seed, "n_classes": 2,
                         "status": "ok", "tile_balanced_accuracy": accuracy, "throughput": speed,
                         "checkpoint": f"cells/{name}/best.ckpt", "error": ""})
    return pd.DataFrame(rows)


def test_throughput_is_the_median_and_chance_is_marked() -> None:
    """20x/32:1 throughput: median(100, 102, 30) = 100, not the mean 77.3. At 5x both intervals reach
    0.5 (mean 0.5), chance for two classes; at 20x the lower bounds are 0.97 - 0.0497 and 0.96 - 0.0497."""
    summary = summarise(_study_results())
    assert summary["throughput"].tolist() == [100.0, 80.0, 400.0, 300.0]
    assert summary["at_chance"].tolist() == [False, False, True, True]
    assert summary["tile_balanced_accuracy_low"].iloc[0] == pytest.approx(0.97 - T_975_DF2 * 0.02 / math.sqrt(3))
    assert "throughput (tiles/s, median)" in markdown_table(summary)


def test_findings_say_what_won_by_how_much_and_where_the_checkpoint_is() -> None:
    """Resolution: 20x (0.970) against 5x (best 0.500): +0.470, intervals [0.920, 1] and [<=0.55]
    apart. Placement: 32:1 (0.970) against 16:1,32:1 (0.960): +0.010, intervals overlap."""
    text = findings_markdown(_study_results(), "tile_balanced_accuracy")
    assert ("resolution 20x won: tile_balanced_accuracy 0.970 against 0.500 at 5x (+0.470), beyond the seed "
            "spread") in text
    assert ("mhsa_blocks 32:1 won: tile_balanced_accuracy 0.970 against 0.960 at 16:1,32:1 (+0.010), within the "
            "seed spread") in text
    assert "At chance (0.50): 5x, 32:1, gelu, 64; 5x, 16:1,32:1, gelu, 64." in text
    assert "act_layer" not in text  # one activation: nothing to compare
    assert "Best cell `chromatin_20x_32:1_seed2` (tile_balanced_accuracy 0.990), checkpoint " \
           "`cells/chromatin_20x_32:1_seed2/best.ckpt`" in text
    assert "cell `chromatin_20x_32:1_seed2` measured 30.0 tiles/s against a median of 100.0" in text
    assert text.count("measured") == 1  # 102 / 100 and the other grid points are not flagged


def test_one_seed_has_no_spread_to_compare() -> None:
    results = _study_results()
    text = findings_markdown(results[results["seed"] == 0], "tile_balanced_accuracy")
    assert "one seed, so the seed spread is unknown" in text


def test_act_layer_values_are_grid_points_of_their_own(tmp_path) -> None:
    """A relu model at 20x/32:1 (0.80, 0.82, 0.84; 150 tiles/s) beside the gelu cells recorded before the
    axis (act_layer empty, read as gelu). gelu's best grid point 0.970 [0.920, 1] against relu's 0.820
    [0.770, 0.870]: +0.150, apart. Median throughput of the task's gelu cells, 12 values: (102 + 299) / 2."""
    gelu = _study_results().assign(act_layer=float("nan"))
    relu = gelu[(gelu["resolution"] == "20x") & (gelu["mhsa_blocks"] == "32:1")].assign(
        act_layer="relu", tile_balanced_accuracy=[0.80, 0.82, 0.84], throughput=[150.0, 151.0, 149.0])
    results = pd.concat([gelu, relu.assign(cell=relu["cell"] + "_relu")], ignore_index=True)
    summary = summarise(results)
    assert len(summary) == 5
    assert summary["act_layer"].tolist() == ["gelu"] * 4 + ["relu"]
    assert summary["throughput"].iloc[-1] == 150.0
    assert "| chromatin | 20x | 0.5 | 32:1 | relu | 64 | 32 | 3 | 0.82 [" in markdown_table(summary)
    text = findings_markdown(results, "tile_balanced_accuracy")
    assert ("act_layer gelu won: tile_balanced_accuracy 0.970 against 0.820 at relu (+0.150), beyond the seed "
            "spread (95 % intervals apart); median throughput gelu 200.5, relu 150.0 tiles/s") in text
    write_report(tmp_path, results)
    assert (tmp_path / "pareto.png").stat().st_size > 0
