"""``pathology infer``: slides in, one slide at a time: tile, predict, write its files, next.

slides → ``wsi_tiling.tile_slide`` at the µm/px the model's training tiles had (``--match
physical``, the default) or at its requested resolution relative to each slide's objective
(``--match nominal``; :mod:`.match`), at its tile size (a readable store delivering that µm/px
within 1 % is reused) in a producer thread one slide ahead (:mod:`.stream`) → the model on
each batch (:mod:`.predict`) → the slide's files, written atomically: tile probabilities, features
(``--embeddings``), pictures on request, and last its record (:mod:`.records`). A rerun skips the
slides whose record matches the checkpoint and settings. Slides are shared among DDP ranks and
``--shard`` jobs; ``slides.csv`` and ``summary.json`` are assembled from the records at the end
(by rank 0) and when the run is interrupted. A slide that fails (missing, unreadable, no
resolution, would need upsampling) gets status ``error`` and its reason; the others finish. The
files written are described in :mod:`pathology.inference.results`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pathology.checkpoint import CheckpointError, ModelSpec, load_inference_model
from pathology.inference.aggregate import DEFAULT_AGGREGATIONS, Aggregation, aggregate_all, parse_aggregation
from pathology.inference.calibrate import Calibration, calibration_path, decide, temper
from pathology.inference.match import MATCH_MODES, match_for_checkpoint
from pathology.inference.outputs import FEATURES_DIR, Extras, write_extras, write_features, write_slide_predictions
from pathology.inference.predict import (
    RUNNER_ERRORS,
    Predictor,
    RunOptions,
    add_backend_option,
    add_precision_option,
    add_tta_option,
    make_predictor,
    start_devices,
)
from pathology.inference.records import SlideRecord, finished, read_record, run_key, weights_hash, write_record
from pathology.inference.results import (
    CALIBRATED,
    PREDICTIONS_DIR,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_PENDING,
    InferenceError,
    score_column,
    write_run,
)
from pathology.inference.stream import SlideStream, TiledSlide, slide_dataset, tile_for_model
from wsi_tiling import TileReader, WsiTilingError
from wsi_tiling.inputs import InputProblem, SlideJob, collect_slides, parse_shard, shard

__all__ = ["Extras", "RunOptions", "infer_slides", "main"]

log = logging.getLogger(__name__)

FIRST_COLUMNS = ["slide_id", "slide_path", "status", "n_tiles", "slide_mpp", "read_mpp"]
LAST_COLUMNS = ["error", "seconds"]
QUIET_LOGGERS = ("lightning.fabric", "lightning.pytorch")  # rank banners and tips


@dataclass(frozen=True)
class _Setup:
    """What every slide of a run shares."""

    out_dir: Path
    spec: ModelSpec
    match: str
    aggregations: tuple[Aggregation, ...]
    calibration: Calibration | None
    extras: Extras
    predictor: Predictor


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


def _settings(aggregations: Sequence[Aggregation], calibration: Calibration | None, tiling: dict[str, Any],
              extras: Extras, precision: str, tta: bool) -> dict[str, Any]:
    """The run settings that change a slide's numbers or files (hashed into the run key)."""
    return {"aggregations": [str(a) for a in aggregations], "extras": asdict(extras),
            "calibration": None if calibration is None else asdict(calibration), "precision": precision,
            "tta": tta, **{k: v for k, v in tiling.items() if k != "tiles_dir"}}


def _write_slide(slide: TiledSlide, probs: np.ndarray, embeddings: np.ndarray | None, setup: _Setup,
                 record: SlideRecord) -> None:
    """Writes the slide's files and fills its scores and file list (a picture failure is noted)."""
    out, job = setup.out_dir, slide.job
    with TileReader(slide.h5_path, job.slide_path) as reader:
        files = [write_slide_predictions(out / PREDICTIONS_DIR / f"{job.slide_id}.h5", reader, probs, setup.spec,
                                         setup.match)]
        if embeddings is not None:
            files.append(write_features(out / FEATURES_DIR / f"{job.slide_id}.h5", reader, embeddings, setup.spec))
        try:
            files += write_extras(out, job, reader, probs, setup.spec, setup.extras)
        except WsiTilingError as error:
            record.error = f"pictures not written: {str(error).splitlines()[0]}"
    record.scores = _scores_row(probs, setup.spec, setup.aggregations, setup.calibration)
    record.files = [str(path.relative_to(out)) for path in files]


