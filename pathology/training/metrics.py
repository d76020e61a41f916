"""Tile-level classification metrics (scikit-learn), computed once per epoch on all predictions."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

__all__ = ["classification_metrics"]


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, F1, AUROC, accuracy and the confusion matrix of argmax predictions.

    Args:
        labels: (N,) true class indices.
        probs: (N, C) class probabilities (rows sum to 1).

    Returns:
        ``balanced_accuracy``, ``accuracy``, ``f1`` (of class 1 for two classes, macro otherwise),
        ``auroc`` (of class 1 for two classes, one-vs-rest macro otherwise; NaN when ``labels``
        hold one class) and ``cm_<true>_<pred>`` tile counts.
    """
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
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
