"""``pathology study --config FILE``: tile, train, evaluate and time every cell of a grid, with a cache.

Layout of ``--out DIR``::

    DIR/tiles/<setting>/patches/<slide_id>.h5   tile stores, one per (resolution, tile size), shared by cells
    DIR/cells/<cell>/result.json                a finished cell: its grid point, fingerprint and metrics
    DIR/cells/<cell>/train/  infer/             the cell's checkpoints and inference run (slides.csv, ...)
    DIR/results.csv                             one row per cell
    DIR/report.md, DIR/*.png                    table with means and 95 % CIs over seeds, plots

A cell whose ``result.json`` exists with the same fingerprint (grid point, training files and
arguments, slides) is read back instead of rerun, so an interrupted study resumes where it stopped
and a cell added to the config runs alone. A failing cell is recorded and the others still run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from jsonargparse import ArgumentError
from tqdm import tqdm

from pathology.checkpoint import load_inference_model
from pathology.data import TileDataError
from pathology.inference.evaluate import auroc
from pathology.inference.infer import infer_slides
from pathology.inference.predict import RUNNER_ERRORS, RunOptions
from pathology.atomic import atomic_path
from pathology.inference.results import PREDICTIONS_DIR, scores, write_json
from pathology.io import CheckpointError
from pathology.models.cost import measure
from pathology.models.efficientformer import DEFAULT_ACT_LAYER
from pathology.study.grid import Cell, Study, StudyConfigError, load_study
from pathology.study.report import write_report
from pathology.training.fit import check_config, fit
from pathology.training.metrics import classification_metrics
from pathology.training.module import NonFiniteLossError
from wsi_tiling import WsiTilingError, read_store_info, setting_name, tile_slide

__all__ = ["StudyError", "read_slides", "write_test_slides", "run_cell", "run_study", "add_threads_option",
           "prepare_console", "main"]

log = logging.getLogger(__name__)

RESULT_JSON = "result.json"
RESULTS_CSV = "results.csv"
SPLITS = ("train", "val", "test")
VAL_FOLD, TRAIN_FOLD = 0, 1
STATUS_OK, STATUS_ERROR = "ok", "error"
SPEED_REPEATS = 3  # timed batches per cell (median kept); the report then takes the median over seeds
CELL_ERRORS = (WsiTilingError, TileDataError, CheckpointError, NonFiniteLossError, ArgumentError, ValueError, OSError,
               *RUNNER_ERRORS)  # a backend that cannot run the model fails its cell, not the study


class StudyError(ValueError):
    """A slides table the study cannot use; the message names the file."""


def read_slides(path: Path, tasks: list[str]) -> pd.DataFrame:
    """Reads the study's slides CSV: ``slide_id``, ``slide_path``, ``split`` and one column per task.

    ``patient_id`` defaults to ``slide_id``; ``mpp`` (level-0 µm/px overriding the metadata) may be empty.

    Raises:
        StudyError: a missing column or an unknown split name.
    """
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("slide_id", "slide_path", "split", *tasks) if c not in df.columns]
    if missing:
        raise StudyError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise StudyError(f"{path}: split must be one of {list(SPLITS)}, got {bad}")
    if "patient_id" not in df.columns:
        df["patient_id"] = df["slide_id"]
    if "mpp" not in df.columns:
        df["mpp"] = ""
    return df


def write_test_slides(test: pd.DataFrame, run_dir: Path) -> Path:
    """Writes ``run_dir/test_slides.csv`` (``slide_id``, ``slide_path``, ``mpp``), the slide list inference reads."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "test_slides.csv"
    with atomic_path(path) as tmp:
        test[["slide_id", "slide_path", "mpp"]].to_csv(tmp, index=False)
    return path


def _tile(study: Study, cell: Cell, slides: pd.DataFrame, tiles_root: Path) -> Path:
    """Tiles every slide at the cell's setting (reusing complete stores); returns the ``patches`` folder.

    Pixels are stored in the h5 files: every cell of the setting reads them again, for each seed
    and MHSA placement, and an h5 read is much cheaper than a slide read.
    """
    for row in slides.itertuples():
        tile_slide(row.slide_path, tiles_root, cell.resolution, cell.tile_size, min_tissue=study.min_tissue,
                   slide_mpp=float(row.mpp) if row.mpp else None, slide_id=row.slide_id, save_tiles=True,
                   resume=True)
    return tiles_root / setting_name(cell.resolution, cell.tile_size, 0) / "patches"


def _delivered_mpp(h5_dir: Path, slides: pd.DataFrame) -> float:
    """The µm/px the cell's tiles have: the median of what its slides' stores delivered (one value
    unless the slides come from scanners of different µm/px, tiled in objective power)."""
    return float(np.median([read_store_info(h5_dir / f"{slide_id}.h5").target_mpp for slide_id in slides["slide_id"]]))


