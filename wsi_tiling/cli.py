"""``wsi-tile``: tile slides, folders and CSV lists at one or more resolutions, in parallel.

One process per slide (``--workers``), remaining cores as reading threads inside a slide; one
manifest row per slide and setting; a bad slide is recorded and the rest finish; exit status 1
when anything failed.
"""
from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import WsiTilingError
from .inputs import InputProblem, SlideJob, collect_slides, parse_shard, shard
from .qc import draw_tiling_qc, write_png
from .resolution import Resolution
from .tiler import setting_name, tile_slide

__all__ = ["main", "TileOptions"]

log = logging.getLogger("wsi_tiling")

MANIFEST_COLUMNS = ("slide_id", "slide_path", "setting", "status", "n_tiles", "seconds", "target_mpp",
                    "slide_mpp", "mpp_source", "read_level", "resize_factor", "reader", "h5_path", "warning", "error")
MAX_ATTEMPTS = 2  # a slide whose worker process died is retried once, alone
MAX_THREADS_PER_SLIDE = 8  # each reading thread holds up to ~150 MB of blocks
# recorded, the run goes on; AttributeError and TypeError too: a reader library changing its API
# under us must cost the slide, not the batch
SLIDE_ERRORS = (WsiTilingError, OSError, ValueError, RuntimeError, MemoryError, AttributeError, TypeError)
Row = dict[str, Any]


@dataclass(frozen=True)
class TileOptions:
    """Everything a worker needs besides the slide (picklable)."""

    out_dir: Path
    resolutions: tuple[Resolution, ...]
    tile_size: int
    overlap: int
    min_tissue: float
    slide_mpp: float | None
    save_tiles: bool
    resume: bool
    allow_upsample: bool
    write_thumbnail: bool
    threads: int = 1
    progress: bool = False  # a bar per slide, only when slides run in this process


def _error_row(job: SlideJob, setting: str, message: str) -> Row:
    return {"slide_id": job.slide_id, "slide_path": str(job.slide_path), "setting": setting,
            "status": "error", "n_tiles": 0, "error": message}


def _error_message(job: SlideJob, error: BaseException) -> str:
    message = str(error) if isinstance(error, WsiTilingError) else f"{job.slide_path}: {error!r}"
    return message.splitlines()[0]


def _tile_setting(job: SlideJob, options: TileOptions, resolution: Resolution) -> Row:
    """Tiles one slide at one resolution; a failure becomes an ``error`` row."""
    setting = setting_name(resolution, options.tile_size, options.overlap)
    try:
        result = tile_slide(
            job.slide_path, options.out_dir, resolution, options.tile_size, overlap=options.overlap,
            min_tissue=options.min_tissue, slide_mpp=job.mpp or options.slide_mpp, slide_id=job.slide_id,
            save_tiles=options.save_tiles, resume=options.resume, allow_upsample=options.allow_upsample,
            threads=options.threads, progress=options.progress)
    except SLIDE_ERRORS as error:
        return _error_row(job, setting, _error_message(job, error))
    plan = result.plan
    return {"slide_id": job.slide_id, "slide_path": str(job.slide_path), "setting": setting,
            "status": result.status, "n_tiles": result.n_tiles, "seconds": round(result.seconds, 3),
            "target_mpp": plan and round(plan.target_mpp, 5), "slide_mpp": plan and plan.slide_mpp,
            "mpp_source": plan and plan.mpp_source, "read_level": plan and plan.read_level,
            "resize_factor": plan and round(plan.resize_factor, 5), "reader": result.reader,
            "h5_path": str(result.h5_path), "warning": "; ".join(result.warnings), "error": ""}


