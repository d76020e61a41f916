"""``pathology evaluate``: slide-level metrics of an inference run against known labels.

For every aggregation the run computed (and the calibrated score, when the run had a
calibration): AUROC (one-vs-rest macro average for more than two classes) with a percentile
bootstrap 95 % confidence interval over slides, balanced accuracy and the confusion matrix of the
predicted labels, and a ROC curve PNG.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score, roc_curve

from pathology.atomic import atomic_path
from pathology.inference.aggregate import parse_aggregation
from pathology.inference.calibrate import decide
from pathology.inference.results import (
    CALIBRATED,
    labelled_slides,
    scores,
    write_json,
)

__all__ = ["auroc", "bootstrap_ci", "evaluate_method", "main"]

N_BOOTSTRAP = 1000
CI_LEVEL = 0.95


def auroc(labels: np.ndarray, slide_scores: np.ndarray) -> float:
    """AUROC of (S, C) scores: class 1's for two classes, else the macro mean of one-vs-rest AUROCs.

    Raises:
        ValueError: a class is absent (or the only one) among ``labels``.
    """
    n_classes = slide_scores.shape[1]
    if n_classes == 2:
        return float(roc_auc_score(labels == 1, slide_scores[:, 1]))
    return float(np.mean([roc_auc_score(labels == c, slide_scores[:, c]) for c in range(n_classes)]))


def bootstrap_ci(labels: np.ndarray, slide_scores: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
                 *, n_resamples: int = N_BOOTSTRAP, level: float = CI_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` over slides resampled with replacement.

    Resamples missing a class are drawn again (they have no AUROC), so the interval is
    conditional on every class being present. Returns (low, high); NaNs when fewer than two
    classes are present at all.
    """
    rng = np.random.default_rng(seed)
    n_classes = slide_scores.shape[1]
    if len(np.unique(labels)) < n_classes:
        return float("nan"), float("nan")
    values: list[float] = []
    while len(values) < n_resamples:
        pick = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[pick])) == n_classes:
            values.append(metric(labels[pick], slide_scores[pick]))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def evaluate_method(labels: np.ndarray, slide_scores: np.ndarray, predicted: np.ndarray,
                    n_resamples: int = N_BOOTSTRAP) -> dict[str, Any]:
    """Metrics of one scoring method: AUROC with CI, balanced accuracy, confusion matrix (rows = truth)."""
    n_classes = slide_scores.shape[1]
    present = len(np.unique(labels)) == n_classes
    value = auroc(labels, slide_scores) if present else float("nan")
    low, high = bootstrap_ci(labels, slide_scores, auroc, n_resamples=n_resamples)
    return {
        "n_slides": int(len(labels)),
        "auroc": value,
        "auroc_ci_low": low,
        "auroc_ci_high": high,
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=list(range(n_classes))).tolist(),
    }


def plot_roc(path: Path, labels: np.ndarray, slide_scores: np.ndarray, class_names: Sequence[str],
             title: str) -> Path:
    """Writes the ROC curve(s) of one method: class 1 for two classes, one-vs-rest per class otherwise."""
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    for c in classes:
        if (labels == c).all() or not (labels == c).any():
            continue
        fpr, tpr, _ = roc_curve(labels == c, slide_scores[:, c])
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUROC {roc_auc_score(labels == c, slide_scores[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def _methods(table: pd.DataFrame, summary: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(scores, predicted labels) per method: argmax for each aggregation, the threshold for calibrated."""
    class_names = summary["class_names"]
    methods = {}
    for key in (parse_aggregation(a).key for a in summary["aggregations"]):
        slide_scores = scores(table, key, class_names)
        methods[key] = (slide_scores, slide_scores.argmax(axis=1))
    calibration = summary.get("calibration")
    if calibration:
        slide_scores = scores(table, CALIBRATED, class_names)
        positive = class_names.index(calibration["positive_class"])
        methods[CALIBRATED] = (slide_scores, decide(slide_scores, positive, calibration["threshold"]))
    return methods


def evaluate_run(predictions: Path, labels_csv: Path, out_dir: Path, n_resamples: int = N_BOOTSTRAP) -> pd.DataFrame:
    """Evaluates every method of a run; writes metrics.csv, metrics.json and roc_<method>.png to ``out_dir``."""
    table, summary = labelled_slides(predictions, labels_csv)
    labels = table["label"].to_numpy()
    results = {}
    for method, (slide_scores, predicted) in _methods(table, summary).items():
        results[method] = evaluate_method(labels, slide_scores, predicted, n_resamples)
        plot_roc(out_dir / f"roc_{method}.png", labels, slide_scores, summary["class_names"], method)
    write_json(out_dir / "metrics.json", {"class_names": summary["class_names"], "methods": results})
    frame = pd.DataFrame.from_dict(results, orient="index").drop(columns="confusion_matrix")
    frame.index.name = "method"
    with atomic_path(out_dir / "metrics.csv") as tmp:
        frame.to_csv(tmp)
    return frame


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology evaluate", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--predictions", type=Path, required=True, help="--out folder of 'pathology infer'")
    parser.add_argument("--labels", type=Path, required=True, help="CSV with slide_id,label (name or index)")
    parser.add_argument("--out", type=Path, help="output folder (default PREDICTIONS/evaluation)")
    parser.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP, help="bootstrap resamples for the CIs")
    return parser


def main(argv: list[str]) -> int:
    """Runs ``pathology evaluate``; prints the metrics table; returns 0, or 1 with a one-line error."""
    args = _parser().parse_args(argv)
    out_dir = args.out or args.predictions / "evaluation"
    try:
        frame = evaluate_run(args.predictions, args.labels, out_dir, args.bootstrap)
    except ValueError as error:
        print(f"pathology evaluate: {error}", file=sys.stderr)
        return 1
    print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"written to {out_dir}")
    return 0