def _predict_slide(slide: TiledSlide, images: Iterator[torch.Tensor], setup: _Setup, key: str) -> SlideRecord:
    """Predicts one slide's batches and writes its files; returns its record (not yet written)."""
    start = time.perf_counter()
    probs, embeddings = [], []
    for batch in images:
        batch_probs, batch_embeddings = setup.predictor.predict(batch)
        probs.append(batch_probs)
        if batch_embeddings is not None:
            embeddings.append(batch_embeddings)
    job = slide.job
    record = SlideRecord(job.slide_id, str(job.slide_path), slide.status, slide.n_tiles, error=slide.error, key=key)
    if slide.info is not None:
        record.slide_mpp, record.read_mpp = slide.info.slide_mpp, slide.info.target_mpp
    if slide.status == STATUS_OK:
        _write_slide(slide, np.concatenate(probs), np.concatenate(embeddings) if embeddings else None, setup, record)
    record.seconds = slide.seconds + time.perf_counter() - start
    return record


def _predict_share(jobs: Sequence[SlideJob], keys: dict[str, str], setup: _Setup, tiling: dict[str, Any],
                   run: RunOptions, progress: bool) -> int:
    """Predicts this process's slides in order, skipping finished ones; returns the tiles predicted.

    Each slide's record is written after its files, before the next slide is predicted.
    """
    todo = [job for job in jobs if finished(setup.out_dir, job.slide_id, keys[job.slide_id]) is None]
    counts = Counter({"done": 0, "skipped": len(jobs) - len(todo), "failed": 0})
    start, n_tiles = time.perf_counter(), 0
    tile = partial(tile_for_model, spec=setup.spec, **tiling)
    dataset = partial(slide_dataset, spec=setup.spec)
    stream = SlideStream(todo, tile, dataset, run.batch_size, run.num_workers)
    bar = tqdm(total=len(jobs), initial=counts["skipped"], desc="slides", unit="slide", disable=not progress)
    with bar, logging_redirect_tqdm(), stream:
        for slide, images in stream:
            record = _predict_slide(slide, images, setup, keys[slide.job.slide_id])
            write_record(setup.out_dir, record)
            counts["failed" if record.status == STATUS_ERROR else "done"] += 1
            n_tiles += record.n_tiles if record.status == STATUS_OK else 0
            rate = n_tiles / (time.perf_counter() - start)
            bar.set_postfix(counts, tiles_per_s=f"{rate:.1f}", refresh=False)
            bar.update()
            log.info("%s: %s, %d tiles, %.1f s%s", record.slide_id, record.status, record.n_tiles, record.seconds,
                     f" ({record.error})" if record.error else "")
    return n_tiles


def _table(jobs: Sequence[SlideJob], keys: dict[str, str], problems: Sequence[InputProblem],
           out_dir: Path) -> pd.DataFrame:
    """``slides.csv`` from the records: a slide without a current record is ``pending``."""
    records = []
    for job in jobs:
        record = read_record(out_dir, job.slide_id)
        if record is None or record.key != keys[job.slide_id]:
            record = SlideRecord(job.slide_id, str(job.slide_path), STATUS_PENDING)
        records.append(record)
    records += [SlideRecord(p.path.stem, str(p.path), STATUS_ERROR, error=p.message) for p in problems]
    table = pd.DataFrame([r.row() for r in sorted(records, key=lambda r: r.slide_id)])
    middle = [c for c in table.columns if c not in FIRST_COLUMNS + LAST_COLUMNS]
    return table[FIRST_COLUMNS + middle + LAST_COLUMNS]


def _summary(checkpoint: Path, checkpoint_hash: str, setup: _Setup, table: pd.DataFrame, n_tiles: int,
             seconds: float) -> dict[str, Any]:
    spec, calibration, aggregations = setup.spec, setup.calibration, setup.aggregations
    errors = table[table["error"].fillna("") != ""]
    return {
        "checkpoint": str(checkpoint), "checkpoint_hash": checkpoint_hash, "model_name": spec.model_name,
        "mhsa_blocks": spec.mhsa_blocks, "class_names": list(spec.class_names), "resolution": str(spec.resolution),
        "tile_mpp": spec.tile_mpp, "match": setup.match, "tile_size": spec.tile_size, "img_size": spec.img_size,
        "backend": setup.predictor.runner.backend, "precision": setup.predictor.runner.precision,
        "tta": setup.predictor.tta,
        "aggregations": [str(a) for a in aggregations],
        "label_aggregation": str(aggregations[0]) if calibration is None else CALIBRATED,
        "calibration": None if calibration is None else asdict(calibration),
        "counts": {str(k): int(v) for k, v in table["status"].value_counts().sort_index().items()},
        "n_tiles": int(table.loc[table["status"] == STATUS_OK, "n_tiles"].sum()),
        "seconds": round(seconds, 3), "tiles_predicted": n_tiles,
        "tiles_per_second": n_tiles / seconds if n_tiles else None,
        "errors": [{"slide_id": r.slide_id, "error": r.error} for r in errors.itertuples()],
    }


