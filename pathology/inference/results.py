"""The files an inference run writes, and how evaluation and calibration read them back.

Layout of a ``pathology infer --out DIR`` folder::

    DIR/slides.csv                  one row per slide: status, slide and read µm/px, scores, predicted label
    DIR/summary.json                model, classes, tile µm/px, match mode, aggregations, calibration, counts, speed
    DIR/predictions/<slide_id>.h5   coords (N×2 level-0 px), probs (N×C), read µm/px in probs' attrs
    DIR/features/<slide_id>.h5      features (N×D), coords: CLAM's / TRIDENT's layout (--embeddings)
    DIR/records/<slide_id>.json     the slide's row, files and run key, written last (resuming)
    DIR/heatmaps/  DIR/geojson/  DIR/gallery/   pictures and QuPath objects, when asked for

A score column is named ``<aggregation key>_<class name>``, e.g. ``topk0.1_tumour``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathology.atomic import atomic_path

__all__ = [
    "InferenceError",
    "SLIDES_CSV",
    "SUMMARY_JSON",
    "PREDICTIONS_DIR",
    "CALIBRATED",
    "STATUS_OK",
    "STATUS_NO_TISSUE",
    "STATUS_ERROR",
    "STATUS_PENDING",
    "write_json",
    "score_column",
    "scores",
    "read_run",
    "write_run",
    "read_labels",
    "labelled_slides",
]

SLIDES_CSV = "slides.csv"
SUMMARY_JSON = "summary.json"
PREDICTIONS_DIR = "predictions"
CALIBRATED = "calibrated"  # the pseudo-aggregation holding temperature-scaled scores
STATUS_OK = "ok"
STATUS_NO_TISSUE = "no-tissue"
STATUS_ERROR = "error"
STATUS_PENDING = "pending"  # not finished when the table was written (an interrupted run, another shard)


class InferenceError(ValueError):
    """Bad input to inference, calibration or evaluation; the message names the file."""


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Writes ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)


def score_column(key: str, class_name: str) -> str:
    """Column of ``slides.csv`` holding aggregation ``key``'s score for ``class_name``."""
    return f"{key}_{class_name}"


def scores(table: pd.DataFrame, key: str, class_names: Sequence[str]) -> np.ndarray:
    """The (S, C) scores of one aggregation, classes in logit order."""
    columns = [score_column(key, c) for c in class_names]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InferenceError(f"{SLIDES_CSV}: no column(s) {missing}; was aggregation {key!r} computed?")
    return table[columns].to_numpy(dtype=np.float64)


def write_run(run_dir: str | Path, table: pd.DataFrame, summary: dict[str, Any],
              shard: tuple[int, int] | None = None) -> None:
    """Writes ``slides.csv`` and ``summary.json`` (``slides_shard<I>of<N>.csv`` and
    ``summary_shard<I>of<N>.json`` for shard I of N), each atomically."""
    suffix = "" if shard is None else f"_shard{shard[0]}of{shard[1]}"
    run_dir = Path(run_dir)
    with atomic_path(run_dir / SLIDES_CSV.replace(".csv", f"{suffix}.csv")) as tmp:
        table.to_csv(tmp, index=False)
    write_json(run_dir / SUMMARY_JSON.replace(".json", f"{suffix}.json"), summary)


def read_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Reads ``slides.csv`` and ``summary.json`` of an inference run.

    Raises:
        InferenceError: either file missing or unreadable.
    """
    run_dir = Path(run_dir)
    csv_path, summary_path = run_dir / SLIDES_CSV, run_dir / SUMMARY_JSON
    for path in (csv_path, summary_path):
        if not path.is_file():
            raise InferenceError(f"{path}: not found; is {run_dir} the --out folder of 'pathology infer'?")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as error:
        raise InferenceError(f"{summary_path}: not valid JSON ({error})") from error
    table = pd.read_csv(csv_path, dtype={"slide_id": str})
    return table, summary


def read_labels(path: str | Path, class_names: Sequence[str]) -> pd.Series:
    """Reads a labels CSV (columns ``slide_id`` and ``label``: class name or class index).

    Returns:
        Class index per slide id.

    Raises:
        InferenceError: missing file or columns, or a label that is not one of ``class_names``.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: labels file not found")
    table = pd.read_csv(path, dtype={"slide_id": str, "label": str})
    missing = {"slide_id", "label"} - set(table.columns)
    if missing:
        raise InferenceError(f"{path}: missing column(s) {sorted(missing)}; expected slide_id,label")
    index = {name: i for i, name in enumerate(class_names)} | {str(i): i for i in range(len(class_names))}
    unknown = sorted(set(table["label"]) - set(index))
    if unknown:
        raise InferenceError(f"{path}: labels {unknown} are not classes of the model {list(class_names)}")
    return pd.Series([index[v] for v in table["label"]], index=table["slide_id"], name="label")


def labelled_slides(run_dir: str | Path, labels_csv: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The run's successfully predicted slides that have a label, with a ``label`` column (class index).

    Raises:
        InferenceError: unreadable inputs, or no slide both predicted and labelled.
    """
    table, summary = read_run(run_dir)
    labels = read_labels(labels_csv, summary["class_names"])
    table = table[table["status"] == STATUS_OK]
    table = table[table["slide_id"].isin(labels.index)].copy()
    if table.empty:
        raise InferenceError(f"{labels_csv}: no slide id matches a successfully predicted slide in {run_dir}")
    table["label"] = labels.loc[table["slide_id"]].to_numpy()
    return table.reset_index(drop=True), summary
