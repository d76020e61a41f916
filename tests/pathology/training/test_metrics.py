"""``pathology.training.metrics``: predictions and metrics at a decision threshold, by hand."""
from __future__ import annotations

import numpy as np
import pytest

from pathology.training.metrics import classification_metrics, predicted_classes

LABELS = np.array([0, 0, 1, 1])
P_POS = np.array([0.1, 0.35, 0.3, 0.9])  # argmax predictions: 0, 0, 0, 1
PROBS = np.stack([1 - P_POS, P_POS], axis=1)


def test_a_threshold_moves_the_decision_by_hand() -> None:
    assert predicted_classes(PROBS).tolist() == [0, 0, 0, 1]
    assert predicted_classes(PROBS, 0.3).tolist() == [0, 1, 1, 1]  # >= counts: 0.3 is positive
    assert predicted_classes(PROBS, 0.95).tolist() == [0, 0, 0, 0]


def test_metrics_at_a_threshold_by_hand() -> None:
    m = classification_metrics(LABELS, PROBS, threshold=0.3)  # predictions 0, 1, 1, 1
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # precision 2/3, recall 1
    assert (m["cm_0_0"], m["cm_0_1"], m["cm_1_0"], m["cm_1_1"]) == (1, 1, 0, 2)
    assert m["auroc"] == pytest.approx(3 / 4)  # the ranking, whatever the threshold: 0.3 < 0.35 misordered
    argmax = classification_metrics(LABELS, PROBS)  # predictions 0, 0, 0, 1
    assert argmax["balanced_accuracy"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert argmax["auroc"] == m["auroc"]


def test_a_threshold_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="two classes"):
        classification_metrics(np.array([0, 1, 2]), np.eye(3), threshold=0.5)