def infer_slides(checkpoint: str | Path, slides: Sequence[str | Path], out_dir: str | Path, *,
                 aggregations: Sequence[str] = DEFAULT_AGGREGATIONS, tiles_dir: str | Path | None = None,
                 min_tissue: float = 0.5, slide_mpp: float | None = None, match: str = "physical",
                 allow_upsample: bool = False, calibration: str | Path | None = "auto", run: RunOptions = RunOptions(),
                 extras: Extras = Extras(), shard_spec: tuple[int, int] | None = None,
                 tta: bool | None = None) -> pd.DataFrame | None:
    """Predicts slides with a trained tile classifier, one at a time, and writes the run folder.

    Rerunning into the same ``out_dir`` skips the slides already finished with the same
    checkpoint and settings (see :mod:`pathology.inference.records`).

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
        match: ``physical``: tile every slide at the µm/px the model's training tiles had
            (``ModelSpec.tile_mpp``; checkpoints without it are matched nominally, with a
            warning); ``nominal``: at the requested resolution (e.g. ``20x``) relative to each
            slide's objective (see :mod:`pathology.inference.match`).
        allow_upsample: tile slides coarser than that µm/px by interpolating (else they are errors).
        calibration: a calibration JSON, ``auto`` (the checkpoint's ``.calibration.json`` if
            present) or None (argmax of the first aggregation).
        run: devices, batch size, reader processes, precision, progress bar.
        extras: features, heatmaps, GeoJSON, galleries.
        shard_spec: (I, N): predict only shard I of N of the slides (every N-th in slide-id
            order); the tables are then ``slides_shard<I>of<N>.csv`` and ``summary_shard<I>of<N>.json``.
        tta: average tile probabilities (and embeddings) over the 8 dihedral views of each tile;
            None: as the checkpoint's spec says (``ModelSpec.tta``).

    Returns:
        One row per slide, as written to ``slides.csv``; None on DDP ranks other than 0.

    Raises:
        CheckpointError: the checkpoint is missing, not a checkpoint, unsafe, or for another architecture.
        InferenceError: bad calibration file.
        ValueError: an unknown aggregation or match mode.
    """
    start = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    methods = [parse_aggregation(a) for a in aggregations]
    model, spec = load_inference_model(checkpoint)
    loaded, methods = _load_calibration(calibration, checkpoint, spec, methods)
    used = match_for_checkpoint(spec, match, checkpoint)
    checkpoint_hash = weights_hash(model.state_dict(), spec.to_dict())
    jobs, problems = collect_slides(slides)
    jobs = [replace(job, mpp=job.mpp or slide_mpp) for job in jobs]
    if shard_spec is not None:
        jobs = shard(jobs, *shard_spec)
    tiling = {"tiles_dir": Path(tiles_dir) if tiles_dir else out_dir / "tiles", "min_tissue": min_tissue,
              "match": used, "allow_upsample": allow_upsample}
    tta = spec.tta if tta is None else tta
    fabric = start_devices(run)
    predictor = make_predictor(model, fabric, (spec.mean, spec.std), extras.embeddings, run.backend, checkpoint.parent,
                               tta, run.precision)
    settings = _settings(methods, loaded, tiling, extras, predictor.runner.precision, tta)  # "auto" resolved
    keys = {job.slide_id: run_key(checkpoint_hash, settings, job.slide_path, job.mpp) for job in jobs}
    setup = _Setup(out_dir, spec, used, tuple(methods), loaded, extras, predictor)
    share = jobs[fabric.global_rank::fabric.world_size]
    try:
        n_tiles = _predict_share(share, keys, setup, tiling, run, run.progress_bar and fabric.global_rank == 0)
    except KeyboardInterrupt:  # a clean stop: the tables show what is finished
        if fabric.world_size == 1:
            table = _table(jobs, keys, problems, out_dir)
            write_run(out_dir, table, _summary(checkpoint, checkpoint_hash, setup, table, 0,
                                               time.perf_counter() - start), shard_spec)
        raise
    n_tiles = int(fabric.all_reduce(torch.tensor(n_tiles, device=fabric.device), reduce_op="sum"))  # waits for all
    if fabric.global_rank != 0:
        return None
    table = _table(jobs, keys, problems, out_dir)
    write_run(out_dir, table, _summary(checkpoint, checkpoint_hash, setup, table, n_tiles,
                                       time.perf_counter() - start), shard_spec)
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
    parser.add_argument("--match", choices=MATCH_MODES, default="physical",
                        help="physical: tile every slide at the µm/px the model's training tiles had, whatever "
                             "its scanner; nominal: at the checkpoint's requested resolution (e.g. 20x) relative "
                             "to each slide's objective (default physical)")
    parser.add_argument("--allow-upsample", action="store_true",
                        help="tile slides coarser than the model's µm/px by interpolating (else an error row)")
    parser.add_argument("--calibration", default="auto",
                        help="calibration JSON, 'auto' (next to the checkpoint) or 'none'")
    run = parser.add_argument_group("devices")
    run.add_argument("--batch-size", type=int, default=RunOptions.batch_size)
    run.add_argument("--num-workers", type=int, default=RunOptions.num_workers,
                     help="processes reading tiles while the model computes (0: a thread)")
    run.add_argument("--accelerator", default=RunOptions.accelerator)
    run.add_argument("--devices", default=RunOptions.devices, help="number of devices, or 'auto'")
    run.add_argument("--num-nodes", type=int, default=RunOptions.num_nodes)
    run.add_argument("--strategy", default=RunOptions.strategy, help="e.g. ddp")
    add_precision_option(run)
    add_backend_option(run)
    add_tta_option(run)
    run.add_argument("--shard", type=parse_shard, metavar="I/N",
                     help="predict only shard I of N (0 <= I < N) of the slides, e.g. for job arrays")
    run.add_argument("-v", "--verbose", action="store_true", help="a log line per slide")
    extra = parser.add_argument_group("outputs")
    extra.add_argument("--embeddings", action="store_true",
                       help="features/<slide_id>.h5 per slide: tile embeddings and coords as CLAM and TRIDENT "
                            "read them")
    extra.add_argument("--heatmaps", action="store_true", help="heatmap PNG per slide and class")
    extra.add_argument("--geojson", action="store_true", help="QuPath GeoJSON of tiles per slide")
    extra.add_argument("--gallery", type=int, default=0, metavar="K", help="gallery PNG of the top-K tiles per class")
    return parser



