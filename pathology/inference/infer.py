"""``pathology infer``: tile slides, predict every tile, aggregate into slide predictions.

slides → ``wsi_tiling.tile_slide`` at the checkpoint's resolution and tile size (a store with
the same parameters is reused) → one DataLoader over every tile, workers reading and
normalising while the model computes → Lightning predict on one or many devices → per slide an
h5 of tile probabilities, aggregations, a calibrated label, and pictures on request. A slide
that fails (missing, unreadable, no resolution) gets a status and its reason in ``slides.csv``;
the others finish. The files written are described in :mod:`pathology.inference.results`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from pathology.checkpoint import CheckpointError, ModelSpec, load_inference_model
from pathology.data import TileDataset, eval_transform
from pathology.inference.aggregate import DEFAULT_AGGREGATIONS, Aggregation, aggregate_all, parse_aggregation
from pathology.inference.calibrate import Calibration, calibration_path, decide, temper
from pathology.inference.outputs import Extras, write_extras, write_slide_predictions
from pathology.inference.predict import RunOptions, TilePredictions, predict_tiles
from pathology.inference.results import (
    CALIBRATED,
    PREDICTIONS_DIR,
    STATUS_OK,
    InferenceError,
    score_column,
    write_run,
)
from pathology.models.optimize import fuse_for_inference
from wsi_tiling import TileReader, WsiTilingError, read_attrs, store_path, tile_slide
from wsi_tiling.inputs import SlideJob, collect_slides

__all__ = ["Extras", "RunOptions", "infer_slides", "main"]

log = logging.getLogger(__name__)

STATUS_ERROR = "error"
STATUS_NO_TISSUE = "no-tissue"
OVERLAP_PX = 0  # the model was trained on non-overlapping tiles


@dataclass
class _Slide:
    """One slide's progress through the run."""

    job: SlideJob
    status: str = STATUS_OK
    error: str = ""
    h5_path: Path | None = None
    n_tiles: int = 0
    seconds: float = 0.0
    row: dict[str, Any] = field(default_factory=dict)


def _reusable_store(job: SlideJob, h5_path: Path, spec: ModelSpec) -> int | None:
    """Tile count of an existing store cut from this slide at the model's resolution, else None.

    Tissue threshold and stored pixels may differ (e.g. a store written by ``wsi-tile
    --save-tiles``): they change which tiles exist, not what a tile looks like.
    """
    if not h5_path.is_file():
        return None
    try:
        attrs = read_attrs(h5_path)
        params = json.loads(attrs["params"])
        same = (params["resolution"] == str(spec.resolution) and params["tile_size"] == spec.tile_size
                and params["slide_mpp"] == job.mpp and not params["allow_upsample"]
                and Path(attrs["slide_path"]).name == job.slide_path.resolve().name)
        return len(TileReader(h5_path)) if same else None
    except (OSError, KeyError, ValueError):
        return None


def _tile(slide: _Slide, spec: ModelSpec, tiles_dir: Path, min_tissue: float) -> None:
    """Finds or makes the slide's tile store; records a status instead of raising."""
    start = time.perf_counter()
    job = slide.job
    h5_path = store_path(tiles_dir, spec.resolution, spec.tile_size, OVERLAP_PX, job.slide_id)
    try:
        n_tiles = _reusable_store(job, h5_path, spec)
        if n_tiles is None:
            result = tile_slide(job.slide_path, tiles_dir, spec.resolution, spec.tile_size, overlap=OVERLAP_PX,
                                min_tissue=min_tissue, slide_mpp=job.mpp, slide_id=job.slide_id, resume=True)
            h5_path, n_tiles = result.h5_path, result.n_tiles
    except WsiTilingError as error:
        slide.status, slide.error = STATUS_ERROR, str(error)
        log.error("%s", error)
    else:
        slide.h5_path, slide.n_tiles = h5_path, n_tiles
        slide.status = STATUS_OK if n_tiles else STATUS_NO_TISSUE
    slide.seconds = time.perf_counter() - start


