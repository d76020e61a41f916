"""Tile-level classification metrics (scikit-learn), computed once per epoch on all predictions."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from pathology.inference.calibrate import decide, youden_threshold

__all__ = ["POSITIVE_INDEX", "classification_metrics", "predicted_classes", "youden_tile_threshold"]

POSITIVE_INDEX = 1  # a binary classifier's decision threshold is on class 1's probability
MAX_THRESHOLD = 1.0  # roc_curve's first threshold is +inf ("nothing positive")


def youden_tile_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold on class 1's probability maximising sensitivity + specificity − 1 over labelled
    tiles (at most 1), for :func:`predicted_classes`; choose it on validation patients only.

    Args:
        labels: (N,) true class indices (0 or 1).
        probs: (N, 2) class probabilities.

    Raises:
        InferenceError: the tiles do not hold both classes.
    """
    return min(youden_threshold(labels == POSITIVE_INDEX, probs[:, POSITIVE_INDEX]), MAX_THRESHOLD)


def predicted_classes(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """(N,) class indices: argmax, or for two classes class 1 iff its probability ≥ ``threshold``.

    Args:
        probs: (N, C) class probabilities.
        threshold: on class 1's probability; None for argmax.

    Raises:
        ValueError: a threshold for other than two classes.
    """
    if threshold is None:
        return probs.argmax(axis=1)
    if probs.shape[1] != 2:
        raise ValueError(f"a decision threshold needs two classes, got {probs.shape[1]}")
    return decide(probs, POSITIVE_INDEX, threshold)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """Balanced accuracy, F1, AUROC, accuracy and the confusion matrix of the predicted classes.

    Args:
        labels: (N,) true class indices.
        probs: (N, C) class probabilities (rows sum to 1).
        threshold: two classes: predict class 1 iff its probability ≥ ``threshold``; None: argmax.

    Returns:
        ``balanced_accuracy``, ``accuracy``, ``f1`` (of class 1 for two classes, macro otherwise),
        ``auroc`` (of class 1 for two classes, one-vs-rest macro otherwise; NaN when ``labels``
        hold one class; it does not depend on the threshold) and ``cm_<true>_<pred>`` tile counts.

    Raises:
        ValueError: a threshold for other than two classes.
    """
    n_classes = probs.shape[1]
    preds = predicted_classes(probs, threshold)
    binary = n_classes == 2
    metrics = {
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "accuracy": float(np.mean(preds == labels)),
        "f1": float(f1_score(labels, preds, average="binary" if binary else "macro",
                             labels=None if binary else list(range(n_classes)), zero_division=0)),
        "auroc": float("nan"),
    }
    if len(np.unique(labels)) == n_classes:
        metrics["auroc"] = float(roc_auc_score(labels, probs[:, 1]) if binary
                                 else roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(n_classes))))
    cm = confusion_matrix(labels, preds, labels=list(range(n_classes)))
    metrics |= {f"cm_{t}_{p}": float(cm[t, p]) for t in range(n_classes) for p in range(n_classes)}
    return metrics
