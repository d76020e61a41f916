"""``pathology calibrate``: a decision threshold and a temperature chosen on validation slides.

Slide scores from a tile classifier are rarely calibrated probabilities (a max over thousands of
tiles is close to 1 on every slide). Temperature scaling fits one number T so that
``softmax(log(p) / T)`` minimises the negative log-likelihood of the validation labels; it keeps
the ranking (so AUROC is unchanged) and makes scores comparable between runs. The threshold on
the positive class's calibrated score is then chosen by Youden's J (max sensitivity +
specificity − 1) or as the highest one reaching a target sensitivity. Both are stored in
``<checkpoint>.calibration.json`` next to the checkpoint, where ``pathology infer`` finds them.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_curve

from pathology.inference.aggregate import parse_aggregation
from pathology.inference.results import InferenceError, labelled_slides, scores, write_json

__all__ = [
    "Calibration",
    "calibration_path",
    "decide",
    "fit_temperature",
    "main",
    "sensitivity_threshold",
    "temper",
    "youden_threshold",
]

log = logging.getLogger(__name__)

EPS = 1e-6  # floor on scores before the log, so a vote share of 0 stays finite
LOG_T_BOUNDS = (-4.0, 4.0)  # T between e^-4 and e^4


def calibration_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint's calibration lives: ``<checkpoint file name>.calibration.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".calibration.json")


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and threshold for one aggregation's slide scores.

    Attributes:
        aggregation: the aggregation they apply to, command-line form (``mean``, ``topk:0.1``).
        positive_class: class whose calibrated score is thresholded.
        threshold: slides with calibrated positive score ≥ threshold are called positive.
        temperature: T in ``softmax(log(p) / T)``; > 1 softens, < 1 sharpens.
        method: how the threshold was chosen (``youden`` or ``sensitivity:0.95``).
    """

    aggregation: str
    positive_class: str
    threshold: float
    temperature: float
    method: str

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Raises InferenceError naming the file when it is unreadable or incomplete."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise InferenceError(f"{path}: not a calibration file ({error})") from error


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scales (S, C) slide scores: rows renormalised, ``softmax(log(p) / T)``."""
    probs = np.clip(np.asarray(probs, np.float64), EPS, None)
    logits = np.log(probs / probs.sum(axis=1, keepdims=True)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the mean negative log-likelihood of ``labels`` (S,) under tempered (S, C) scores."""
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-np.log(temper(probs, np.exp(log_t))[rows, labels]).mean())

    return float(np.exp(minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded").x))


def _roc(is_positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if is_positive.all() or not is_positive.any():
        raise InferenceError("calibration needs validation slides of both the positive class and others")
    return roc_curve(is_positive, score, drop_intermediate=False)


def youden_threshold(is_positive: np.ndarray, score: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity − 1 (the higher one on ties)."""
    fpr, tpr, thresholds = _roc(is_positive, score)
    return float(thresholds[np.argmax(tpr - fpr)])


def sensitivity_threshold(is_positive: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest score threshold whose sensitivity on these slides is at least ``target``."""
    _, tpr, thresholds = _roc(is_positive, score)
    return float(thresholds[np.argmax(tpr >= target - 1e-12)])


def decide(calibrated: np.ndarray, positive_index: int, threshold: float) -> np.ndarray:
    """Class index per slide: the positive class at or above ``threshold``, else the best other class."""
    others = calibrated.copy()
    others[:, positive_index] = -np.inf
    return np.where(calibrated[:, positive_index] >= threshold, positive_index, others.argmax(axis=1))


def calibrate(table_scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], aggregation: str,
              positive_class: str, target_sensitivity: float | None = None) -> Calibration:
    """Fits temperature then threshold on (S, C) validation scores of one aggregation."""
    positive_index = list(class_names).index(positive_class)
    temperature = fit_temperature(table_scores, labels)
    score = temper(table_scores, temperature)[:, positive_index]
    is_positive = labels == positive_index
    if target_sensitivity is None:
        threshold, method = youden_threshold(is_positive, score), "youden"
    else:
        threshold = sensitivity_threshold(is_positive, score, target_sensitivity)
        method = f"sensitivity:{target_sensitivity:g}"
    return Calibration(aggregation, positive_class, min(threshold, 1.0), temperature, method)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology calibrate", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--predictions", type=Path, required=True, help="--out folder of 'pathology infer'")
    parser.add_argument("--labels", type=Path, required=True, help="CSV with slide_id,label")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the calibration is stored next to it")
    parser.add_argument("--aggregation", default="mean", help="which slide score to calibrate (default mean)")
    parser.add_argument("--positive-class", help="class to threshold (default: the second of two classes)")
    parser.add_argument("--target-sensitivity", type=float,
                        help="pick the highest threshold reaching this sensitivity instead of Youden's J")
    return parser


def main(argv: list[str]) -> int:
    """Runs ``pathology calibrate``; returns 0, or 1 with a one-line error."""
    args = _parser().parse_args(argv)
    try:
        table, summary = labelled_slides(args.predictions, args.labels)
        class_names = summary["class_names"]
        positive = args.positive_class or (class_names[1] if len(class_names) == 2 else None)
        if positive not in class_names:
            raise InferenceError(f"{args.checkpoint}: --positive-class must be one of {class_names}")
        aggregation = parse_aggregation(args.aggregation)
        calibration = calibrate(scores(table, aggregation.key, class_names), table["label"].to_numpy(),
                                class_names, str(aggregation), positive, args.target_sensitivity)
    except ValueError as error:
        print(f"pathology calibrate: {error}", file=sys.stderr)
        return 1
    path = calibration.save(calibration_path(args.checkpoint))
    print(f"{path}: T={calibration.temperature:.3f}, threshold {calibration.threshold:.3f} on "
          f"{calibration.positive_class} ({calibration.method}, {len(table)} slides)")
    return 0