def _tile_table(slides: Sequence[_Slide]) -> pd.DataFrame:
    """The tile table (:mod:`pathology.data.sources`) of every slide with tiles, in slide order."""
    parts = [pd.DataFrame({"path": str(s.h5_path), "tile_index": np.arange(s.n_tiles),
                           "slide_path": str(s.job.slide_path), "label": -1})
             for s in slides if s.status == STATUS_OK]
    return pd.concat(parts, ignore_index=True)


def _scores_row(probs: np.ndarray, spec: ModelSpec, aggregations: Sequence[Aggregation],
                calibration: Calibration | None) -> dict[str, Any]:
    """Every aggregation's per-class scores, the calibrated scores and the predicted label."""
    names = spec.class_names
    by_key = aggregate_all(probs, aggregations)
    row = {score_column(k, c): float(v) for k, values in by_key.items() for c, v in zip(names, values)}
    if calibration is None:
        label = int(by_key[aggregations[0].key].argmax())
    else:
        key = parse_aggregation(calibration.aggregation).key
        calibrated = temper(by_key[key][None], calibration.temperature)
        row |= {score_column(CALIBRATED, c): float(v) for c, v in zip(names, calibrated[0])}
        label = int(decide(calibrated, names.index(calibration.positive_class), calibration.threshold)[0])
    row["predicted_label"] = names[label]
    return row


def _load_calibration(calibration: str | Path | None, checkpoint: Path, spec: ModelSpec,
                      aggregations: list[Aggregation]) -> tuple[Calibration | None, list[Aggregation]]:
    """The calibration to apply (``auto``: the checkpoint's, if any); its aggregation is computed too."""
    if calibration == "auto":
        calibration = calibration_path(checkpoint)
        if not calibration.is_file():
            return None, aggregations
    if calibration is None:
        return None, aggregations
    loaded = Calibration.load(calibration)
    if loaded.positive_class not in spec.class_names:
        raise InferenceError(f"{calibration}: positive class {loaded.positive_class!r} is not one of the "
                             f"model's classes {list(spec.class_names)}")
    needed = parse_aggregation(loaded.aggregation)
    return loaded, aggregations + ([needed] if needed not in aggregations else [])


def _summary(checkpoint: Path, spec: ModelSpec, aggregations: Sequence[Aggregation],
             calibration: Calibration | None, slides: Sequence[_Slide], timing: dict[str, float]) -> dict[str, Any]:
    statuses = [s.status for s in slides]
    n_tiles = sum(s.n_tiles for s in slides if s.status == STATUS_OK)
    return {
        "checkpoint": str(checkpoint), "model_name": spec.model_name, "mhsa_blocks": spec.mhsa_blocks,
        "class_names": list(spec.class_names), "resolution": str(spec.resolution), "tile_size": spec.tile_size,
        "img_size": spec.img_size, "aggregations": [str(a) for a in aggregations],
        "label_aggregation": str(aggregations[0]) if calibration is None else CALIBRATED,
        "calibration": None if calibration is None else asdict(calibration),
        "counts": {status: statuses.count(status) for status in sorted(set(statuses))},
        "n_tiles": n_tiles, "seconds": timing,
        "tiles_per_second": n_tiles / timing["predict"] if timing.get("predict") else None,
        "errors": [{"slide_id": s.job.slide_id, "error": s.error} for s in slides if s.error],
    }


def _rows(slides: Sequence[_Slide]) -> pd.DataFrame:
    return pd.DataFrame([{"slide_id": s.job.slide_id, "slide_path": str(s.job.slide_path), "status": s.status,
                          "n_tiles": s.n_tiles, **s.row, "error": s.error, "seconds": round(s.seconds, 3)}
                         for s in slides])


