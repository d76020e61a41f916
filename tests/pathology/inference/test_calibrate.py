"""Temperature and threshold: hand-computed ROC points and a temperature recovered from simulation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pathology.inference.calibrate import (
    Calibration,
    calibration_path,
    decide,
    fit_temperature,
    main,
    sensitivity_threshold,
    temper,
    youden_threshold,
)
from pathology.inference.results import write_run

# Four positives and three negatives; one negative (0.65) outranks one positive (0.6).
POSITIVE_SCORES = [0.6, 0.7, 0.8, 0.9]
NEGATIVE_SCORES = [0.1, 0.3, 0.65]
SCORES = np.array(NEGATIVE_SCORES + POSITIVE_SCORES)
IS_POSITIVE = np.array([False] * 3 + [True] * 4)


def test_temper_square_root() -> None:
    # T = 2 takes square roots: sqrt(0.2) : sqrt(0.8) = 1 : 2
    np.testing.assert_allclose(temper(np.array([[0.2, 0.8]]), 2.0), [[1 / 3, 2 / 3]])
    np.testing.assert_allclose(temper(np.array([[0.2, 0.8]]), 1.0), [[0.2, 0.8]])


def test_youden_threshold_by_hand() -> None:
    # at 0.7: sensitivity 3/4, false-positive rate 0 -> J = 0.75; at 0.6: 1 - 1/3 -> J = 0.67
    assert youden_threshold(IS_POSITIVE, SCORES) == pytest.approx(0.7)


@pytest.mark.parametrize(("target", "expected"), [(1.0, 0.6), (0.75, 0.7), (0.5, 0.8), (0.3, 0.8), (0.25, 0.9)])
def test_sensitivity_threshold_by_hand(target: float, expected: float) -> None:
    assert sensitivity_threshold(IS_POSITIVE, SCORES, target) == pytest.approx(expected)


def test_threshold_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        youden_threshold(np.ones(3, bool), np.array([0.1, 0.5, 0.9]))


def test_fit_temperature_recovers_overconfidence() -> None:
    # True class-1 probability sigmoid(z); the model reports sigmoid(2 z), i.e. over-confident by T = 2.
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, 20_000)
    labels = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    reported = 1 / (1 + np.exp(-2 * z))
    temperature = fit_temperature(np.stack([1 - reported, reported], axis=1), labels)
    assert temperature == pytest.approx(2.0, rel=0.05)


def test_decide_falls_back_to_best_other_class() -> None:
    calibrated = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.2, 0.35, 0.45]])
    # positive class 2, threshold 0.4: only the last slide reaches it; the others take their best of 0 and 1
    np.testing.assert_array_equal(decide(calibrated, 2, 0.4), [0, 1, 2])


def _write_validation_run(run_dir, checkpoint_dir):
    slide_ids = [f"s{i}" for i in range(len(SCORES))]
    table = pd.DataFrame({"slide_id": slide_ids, "status": "ok", "mean_normal": 1 - SCORES, "mean_tumour": SCORES})
    table.loc[len(table)] = {"slide_id": "blank", "status": "no-tissue"}
    write_run(run_dir, table, {"class_names": ["normal", "tumour"], "aggregations": ["mean"]})
    labels = pd.DataFrame({"slide_id": slide_ids, "label": ["normal"] * 3 + ["tumour"] * 4})
    labels.to_csv(run_dir / "labels.csv", index=False)
    return checkpoint_dir / "best.ckpt"


def test_cli_stores_calibration_next_to_checkpoint(tmp_path) -> None:
    checkpoint = _write_validation_run(tmp_path, tmp_path)
    assert main(["--predictions", str(tmp_path), "--labels", str(tmp_path / "labels.csv"),
                 "--checkpoint", str(checkpoint)]) == 0
    path = calibration_path(checkpoint)
    assert path == tmp_path / "best.ckpt.calibration.json"
    calibration = Calibration.load(path)
    assert (calibration.aggregation, calibration.positive_class, calibration.method) == ("mean", "tumour", "youden")
    # Tempering is monotone, so the stored threshold calls positive exactly the slides at or above
    # the raw Youden threshold 0.7 found by hand above.
    calibrated = temper(np.stack([1 - SCORES, SCORES], axis=1), calibration.temperature)
    np.testing.assert_array_equal(decide(calibrated, 1, calibration.threshold) == 1, SCORES >= 0.7)


def test_cli_names_bad_labels_file(tmp_path, capsys) -> None:
    checkpoint = _write_validation_run(tmp_path, tmp_path)
    bad = tmp_path / "bad_labels.csv"
    bad.write_text("slide_id,label\ns0,cancer\n")
    assert main(["--predictions", str(tmp_path), "--labels", str(bad), "--checkpoint", str(checkpoint)]) == 1
    assert "bad_labels.csv" in capsys.readouterr().err
    assert not calibration_path(checkpoint).exists()
