"""``pathology predict-tiles``: per-class probabilities for a folder or CSV of tile images.

Preprocessing (input size, mean/std) comes from the checkpoint's spec, exactly as in training, and so
do test-time augmentation (``--tta`` / ``--no-tta`` override) and, for two classes, the decision
threshold on class 1's probability chosen on the validation patients (``--threshold`` overrides it;
``--threshold argmax`` ignores it). Labels are known when the folder has one sub-folder per class of
the checkpoint, or the CSV has a ``label`` column; then ``label`` is written and the metrics of
``pred`` are printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from pathology.atomic import atomic_path
from pathology.checkpoint import CheckpointError, ModelSpec, load_inference_model
from pathology.data import ImageCsvSource, ImageFolderSource, TileDataError
from pathology.inference.predict import (
    RUNNER_ERRORS,
    RunOptions,
    add_backend_option,
    add_precision_option,
    add_tta_option,
    make_predictor,
    predict_tiles,
    start_devices,
    tile_dataset,
)
from pathology.training.metrics import classification_metrics, predicted_classes

__all__ = ["main", "tile_probabilities"]

ARGMAX = "argmax"


def _threshold_arg(text: str) -> float | str:
    """``--threshold``: a probability in [0, 1], or ``argmax``."""
    if text == ARGMAX:
        return ARGMAX
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a probability in [0, 1] nor {ARGMAX!r}")
    return value


def _decision_rule(asked: float | str | None, spec: ModelSpec, checkpoint: Path) -> tuple[float | None, str]:
    """(threshold or None for argmax, a line saying which rule and where it came from).

    Raises:
        CheckpointError: a threshold for a model of other than two classes.
    """
    threshold = spec.decision_threshold if asked is None else None if asked == ARGMAX else asked
    if threshold is None:
        return None, "decision rule: argmax" + (" (--threshold argmax)" if asked == ARGMAX else "")
    if spec.num_classes != 2:
        raise CheckpointError(f"{checkpoint}: --threshold needs a two-class model, not {list(spec.class_names)}")
    source = "the checkpoint's, chosen on validation patients" if asked is None else "--threshold"
    return threshold, f"decision rule: {spec.class_names[1]} iff its probability >= {threshold:.4f} ({source})"


def _table(tiles: Path, class_names: list[str], image_root: Path | None, path_column: str) -> pd.DataFrame:
    if tiles.is_dir():
        return ImageFolderSource(tiles, patient_pattern=None).table(class_names)
    return ImageCsvSource(tiles, image_root, path_column=path_column).table(class_names)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology predict-tiles", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained tile classifier (.ckpt)")
    parser.add_argument("--tiles", type=Path, required=True, help="folder of tiles (class sub-folders) or CSV")
    parser.add_argument("--out", type=Path, required=True,
                        help="output CSV: path, label (when known), pred, prob_<class>")
    parser.add_argument("--image-root", type=Path, default=None, help="folder CSV paths are relative to")
    parser.add_argument("--path-column", default="path",
                        help="CSV column holding image paths (e.g. 'file' for the shared data's manifests)")
    parser.add_argument("--batch-size", type=int, default=RunOptions.batch_size)
    parser.add_argument("--num-workers", type=int, default=RunOptions.num_workers,
                        help="processes reading tiles while the model computes")
    parser.add_argument("--accelerator", default=RunOptions.accelerator, help="auto, cpu, gpu, ...")
    add_backend_option(parser)
    add_precision_option(parser)
    add_tta_option(parser)
    parser.add_argument("--threshold", type=_threshold_arg, default=None, metavar="P|argmax",
                        help="two classes: predict the second class iff its probability >= P; 'argmax' ignores "
                             "the checkpoint's threshold (default: the checkpoint's, else argmax)")
    return parser


def tile_probabilities(model: nn.Module, spec: ModelSpec, table: pd.DataFrame, options: RunOptions, tta: bool,
                       cache_dir: Path | None = None) -> np.ndarray:
    """(N, C) class probabilities of a tile table's images (column ``path``), preprocessed as in training.

    Args:
        model, spec: from :func:`~pathology.checkpoint.load_inference_model`.
        table: tile table, as the tile sources make it.
        options: devices, batch size, backend, precision.
        tta: average over the 8 dihedral views of each tile.
        cache_dir: where the backend keeps an exported graph (the checkpoint's folder).

    Raises:
        TileDataError: an unreadable tile; a runner error (:data:`RUNNER_ERRORS`).
    """
    predictor = make_predictor(model, start_devices(options), (spec.mean, spec.std), backend=options.backend,
                               cache_dir=cache_dir, tta=tta, precision=options.precision)
    return predict_tiles(predictor, tile_dataset(table, spec), options).probs


def main(argv: list[str]) -> int:
    """Entry point of ``pathology predict-tiles``; exits 1 with a one-line reason on bad input."""
    args = _parser().parse_args(argv)
    try:
        model, spec = load_inference_model(args.checkpoint)
        threshold, rule = _decision_rule(args.threshold, spec, args.checkpoint)
        table = _table(args.tiles, list(spec.class_names), args.image_root, args.path_column)
        options = RunOptions(args.batch_size, args.num_workers, args.accelerator, precision=args.precision,
                             backend=args.backend)
        tta = spec.tta if args.tta is None else args.tta
        probs = tile_probabilities(model, spec, table, options, tta, cache_dir=args.checkpoint.parent)
    except (CheckpointError, TileDataError, *RUNNER_ERRORS) as err:
        print(f"pathology predict-tiles: {err}", file=sys.stderr)
        return 1
    names, labels = np.array(spec.class_names), table["label"].to_numpy()
    known = labels >= 0
    out = pd.DataFrame({"path": table["path"]})
    if known.any():
        out["label"] = np.where(known, names[np.maximum(labels, 0)], "")
    out["pred"] = names[predicted_classes(probs, threshold)]
    out[[f"prob_{name}" for name in names]] = probs
    with atomic_path(args.out) as tmp:
        out.to_csv(tmp, index=False)
    print(f"{len(out)} tiles -> {args.out}")
    print(f"{rule}; TTA {'on (8 dihedral views)' if tta else 'off'}")
    if known.any():
        metrics = classification_metrics(labels[known], probs[known], threshold)
        print(f"labelled tiles: {int(known.sum())}")
        for key in ("balanced_accuracy", "f1", "auroc", "accuracy"):
            print(f"{key}: {metrics[key]:.4f}")
    return 0