def _finish(slides: Sequence[_Slide], predictions: TilePredictions, spec: ModelSpec, out_dir: Path,
            aggregations: Sequence[Aggregation], calibration: Calibration | None, extras: Extras,
            progress_bar: bool) -> None:
    """Writes each slide's tile predictions and pictures and fills its row of ``slides.csv``."""
    offset = 0
    done = [s for s in slides if s.status == STATUS_OK]
    for slide in tqdm(done, desc="slides", unit="slide", disable=not progress_bar):
        rows = slice(offset, offset + slide.n_tiles)
        offset += slide.n_tiles
        probs = predictions.probs[rows]
        embeddings = None if predictions.embeddings is None else predictions.embeddings[rows]
        start = time.perf_counter()
        reader = TileReader(slide.h5_path, slide.job.slide_path)
        write_slide_predictions(out_dir / PREDICTIONS_DIR / f"{slide.job.slide_id}.h5", reader, probs,
                                embeddings, spec)
        slide.row = _scores_row(probs, spec, aggregations, calibration)
        try:
            write_extras(out_dir, slide.job, reader, probs, spec, extras)
        except WsiTilingError as error:
            slide.error = f"pictures not written: {error}"
        slide.seconds += time.perf_counter() - start


def infer_slides(checkpoint: str | Path, slides: Sequence[str | Path], out_dir: str | Path, *,
                 aggregations: Sequence[str] = DEFAULT_AGGREGATIONS, tiles_dir: str | Path | None = None,
                 min_tissue: float = 0.5, slide_mpp: float | None = None,
                 calibration: str | Path | None = "auto",
                 run: RunOptions = RunOptions(), extras: Extras = Extras()) -> pd.DataFrame | None:
    """Predicts slides with a trained tile classifier and writes the run folder.

    Args:
        checkpoint: a checkpoint written by training (or :func:`pathology.checkpoint.save_checkpoint`).
        slides: slide files, folders of slides, or CSVs with ``slide_path`` (and ``slide_id``, ``mpp``).
        out_dir: run folder (see :mod:`pathology.inference.results`).
        aggregations: methods (``mean``, ``max``, ``topk:K``, ``quantile:Q``, ``vote``); the first
            gives the predicted label unless a calibration is applied.
        tiles_dir: where tile stores are looked up and written (default ``out_dir/tiles``).
        min_tissue: tissue fraction a tile needs when slides are tiled here.
        slide_mpp: level-0 µm/px overriding the metadata of every slide without a CSV ``mpp``
            (for slides whose metadata lacks it).
        calibration: a calibration JSON, ``auto`` (the checkpoint's ``.calibration.json`` if
            present) or None (argmax of the first aggregation).
        run: devices, batch size, workers, precision.
        extras: embeddings, heatmaps, GeoJSON, galleries.

    Returns:
        One row per slide, as written to ``slides.csv``; None on DDP ranks other than 0.

    Raises:
        CheckpointError: the checkpoint is missing, unsafe, or for another architecture.
        InferenceError: bad calibration file.
        ValueError: an unknown aggregation.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    methods = [parse_aggregation(a) for a in aggregations]
    model, spec = load_inference_model(checkpoint)
    loaded, methods = _load_calibration(calibration, checkpoint, spec, methods)
    jobs, problems = collect_slides(slides)
    todo = [_Slide(replace(job, mpp=job.mpp or slide_mpp)) for job in jobs]
    failed = [_Slide(SlideJob(p.path, p.path.stem), STATUS_ERROR, p.message) for p in problems]
    start = time.perf_counter()
    for slide in tqdm(todo, desc="tiling", unit="slide", disable=not run.progress_bar):
        _tile(slide, spec, Path(tiles_dir) if tiles_dir else out_dir / "tiles", min_tissue)
    timing = {"tiling": time.perf_counter() - start}
    if any(s.status == STATUS_OK for s in todo):
        dataset = TileDataset(_tile_table(todo), eval_transform(spec.img_size, spec.mean, spec.std))
        start = time.perf_counter()
        predictions = predict_tiles(fuse_for_inference(model), dataset, out_dir / ".shards", run,
                                    extras.embeddings)
        timing["predict"] = time.perf_counter() - start
        if predictions is None:  # a DDP rank other than 0: rank 0 writes the results
            return None
        _finish(todo, predictions, spec, out_dir, methods, loaded, extras, run.progress_bar)
    every = sorted(todo + failed, key=lambda s: s.job.slide_id)
    table = _rows(every)
    write_run(out_dir, table, _summary(checkpoint, spec, methods, loaded, every, timing))
    return table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology infer", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("slides", nargs="+", help="slide files, folders of slides, or CSVs with slide_path")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--aggregation", action="append", metavar="METHOD[,METHOD...]",
                        help="mean, max, topk:K (count or fraction), quantile:Q, vote; comma-separated or "
                             f"repeated; the first labels the slide (default {','.join(DEFAULT_AGGREGATIONS)})")
    parser.add_argument("--tiles-dir", type=Path, help="tile stores to reuse or write (default OUT/tiles)")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction a tile needs")
    parser.add_argument("--slide-mpp", type=float,
                        help="level-0 µm/px overriding the slides' metadata (a CSV mpp column wins)")
    parser.add_argument("--calibration", default="auto",
                        help="calibration JSON, 'auto' (next to the checkpoint) or 'none'")
    run = parser.add_argument_group("devices")
    run.add_argument("--batch-size", type=int, default=RunOptions.batch_size)
    run.add_argument("--num-workers", type=int, default=RunOptions.num_workers)
    run.add_argument("--accelerator", default=RunOptions.accelerator)
    run.add_argument("--devices", default=RunOptions.devices, help="number of devices, or 'auto'")
    run.add_argument("--num-nodes", type=int, default=RunOptions.num_nodes)
    run.add_argument("--strategy", default=RunOptions.strategy, help="e.g. ddp")
    run.add_argument("--precision", default=RunOptions.precision, help="e.g. bf16-mixed on GPUs")
    extra = parser.add_argument_group("outputs")
    extra.add_argument("--embeddings", action="store_true", help="store tile embeddings in the h5 files")
    extra.add_argument("--heatmaps", action="store_true", help="heatmap PNG per slide and class")
    extra.add_argument("--geojson", action="store_true", help="QuPath GeoJSON of tiles per slide")
    extra.add_argument("--gallery", type=int, default=0, metavar="K", help="gallery PNG of the top-K tiles per class")
    return parser


def main(argv: list[str]) -> int:
    """Runs ``pathology infer``; returns 0 when every slide was predicted or had no tissue, else 1."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    run = RunOptions(args.batch_size, args.num_workers, args.accelerator, devices, args.strategy,
                     args.precision, args.num_nodes)
    extras = Extras(args.embeddings, args.heatmaps, args.geojson, args.gallery)
    calibration = None if args.calibration == "none" else args.calibration
    aggregations = [a for text in args.aggregation for a in text.split(",") if a] if args.aggregation \
        else list(DEFAULT_AGGREGATIONS)
    try:
        table = infer_slides(args.checkpoint, args.slides, args.out, aggregations=aggregations,
                             tiles_dir=args.tiles_dir, min_tissue=args.min_tissue, slide_mpp=args.slide_mpp,
                             calibration=calibration,
                             run=run, extras=extras)
    except (CheckpointError, ValueError) as error:
        print(f"pathology infer: {error}", file=sys.stderr)
        return 1
    if table is None:
        return 0
    for row in table[table["status"] != STATUS_OK].itertuples():
        print(f"{row.slide_id}: {row.status}{': ' + row.error if row.error else ''}", file=sys.stderr)
    counts = table["status"].value_counts().to_dict()
    print(f"{len(table)} slides ({', '.join(f'{n} {s}' for s, n in counts.items())}) -> {args.out}")
    return 1 if (table["status"] == STATUS_ERROR).any() else 0
