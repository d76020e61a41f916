"""``pathology cv``: cross-validation over the split file's folds, then the final model on train + val.

``pathology cv --out runs/idc_cv --config configs/train_idc.yaml`` takes the arguments of
``pathology train`` and:

1. fits one model per fold of ``data.split_csv`` (fold ``k`` validates, the other non-test folds
   train) in ``OUT/fold_<k>/``, and predicts each fold's validation tiles with its best checkpoint;
2. writes ``OUT/cv_summary.csv`` / ``.json`` (per fold and mean ± sd) and the out-of-fold
   validation probabilities ``OUT/oof_predictions.csv`` (for choosing a threshold on validation
   patients only);
3. fits the final model on every non-test patient (``data.val_fold: null``, no validation) for
   :func:`final_epochs` epochs, in ``OUT/final/``, and predicts the test patients with it;
4. writes the fold models as one checkpoint, ``OUT/ensemble.ckpt``, and predicts the test patients
   with it.

A fold or final fit whose result file exists is not run again, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jsonargparse import ArgumentError

from pathology.atomic import atomic_path
from pathology.checkpoint import CheckpointError, load_inference_model, rewrite_spec, save_ensemble_checkpoint
from pathology.data import TEST_FOLD, SplitError, TileDataError
from pathology.data.sources import read_table
from pathology.inference.predict import RUNNER_ERRORS, RunOptions, add_backend_option, add_precision_option
from pathology.io import read_torch_file
from pathology.training.fit import check_config, fit
from pathology.training.metrics import classification_metrics, youden_tile_threshold
from pathology.training.module import NonFiniteLossError
from pathology.training.predict_tiles import tile_probabilities

__all__ = ["CvResult", "FoldResult", "cross_validate", "final_epochs", "main"]

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"  # written last in a fold's or the final's folder: its presence means "done"
SUMMARY_METRICS = ("balanced_accuracy", "f1", "auroc")
TILE_COLUMNS = ["path", "tile_index", "slide_path", "patient_id", "label"]


@dataclass(frozen=True)
class FoldResult:
    """One fold's fit.

    Attributes:
        fold: the validation fold (0 … k-1).
        best_epoch: 0-based epoch of the best checkpoint (by the config's ModelCheckpoint monitor).
        checkpoint: the best checkpoint.
        val_metrics: :data:`SUMMARY_METRICS` of the best checkpoint on the fold's validation tiles.
    """

    fold: int
    best_epoch: int
    checkpoint: Path
    val_metrics: dict[str, float]


@dataclass(frozen=True)
class CvResult:
    """What ``pathology cv`` produced (all paths under its output folder).

    Attributes:
        folds: one result per fold, in fold order.
        final_epochs: the epochs of the final fit (:func:`final_epochs` of the folds' best epochs).
        final_checkpoint: the final model (None when not asked for).
        test_metrics: ``final/…`` and ``ensemble/…`` metrics on the test patients.
        ensemble: the fold models as one checkpoint (None when not asked for).
        decision_threshold: with ``model.decision_rule: youden``, the threshold chosen on the
            out-of-fold probabilities and stored in the final and ensemble checkpoints; else None.
    """

    folds: list[FoldResult]
    final_epochs: int
    final_checkpoint: Path | None
    test_metrics: dict[str, float]
    ensemble: Path | None
    decision_threshold: float | None = None


def final_epochs(best_epochs: Sequence[int]) -> int:
    """Epochs of the final fit: the median over folds of the number of epochs to the best one
    (``best_epoch + 1``), rounded up."""
    return int(math.ceil(np.median(np.asarray(best_epochs) + 1)))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _n_folds(split_csv: Path) -> int:
    """k of the split file: its folds must be 0 … k-1 (and -1 for test), k at least 2.

    Raises:
        SplitError: fewer than two folds, or a gap in their numbers.
    """
    folds = set(read_table(split_csv, ["patient_id", "fold"])["fold"].astype(int)) - {TEST_FOLD}
    if len(folds) < 2 or folds != set(range(len(folds))):
        raise SplitError(f"{split_csv}: cross-validation needs folds 0 … k-1 with k >= 2, found {sorted(folds)}")
    return len(folds)


def _predictions(checkpoint: Path, tiles: pd.DataFrame, options: RunOptions) -> pd.DataFrame:
    """``path``, ``patient_id``, ``label`` (class name) and ``prob_<class>`` of ``tiles`` by ``checkpoint``
    (with test-time augmentation when its spec says so)."""
    model, spec = load_inference_model(checkpoint)
    probs = tile_probabilities(model, spec, tiles, options, spec.tta, cache_dir=checkpoint.parent)
    names = np.array(spec.class_names)
    frame = pd.DataFrame({"path": tiles["path"].to_numpy(), "patient_id": tiles["patient_id"].to_numpy(),
                          "label": names[tiles["label"].to_numpy()]})
    frame[[f"prob_{name}" for name in names]] = probs
    return frame


def _labels_and_probs(predictions: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N,) class indices and (N, C) probabilities of a :func:`_predictions` frame."""
    prob_columns = [c for c in predictions.columns if c.startswith("prob_")]
    names = [c.removeprefix("prob_") for c in prob_columns]
    return predictions["label"].map(names.index).to_numpy(), predictions[prob_columns].to_numpy()


def _metrics(predictions: pd.DataFrame, threshold: float | None = None) -> dict[str, float]:
    """:data:`SUMMARY_METRICS` of a :func:`_predictions` frame (at ``threshold``; None: argmax)."""
    metrics = classification_metrics(*_labels_and_probs(predictions), threshold=threshold)
    return {key: metrics[key] for key in SUMMARY_METRICS}


def _run_fold(args: list[str], values: Mapping[str, Any], out: Path, fold: int, options: RunOptions) -> FoldResult:
    """Fits (or, when its result file exists, reads back) the model validated on ``fold``; also writes the
    test tiles' table ``OUT/test_tiles.csv`` the first time."""
    folder = out / f"fold_{fold}"
    if (folder / RESULT_FILE).is_file():
        data = json.loads((folder / RESULT_FILE).read_text())
        return FoldResult(fold, data["best_epoch"], Path(data["checkpoint"]), data["val"])
    result = fit(args, {**values, "data.val_fold": fold, "trainer.default_root_dir": str(folder)})
    if not (out / "test_tiles.csv").is_file():
        _write_csv(out / "test_tiles.csv", result.tables["test"][TILE_COLUMNS])
    predictions = _predictions(result.best_checkpoint, result.tables["val"], options)
    _write_csv(folder / "val_predictions.csv", predictions)
    best_epoch = int(read_torch_file(result.best_checkpoint, "checkpoint")["epoch"])
    fold_result = FoldResult(fold, best_epoch, result.best_checkpoint, _metrics(predictions))
    _write_json(folder / RESULT_FILE, {"best_epoch": best_epoch, "checkpoint": str(fold_result.checkpoint),
                                       "val": fold_result.val_metrics})
    return fold_result


def _test_tiles(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "test_tiles.csv", keep_default_na=False,
                       dtype={"path": str, "slide_path": str, "patient_id": str})


def _oof_threshold(oof: pd.DataFrame) -> float:
    """Youden's threshold on class 1's out-of-fold probability: every non-test patient, each predicted by
    the fold model that never trained on it (the final fit has no validation patients of its own)."""
    return youden_tile_threshold(*_labels_and_probs(oof))


def _run_final(args: list[str], values: Mapping[str, Any], out: Path, epochs: int, threshold: float | None,
               options: RunOptions) -> tuple[Path, dict[str, float]]:
    """Fits (or reads back) the model of every non-test patient for ``epochs``, stores ``threshold`` in it;
    returns it and its test metrics (at that threshold)."""
    folder = out / "final"
    if not (folder / RESULT_FILE).is_file():
        result = fit(args, {**values, "data.val_fold": None, "trainer.limit_val_batches": 0,
                            "model.decision_rule": "argmax",  # no validation patients: the threshold is the folds'
                            "trainer.max_epochs": epochs, "trainer.default_root_dir": str(folder)})
        rewrite_spec(result.best_checkpoint, decision_threshold=threshold)
        predictions = _predictions(result.best_checkpoint, _test_tiles(out), options)
        _write_csv(folder / "test_predictions.csv", predictions)
        _write_json(folder / RESULT_FILE, {"epochs": epochs, "checkpoint": str(result.best_checkpoint),
                                           "train_tiles": len(result.tables["train"]), "decision_threshold": threshold,
                                           "test": _metrics(predictions, threshold)})
    data = json.loads((folder / RESULT_FILE).read_text())
    return Path(data["checkpoint"]), data["test"]


def _run_ensemble(out: Path, folds: list[FoldResult], threshold: float | None,
                  options: RunOptions) -> dict[str, float]:
    """Writes (unless there) ``OUT/ensemble.ckpt`` of the fold models, holding ``threshold`` (not a fold's
    own); returns its test metrics at that threshold."""
    path, predictions_csv = out / "ensemble.ckpt", out / "ensemble_test_predictions.csv"
    if not predictions_csv.is_file():
        save_ensemble_checkpoint(path, [fold.checkpoint for fold in folds], threshold)
        _write_csv(predictions_csv, _predictions(path, _test_tiles(out), options))
    return _metrics(pd.read_csv(predictions_csv), threshold)


def _write_summary(out: Path, result: CvResult) -> None:
    """``cv_summary.csv`` (one row per fold) and ``cv_summary.json`` (folds, mean ± sd, final, ensemble)."""
    rows = pd.DataFrame([{"fold": f.fold, "best_epoch": f.best_epoch,
                          **{f"val_{k}": f.val_metrics[k] for k in SUMMARY_METRICS}, "checkpoint": str(f.checkpoint)}
                         for f in result.folds])
    _write_csv(out / "cv_summary.csv", rows)
    metrics = rows[[f"val_{k}" for k in SUMMARY_METRICS]]
    _write_json(out / "cv_summary.json", {
        "folds": rows.to_dict(orient="records"),
        "mean": metrics.mean().to_dict(), "sd": metrics.std(ddof=1).to_dict(),  # sample sd over folds
        "decision_threshold": result.decision_threshold, "final_epochs": result.final_epochs, "epoch_rule": "ceil(median over folds of best_epoch + 1)",
        "final_checkpoint": None if result.final_checkpoint is None else str(result.final_checkpoint),
        "ensemble": None if result.ensemble is None else str(result.ensemble),
        "test": result.test_metrics,
    })


def cross_validate(args: list[str], out_dir: str | Path, values: Mapping[str, Any] | None = None, *,
                   final: bool = True, ensemble: bool = True, options: RunOptions = RunOptions()) -> CvResult:
    """Runs every fold, the final fit and the ensemble, skipping what a previous run finished.

    Args:
        args: ``pathology train`` arguments (``--config FILE``, overrides); ``data.val_fold``,
            ``trainer.default_root_dir`` (and, for the final fit, ``trainer.max_epochs``) are set here.
        out_dir: the output folder (layout in the module docstring).
        values: typed settings over ``args``, as :func:`~pathology.training.fit.fit` takes them.
        final: fit the final model on train + val patients.
        ensemble: write the fold models as ``ensemble.ckpt``.
        options: how the validation and test tiles are predicted (backend, batch size, devices).

    Raises:
        jsonargparse.ArgumentError: bad configs or arguments; TileDataError: bad tiles, labels or
        split file (fewer than two folds); NonFiniteLossError; CheckpointError; a runner error
        (:data:`~pathology.inference.predict.RUNNER_ERRORS`).
    """
    out, values = Path(out_dir).resolve(), dict(values or {})
    config = check_config(args, values)
    split_csv = Path(config.data.split_csv)
    folds = [] if split_csv.is_file() else [_run_fold(args, values, out, 0, options)]  # fold 0 makes the split file
    folds += [_run_fold(args, values, out, k, options) for k in range(len(folds), _n_folds(split_csv))]
    oof = [pd.read_csv(out / f"fold_{f.fold}" / "val_predictions.csv", dtype={"patient_id": str}).assign(fold=f.fold)
           for f in folds]
    oof = pd.concat(oof, ignore_index=True)
    _write_csv(out / "oof_predictions.csv", oof)
    threshold = _oof_threshold(oof) if config.model.decision_rule == "youden" else None
    epochs = final_epochs([f.best_epoch for f in folds])
    result = CvResult(folds, epochs, None, {}, None, threshold)
    if final:
        checkpoint, metrics = _run_final(args, values, out, epochs, threshold, options)
        result = replace(result, final_checkpoint=checkpoint,
                         test_metrics={f"final/{k}": v for k, v in metrics.items()})
    if ensemble:
        metrics = _run_ensemble(out, folds, threshold, options)
        result = replace(result, ensemble=out / "ensemble.ckpt",
                         test_metrics=result.test_metrics | {f"ensemble/{k}": v for k, v in metrics.items()})
    _write_summary(out, result)
    return result


def main(argv: list[str]) -> int:
    """Entry point of ``pathology cv``; prints the fold summary and the test metrics."""
    parser = argparse.ArgumentParser(prog="pathology cv", allow_abbrev=False,
                                     description=__doc__.splitlines()[0],
                                     epilog="Every other argument is passed to the fits as to 'pathology train'.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (fold_<k>/, final/, summaries)")
    parser.add_argument("--no-final", dest="final", action="store_false", help="skip the final fit on train + val")
    parser.add_argument("--no-ensemble", dest="ensemble", action="store_false", help="skip ensemble.ckpt")
    add_backend_option(parser)
    add_precision_option(parser)
    args, train_args = parser.parse_known_args(argv)
    try:
        result = cross_validate(train_args, args.out, final=args.final, ensemble=args.ensemble,
                                options=RunOptions(backend=args.backend, precision=args.precision))
    except SystemExit as stop:  # --help and --print_config of the training arguments exit from their parser
        return int(stop.code or 0)
    except (ArgumentError, TileDataError, NonFiniteLossError, CheckpointError, *RUNNER_ERRORS) as err:
        print(f"pathology cv: {err}", file=sys.stderr)
        return 2 if isinstance(err, ArgumentError) else 1
    print(pd.read_csv(args.out / "cv_summary.csv").drop(columns="checkpoint").to_string(index=False))
    print(f"final fit: {result.final_epochs} epoch(s)")
    for key, value in sorted(result.test_metrics.items()):
        print(f"test {key}: {value:.4f}")
    return 0
