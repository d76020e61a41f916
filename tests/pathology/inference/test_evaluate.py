"""Slide metrics against hand-computed AUROCs and the Hanley-McNeil standard error."""
from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from pathology.inference.evaluate import auroc, bootstrap_ci, main
from pathology.inference.results import write_run


def test_auroc_binary_by_hand() -> None:
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of the 4 pairs ranked right
    class1 = np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(np.array([0, 0, 1, 1]), np.stack([1 - class1, class1], axis=1)) == pytest.approx(0.75)


def test_auroc_three_classes_is_macro_one_vs_rest() -> None:
    labels = np.array([0, 1, 2, 2])
    scores = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    # class 0: 0.8 beats 0.1, 0.1, 0.5 -> 1; class 1: 0.8 beats 0.1, 0.2, 0.4 -> 1;
    # class 2: {0.7, 0.1} vs {0.1, 0.1}: 0.7 wins twice, 0.1 ties twice -> (2 + 1) / 4
    assert auroc(labels, scores) == pytest.approx((1 + 1 + 0.75) / 3)


def test_bootstrap_ci_width_matches_hanley_mcneil() -> None:
    rng = np.random.default_rng(0)
    n = 150  # per class
    labels = np.repeat([0, 1], n)
    class1 = np.concatenate([rng.normal(0, 1, n), rng.normal(1.2, 1, n)])
    scores = np.stack([-class1, class1], axis=1)
    a = auroc(labels, scores)
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    se = np.sqrt((a * (1 - a) + (n - 1) * (q1 - a**2) + (n - 1) * (q2 - a**2)) / n**2)
    low, high = bootstrap_ci(labels, scores, auroc, n_resamples=400)
    assert low < a < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_bootstrap_ci_of_perfect_separation_is_a_point() -> None:
    class1 = np.array([0.1, 0.2, 0.8, 0.9])
    assert bootstrap_ci(np.array([0, 0, 1, 1]), np.stack([1 - class1, class1], 1), auroc, n_resamples=50) == (1, 1)


def test_cli_writes_metrics_and_roc(tmp_path, capsys) -> None:
    # mean scores for tumour: negatives 0.2, 0.6; positives 0.4, 0.9. Argmax calls 0.6 and 0.9 tumour.
    tumour = np.array([0.2, 0.6, 0.4, 0.9])
    table = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "status": "ok",
                          "mean_normal": 1 - tumour, "mean_tumour": tumour,
                          "calibrated_normal": 1 - tumour, "calibrated_tumour": tumour})
    calibration = {"aggregation": "mean", "positive_class": "tumour", "threshold": 0.35,
                   "temperature": 1.0, "method": "youden"}
    write_run(tmp_path, table, {"class_names": ["normal", "tumour"], "aggregations": ["mean"],
                                "calibration": calibration})
    pd.DataFrame({"slide_id": list("abcd"), "label": [0, 0, 1, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    assert main(["--predictions", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--bootstrap", "50"]) == 0
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["methods"]
    # AUROC: 0.4 beats 0.2 only, 0.9 beats both -> 3/4
    assert metrics["mean"]["auroc"] == pytest.approx(0.75)
    # argmax: a normal (right), b tumour (wrong), c normal (wrong), d tumour (right)
    assert metrics["mean"]["confusion_matrix"] == [[1, 1], [1, 1]]
    assert metrics["mean"]["balanced_accuracy"] == pytest.approx(0.5)
    # threshold 0.35 calls b, c, d tumour: sensitivity 1, specificity 1/2
    assert metrics["calibrated"]["confusion_matrix"] == [[1, 1], [0, 2]]
    assert metrics["calibrated"]["balanced_accuracy"] == pytest.approx(0.75)
    image = matplotlib.image.imread(tmp_path / "evaluation" / "roc_mean.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert "balanced_accuracy" in pd.read_csv(tmp_path / "evaluation" / "metrics.csv").columns
    assert "mean" in capsys.readouterr().out


def test_cli_names_missing_run(tmp_path, capsys) -> None:
    assert main(["--predictions", str(tmp_path / "nowhere"), "--labels", str(tmp_path / "labels.csv")]) == 1
    assert "slides.csv" in capsys.readouterr().err