def _write_thumbnail(job: SlideJob, out_dir: Path, rows: list[Row]) -> list[Row]:
    """Draws ``thumbnails/<slide_id>.png`` from the slide's stores (kept when every store was skipped
    and it exists); a failure turns the slide's rows into ``error`` rows."""
    done = [row for row in rows if row["status"] != "error"]
    path = out_dir / "thumbnails" / f"{job.slide_id}.png"
    if not done or (path.is_file() and all(row["status"] == "skipped" for row in done)):
        return rows
    try:
        write_png(path, draw_tiling_qc(job.slide_path, [row["h5_path"] for row in done]))
    except SLIDE_ERRORS as error:
        message = f"{_error_message(job, error)} (QC thumbnail)"
        return [row if row["status"] == "error" else {**row, "status": "error", "error": message} for row in rows]
    return rows


def tile_one_slide(job: SlideJob, options: TileOptions) -> list[Row]:
    """Tiles one slide at every requested resolution, then draws its QC picture; failures become
    ``error`` rows."""
    rows = [_tile_setting(job, options, resolution) for resolution in options.resolutions]
    return _write_thumbnail(job, options.out_dir, rows) if options.write_thumbnail else rows


def _pooled(jobs: list[SlideJob], run: Callable[[SlideJob], list[Row]], processes: int,
            settings: Sequence[str]) -> Iterator[list[Row]]:
    """Runs jobs in a process pool; a job whose worker died is retried alone, then recorded."""
    attempts: Counter[str] = Counter()
    remaining = jobs
    while remaining:
        broken = []
        width = processes if all(attempts[j.slide_id] == 0 for j in remaining) else 1
        context = multiprocessing.get_context("spawn")
        for batch in ([remaining] if width > 1 else [[job] for job in remaining]):
            with ProcessPoolExecutor(min(width, len(batch)), mp_context=context) as pool:
                futures = {pool.submit(run, job): job for job in batch}
                for future in as_completed(futures):
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        broken.append(futures[future])
        remaining = []
        for job in broken:
            attempts[job.slide_id] += 1
            if attempts[job.slide_id] >= MAX_ATTEMPTS:
                yield [_error_row(job, s, f"{job.slide_path}: the worker process died (killed, out of "
                                  "memory or crashed in a decoder)") for s in settings]
            else:
                remaining.append(job)


@dataclass(frozen=True)
class _Bound:
    """``tile_one_slide`` with its options bound, picklable for spawned workers."""

    options: TileOptions

    def __call__(self, job: SlideJob) -> list[Row]:
        return tile_one_slide(job, self.options)


