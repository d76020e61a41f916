"""What to tile: slide paths from files, folders and CSV lists, and the deterministic shard split.

Inputs that cannot be used (a missing path, a folder with no slides, a CSV without a
``slide_path`` column, a duplicated slide id) become :class:`InputProblem` rows for the run
manifest instead of stopping the batch.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .reader import DICOM_SUFFIX
from .tiler import default_slide_id

__all__ = ["SlideJob", "InputProblem", "collect_slides", "shard", "parse_shard", "SLIDE_SUFFIXES"]

SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"})
CSV_SUFFIX = ".csv"


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile.

    Attributes:
        slide_path: a slide file or a DICOM slide's folder.
        slide_id: name of its stores.
        mpp: level-0 µm/px overriding the metadata (CSV ``mpp`` column), or None.
    """

    slide_path: Path
    slide_id: str
    mpp: float | None = None


@dataclass(frozen=True)
class InputProblem:
    """An input that yields no slide, with a one-line reason naming it."""

    path: Path
    message: str


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob(f"*{DICOM_SUFFIX}"))


def _scan_folder(folder: Path) -> list[SlideJob]:
    """Slides directly inside a folder (DICOM sub-folders count as one slide each)."""
    if _is_dicom_folder(folder):
        return [SlideJob(folder, default_slide_id(folder))]
    found = [p for p in sorted(folder.iterdir())
             if (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES) or _is_dicom_folder(p)]
    return [SlideJob(p, default_slide_id(p)) for p in found]


def _read_csv(path: Path) -> list[SlideJob | InputProblem]:
    """Rows of a CSV with ``slide_path`` and optional ``slide_id`` and ``mpp``; relative paths
    are taken relative to the CSV's folder. A row with an empty path is a problem of its own."""
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or "slide_path" not in rows[0]:
        raise ValueError("has no 'slide_path' column")
    jobs: list[SlideJob | InputProblem] = []
    for number, row in enumerate(rows, start=2):
        if not (row["slide_path"] or "").strip():
            jobs.append(InputProblem(path, f"{path}: line {number}: empty slide_path"))
            continue
        slide = path.parent / row["slide_path"].strip()
        mpp_text = (row.get("mpp") or "").strip()
        mpp = float(mpp_text) if mpp_text else None
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"line {number}: mpp must be a positive number, got {mpp_text!r}")
        jobs.append(SlideJob(slide, (row.get("slide_id") or "").strip() or default_slide_id(slide), mpp))
    return jobs


def _expand(path: Path) -> list[SlideJob | InputProblem]:
    if path.suffix.lower() == CSV_SUFFIX and path.is_file():
        return _read_csv(path)
    if path.is_dir():
        jobs = _scan_folder(path)
        if not jobs:
            raise ValueError(f"is a folder with no slides ({', '.join(sorted(SLIDE_SUFFIXES))} or DICOM)")
        return jobs
    if not path.exists():
        raise ValueError("no such file or folder")
    return [SlideJob(path, default_slide_id(path))]


def collect_slides(inputs: Iterable[str | Path]) -> tuple[list[SlideJob], list[InputProblem]]:
    """Expands slide files, folders and CSV lists into jobs, sorted by slide id.

    Returns:
        The jobs, and the inputs that gave none (or a slide id already taken), with reasons.
    """
    jobs: dict[str, SlideJob] = {}
    problems: list[InputProblem] = []
    for item in inputs:
        path = Path(item)
        try:
            expanded = _expand(path)
        except (ValueError, OSError, csv.Error) as error:
            problems.append(InputProblem(path, f"{path}: {error}"))
            continue
        for job in expanded:
            if isinstance(job, InputProblem):
                problems.append(job)
            elif job.slide_id in jobs:
                problems.append(InputProblem(job.slide_path, f"{job.slide_path}: slide id {job.slide_id!r} "
                                             f"already used by {jobs[job.slide_id].slide_path}; give unique "
                                             "slide_id values in a CSV"))
            else:
                jobs[job.slide_id] = job
    return sorted(jobs.values(), key=lambda job: job.slide_id), problems


def parse_shard(text: str) -> tuple[int, int]:
    """Reads ``I/N`` (0 <= I < N), e.g. ``$SLURM_ARRAY_TASK_ID/8``.

    Raises:
        ValueError: not of that form.
    """
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard takes I/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def shard(jobs: Sequence[SlideJob], index: int, count: int) -> list[SlideJob]:
    """The jobs of shard ``index`` of ``count``: every ``count``-th slide in slide-id order, so the
    shards partition the batch and each slide lands in exactly one, on any machine."""
    ordered = sorted(jobs, key=lambda job: job.slide_id)
    return ordered[index::count]