def main(argv: list[str]) -> int:
    """Runs ``pathology infer``; returns 0 when every slide was predicted or had no tissue, else 1."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    run = RunOptions(args.batch_size, args.num_workers, args.accelerator, devices, args.strategy,
                     args.precision, args.num_nodes, backend=args.backend)
    extras = Extras(args.embeddings, args.heatmaps, args.geojson, args.gallery)
    calibration = None if args.calibration == "none" else args.calibration
    aggregations = [a for text in args.aggregation for a in text.split(",") if a] if args.aggregation \
        else list(DEFAULT_AGGREGATIONS)
    try:
        table = infer_slides(args.checkpoint, args.slides, args.out, aggregations=aggregations,
                             tiles_dir=args.tiles_dir, min_tissue=args.min_tissue, slide_mpp=args.slide_mpp,
                             match=args.match, allow_upsample=args.allow_upsample, calibration=calibration,
                             run=run, extras=extras, shard_spec=args.shard, tta=args.tta)
    except (CheckpointError, ValueError, *RUNNER_ERRORS) as error:
        print(f"pathology infer: {error}", file=sys.stderr)
        return 1
    if table is None:
        return 0
    for row in table[table["status"] == STATUS_ERROR].itertuples():
        print(f"{row.slide_id}: {row.status}: {row.error}", file=sys.stderr)
    counts = table["status"].value_counts().to_dict()
    print(f"{len(table)} slides ({', '.join(f'{n} {s}' for s, n in counts.items())}) -> {args.out}")
    return 1 if (table["status"] == STATUS_ERROR).any() else 0