def _run(jobs: list[SlideJob], options: TileOptions, workers: int) -> Iterator[list[Row]]:
    """One process per slide up to ``workers``; spare cores become threads inside each slide."""
    processes = max(1, min(workers, len(jobs)))
    run = _Bound(replace(options, threads=min(MAX_THREADS_PER_SLIDE, max(1, workers // processes)),
                         progress=processes == 1))
    if processes == 1:
        return map(run, jobs)
    settings = [setting_name(r, options.tile_size, options.overlap) for r in options.resolutions]
    return _pooled(jobs, run, processes, settings)


class _Manifest:
    """``manifest.csv``: rows appended to ``<name>.<pid>.partial`` as slides finish (a killed run
    leaves what it did there), sorted and renamed into place at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        self.rows: list[Row] = []
        self._file = self._partial.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=MANIFEST_COLUMNS, restval="")
        self._writer.writeheader()

    def add(self, rows: list[Row]) -> None:
        self.rows.extend(rows)
        self._writer.writerows(rows)
        self._file.flush()

    def finish(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._writer.writeheader()
        self._writer.writerows(sorted(self.rows, key=lambda row: (row["slide_id"], row["setting"])))
        self._file.close()
        os.replace(self._partial, self.path)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``wsi-tile`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="wsi-tile", description="Tile whole-slide images at true magnifications into TRIDENT-layout h5 files.")
    parser.add_argument("inputs", nargs="+", metavar="SLIDE_OR_DIR_OR_CSV",
                        help="slide files, folders of slides, or CSV files with a slide_path column "
                             "(optional slide_id, mpp)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--magnification", "--mag", nargs="+", type=_positive_float, metavar="M",
                        help="objective power(s), relative to the slide's own (20 on a 40x slide = downsample 2)")
    target.add_argument("--mpp", nargs="+", type=_positive_float, metavar="X", help="physical µm/px")
    parser.add_argument("--tile-size", required=True, type=_positive_int, metavar="PX", help="tile edge in pixels")
    parser.add_argument("--overlap", type=_non_negative_int, default=0, metavar="PX",
                        help="pixels shared by neighbouring tiles (default 0)")
    parser.add_argument("--min-tissue", type=_fraction, default=0.5, metavar="FRACTION",
                        help="keep tiles at least this fraction tissue (default 0.5; 0 keeps all)")
    parser.add_argument("--slide-mpp", type=_positive_float, metavar="X",
                        help="level-0 µm/px for slides whose metadata lacks it; overrides every slide's "
                             "metadata (a CSV mpp column wins)")
    parser.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                        help="parallel workers (default: all cores)")
    parser.add_argument("--save-tiles", action="store_true", help="store tile pixels in the h5 (dataset 'tiles')")
    parser.add_argument("--resume", action="store_true",
                        help="skip slides whose store exists with the same parameters")
    parser.add_argument("--shard", type=parse_shard, metavar="I/N",
                        help="tile only shard I of N (0 <= I < N) of the slides, e.g. for job arrays")
    parser.add_argument("--allow-upsample", action="store_true",
                        help="allow resolutions finer than the slide's own (interpolated)")
    parser.add_argument("--no-thumbnails", dest="thumbnails", action="store_false",
                        help="skip the QC pictures in thumbnails/")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each slide")
    return parser


def _options(args: argparse.Namespace) -> TileOptions:
    if args.overlap >= args.tile_size:
        raise ValueError(f"--overlap ({args.overlap}) must be smaller than --tile-size ({args.tile_size})")
    unit, values = ("power", args.magnification) if args.magnification else ("mpp", args.mpp)
    return TileOptions(out_dir=args.out, resolutions=tuple(Resolution(v, unit) for v in dict.fromkeys(values)),
                       tile_size=args.tile_size, overlap=args.overlap, min_tissue=args.min_tissue,
                       slide_mpp=args.slide_mpp, save_tiles=args.save_tiles, resume=args.resume,
                       allow_upsample=args.allow_upsample, write_thumbnail=args.thumbnails)


def _manifest_path(out_dir: Path, shard_spec: tuple[int, int] | None) -> Path:
    return out_dir / ("manifest.csv" if shard_spec is None else f"manifest_shard{shard_spec[0]}of{shard_spec[1]}.csv")


def _problem_rows(problems: list[InputProblem], settings: list[str]) -> list[Row]:
    return [_error_row(SlideJob(p.path, p.path.name), s, p.message) for p in problems for s in settings]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``wsi-tile``; returns 0 when every slide was tiled (or skipped), 1 when any failed, 2 on
    a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        options = _options(args)
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        print(f"wsi-tile: {args.out}: output folder not writable ({error.strerror or error})", file=sys.stderr)
        return 2
    jobs, problems = collect_slides(args.inputs)
    if args.shard is not None:
        jobs = shard(jobs, *args.shard)
    settings = [setting_name(r, options.tile_size, options.overlap) for r in options.resolutions]
    manifest = _Manifest(_manifest_path(args.out, args.shard))
    manifest.add(_problem_rows(problems, settings))
    with tqdm(total=len(jobs), unit="slide", desc="wsi-tile", disable=None) as bar:
        for slide_rows in _run(jobs, options, args.workers):
            manifest.add(slide_rows)
            bar.update()
    manifest.finish()
    failed = [row for row in manifest.rows if row["status"] == "error"]
    for message in dict.fromkeys(row["error"] for row in failed):
        print(f"wsi-tile: error: {message}", file=sys.stderr)
    counts = Counter(row["status"] for row in manifest.rows)
    print(f"wsi-tile: {len(jobs)} slides x {len(settings)} settings: "
          + ", ".join(f"{status} {n}" for status, n in sorted(counts.items())) + f"; manifest {manifest.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