def _write_tables(cell: Cell, slides: pd.DataFrame, cell_dir: Path) -> tuple[Path, Path]:
    """Training labels (``H5Source`` slides CSV) and the fixed patient split, both without the test slides.

    Test slides are left out of training's tables so that they are predicted once, by inference,
    which gives both the tile-level and the slide-level metrics.
    """
    seen = slides[slides["split"] != "test"]
    labels = pd.DataFrame({"slide_id": seen["slide_id"], "patient_id": seen["patient_id"],
                           "label": seen[cell.task], "slide_path": seen["slide_path"]})
    fold = {"train": TRAIN_FOLD, "val": VAL_FOLD}
    splits = seen.groupby("patient_id")["split"].first().map(fold).rename("fold").reset_index()
    paths = cell_dir / "labels.csv", cell_dir / "splits.csv"
    for table, path in zip((labels, splits), paths):
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
    return paths


def _train_inputs(study: Study, cell: Cell, cell_dir: Path, h5_dir: Path, labels: Path,
                  splits: Path) -> tuple[list[str], dict[str, Any]]:
    """``pathology train`` arguments (the study's config files and extra arguments) and this cell's
    settings as typed values, applied over them."""
    args = [arg for path in study.train_configs for arg in ("--config", str(path))] + study.train_args
    values = {
        "seed_everything": cell.seed,
        "trainer.default_root_dir": str(cell_dir / "train"),
        "model.img_size": cell.tile_size,
        "model.mhsa_blocks": cell.mhsa_blocks,
        "model.act_layer": cell.act_layer,
        "data.source": {"class_path": "pathology.data.H5Source",
                        "init_args": {"h5_dir": str(h5_dir), "slides_csv": str(labels)}},
        "data.class_names": list(study.tasks[cell.task]),
        "data.split_csv": str(splits),
        "data.tile_size": cell.tile_size,
        "data.resolution": str(cell.resolution),
    }
    return args, values


def _evaluate(study: Study, cell: Cell, test: pd.DataFrame, run_dir: Path, tiles_root: Path,
              checkpoint: Path) -> dict[str, float]:
    """Infers the test slides once; scores their tiles (each labelled as its slide) and the slides
    (the first aggregation's scores and predicted labels)."""
    table = infer_slides(checkpoint, [write_test_slides(test, run_dir)], run_dir, aggregations=study.aggregations,
                         tiles_dir=tiles_root, min_tissue=study.min_tissue, calibration=None,
                         run=RunOptions(batch_size=study.infer_batch_size, num_workers=0, progress_bar=False))
    classes = study.tasks[cell.task]
    table = table[table["status"] == STATUS_OK].merge(test[["slide_id", cell.task]], on="slide_id")
    labels = table[cell.task].map(classes.index).to_numpy()
    tile_labels, tile_probs = [], []
    for slide_id, label in zip(table["slide_id"], labels):
        with h5py.File(run_dir / PREDICTIONS_DIR / f"{slide_id}.h5", "r") as file:
            tile_probs.append(file["probs"][:])
        tile_labels.append(np.full(len(tile_probs[-1]), label))
    tile = classification_metrics(np.concatenate(tile_labels), np.concatenate(tile_probs))
    result = {f"tile_{k}": v for k, v in tile.items() if not k.startswith("cm_")}
    predicted = table["predicted_label"].map(classes.index).to_numpy()
    result |= {"slide_accuracy": float(np.mean(predicted == labels)), "slide_auroc": float("nan"),
               "n_test_tiles": int(sum(map(len, tile_labels)))}
    if len(np.unique(labels)) == len(classes):
        result["slide_auroc"] = auroc(labels, scores(table, study.aggregations[0], classes))
    return result


def _speed(checkpoint: Path, study: Study) -> dict[str, Any]:
    """Parameters, MACs per tile, and throughput (tiles/s, median of :data:`SPEED_REPEATS` batches) and
    batch-1 latency of the trained model through the default inference backend (``backend``), the path
    inference took; a runtime's graph is the one inference exported next to the checkpoint."""
    model, spec = load_inference_model(checkpoint)  # the input size the model was built for, not the tile's
    info = measure(model, (spec.img_size, spec.img_size), batch_size=study.speed_batch_size, repeats=SPEED_REPEATS,
                   cache_dir=checkpoint.parent)
    return {"params": info.params, "macs": info.macs, "throughput": info.throughput, "latency_ms": info.latency_ms,
            "backend": info.backend}


def run_cell(study: Study, cell: Cell, out_dir: Path) -> dict[str, Any]:
    """Tiles, trains, evaluates (tile level on the test split, slide level by inference) and times one cell.

    Returns:
        The cell's metrics on the test slides: ``tile_*`` (every tile labelled as its slide), ``slide_accuracy``,
        ``slide_auroc``, ``params``, ``macs``, ``throughput``, ``latency_ms``, ``backend`` (what ran the
        timed model), ``*_seconds``; and its
        physical axes: ``tile_mpp``, the µm/px its tile stores delivered (median over slides), and
        ``field_um``, a tile's edge in µm at that µm/px.

    Raises:
        The typed errors of tiling, training and inference (see ``CELL_ERRORS``).
    """
    cell_dir, tiles_root = out_dir / "cells" / cell.name, out_dir / "tiles"
    slides = read_slides(study.slides_csv, list(study.tasks))
    start = time.perf_counter()
    h5_dir = _tile(study, cell, slides, tiles_root)
    tile_mpp = _delivered_mpp(h5_dir, slides)
    tiled = time.perf_counter()
    fitted = fit(*_train_inputs(study, cell, cell_dir, h5_dir, *_write_tables(cell, slides, cell_dir)))
    trained = time.perf_counter()
    metrics = _evaluate(study, cell, slides[slides["split"] == "test"], cell_dir / "infer", tiles_root,
                        fitted.best_checkpoint)
    inferred = time.perf_counter()
    return {**metrics, **_speed(fitted.best_checkpoint, study), "tile_mpp": tile_mpp,
            "field_um": tile_mpp * cell.tile_size,
            "tiling_seconds": tiled - start, "train_seconds": trained - tiled, "infer_seconds": inferred - trained,
            "checkpoint": str(fitted.best_checkpoint)}


def _cached(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The stored row when ``path`` holds a finished result with this fingerprint, else None; a row
    stored before ``act_layer`` was an axis is a gelu cell."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("fingerprint") != fingerprint or stored.get("status") != STATUS_OK:
        return None
    return {"act_layer": DEFAULT_ACT_LAYER, **stored}


def run_study(study: Study, out_dir: str | Path) -> pd.DataFrame:
    """Runs (or reads back) every cell, then writes ``results.csv`` and the report.

    Returns:
        One row per cell: grid columns, ``status`` (``ok``/``error``), ``cached`` (bool), ``error``
        and the metrics of :func:`run_cell`.

    Raises:
        StudyError: the slides CSV lacks a column or names an unknown split (checked before any cell).
        jsonargparse.ArgumentError: a training config with an unknown key or a bad value (checked with the
            first cell's settings, before any cell).
    """
    out_dir = Path(out_dir)
    read_slides(study.slides_csv, list(study.tasks))
    if study.cells:
        first = out_dir / "cells" / study.cells[0].name
        check_config(*_train_inputs(study, study.cells[0], first, first / "h5", first / "labels.csv",
                                    first / "splits.csv"))
    rows = []
    for cell in tqdm(study.cells, desc="study", unit="cell"):
        path, fingerprint = out_dir / "cells" / cell.name / RESULT_JSON, study.fingerprint(cell)
        row = _cached(path, fingerprint)
        if row is not None:
            rows.append({**row, "cached": True})
            continue
        row = {"cell": cell.name, **cell.to_dict(), "n_classes": len(study.tasks[cell.task]),
               "fingerprint": fingerprint}
        try:
            row |= {"status": STATUS_OK, **run_cell(study, cell, out_dir)}
            write_json(path, row)
        except CELL_ERRORS as err:
            log.error("cell %s failed: %s", cell.name, err)
            row |= {"status": STATUS_ERROR, "error": str(err).splitlines()[0] if str(err) else type(err).__name__}
        rows.append({**row, "cached": False})
    results = pd.DataFrame(rows)
    with atomic_path(out_dir / RESULTS_CSV) as tmp:
        results.to_csv(tmp, index=False)
    write_report(out_dir, results)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology study", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, type=Path,
                        help="study YAML; give it again for override files (later ones win)")
    parser.add_argument("--out", type=Path, required=True, help="study folder (cache, results, report)")
    parser.add_argument("--slides", type=Path, help="slides CSV replacing the config's slides_csv")
    add_threads_option(parser)
    return parser


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads. On a CPU shared with other jobs, 1 avoids OpenMP
    threads spin-waiting on each other (a training step was 5-60x slower with 2 on a busy 2-core machine)."""
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def prepare_console(threads: int | None) -> None:
    """Sets torch's intra-op thread count when ``threads`` is given, and leaves the console to the
    study's own progress bar and messages: each cell's Lightning runs would otherwise print
    accelerator lines, seeds, tips and a deprecation warning from inside Lightning, once per cell."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if threads:
        torch.set_num_threads(threads)


def main(argv: list[str]) -> int:
    """Entry point of ``pathology study``; prints where the report is; exit 1 if any cell failed."""
    args = _parser().parse_args(argv)
    prepare_console(args.threads)
    try:
        study = load_study(args.config, args.slides)
        results = run_study(study, args.out)
    except (StudyConfigError, StudyError, ArgumentError) as err:
        print(f"pathology study: {err}", file=sys.stderr)
        return 2
    failed = results[results["status"] != STATUS_OK]
    for row in failed.itertuples():
        print(f"pathology study: cell {row.cell} failed: {row.error}", file=sys.stderr)
    print(f"{len(results) - len(failed)}/{len(results)} cells ok ({int(results['cached'].sum())} from cache)")
    print(f"results: {Path(args.out) / RESULTS_CSV}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 1 if len(failed) else 0
