"""Per-slide "done" records: what makes an inference run resumable and its tables rebuildable.

A slide's record, ``records/<slide_id>.json``, is written (atomically) after every other file of
the slide, so its presence means the slide finished. It holds the slide's row of ``slides.csv``,
the files it wrote and the run key: a hash of the checkpoint (weights and spec) and of every
setting that changes a number or a file (aggregations, calibration, tissue threshold, µm/px
override, match mode and upsampling, extra outputs, precision, TTA) and of the slide file (name and
size). A rerun skips a slide whose record has the same key, status ``ok`` or ``no-tissue`` and
all its files present, and redoes every other slide; ``slides.csv`` and ``summary.json`` are
assembled from the records.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pathology.inference.results import STATUS_NO_TISSUE, STATUS_OK, write_json

__all__ = ["RECORDS_DIR", "SlideRecord", "weights_hash", "run_key", "read_record", "write_record", "finished"]

RECORDS_DIR = "records"
HASH_CHARS = 16
DONE_STATUSES = (STATUS_OK, STATUS_NO_TISSUE)  # slides a rerun skips; errors are retried


@dataclass
class SlideRecord:
    """One slide's outcome, as its row of ``slides.csv`` plus what resuming needs.

    Attributes:
        slide_id: the slide's name in every output.
        slide_path: the slide read.
        status: ``ok``, ``no-tissue``, ``error`` or ``pending`` (not finished yet).
        n_tiles: tiles predicted.
        slide_mpp: the slide's level-0 µm/px as used (None when the slide was not tiled).
        read_mpp: the µm/px the slide was read at, its tile store's delivered ``target_mpp``.
        scores: the slide's aggregated scores and predicted label (``slides.csv`` columns).
        error: one-line reason, naming the file, when something failed.
        seconds: tiling, prediction and writing time of this slide (s).
        key: the run key it was made with (see :func:`run_key`).
        files: the slide's output files, relative to the run folder.
    """

    slide_id: str
    slide_path: str
    status: str
    n_tiles: int = 0
    slide_mpp: float | None = None
    read_mpp: float | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    key: str = ""
    files: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The slide's row of ``slides.csv``."""
        return {"slide_id": self.slide_id, "slide_path": self.slide_path, "status": self.status,
                "n_tiles": self.n_tiles, "slide_mpp": self.slide_mpp, "read_mpp": self.read_mpp,
                **self.scores, "error": self.error, "seconds": round(self.seconds, 3)}


def weights_hash(state_dict: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> str:
    """Hash of a model's weights and spec: equal for the same model saved by different writers."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:HASH_CHARS]


def run_key(checkpoint_hash: str, settings: Mapping[str, Any], slide_path: Path, slide_mpp: float | None) -> str:
    """Hash of everything that decides a slide's outputs: model, run settings and the slide file."""
    size = slide_path.stat().st_size if slide_path.is_file() else None
    identity = {"checkpoint": checkpoint_hash, "settings": settings, "slide": slide_path.name, "bytes": size,
                "slide_mpp": slide_mpp}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:HASH_CHARS]


def record_path(out_dir: Path, slide_id: str) -> Path:
    return out_dir / RECORDS_DIR / f"{slide_id}.json"


def write_record(out_dir: Path, record: SlideRecord) -> Path:
    """Writes the slide's record atomically; call it after every other file of the slide."""
    return write_json(record_path(out_dir, record.slide_id), asdict(record))


def read_record(out_dir: Path, slide_id: str) -> SlideRecord | None:
    """The slide's record, or None when there is none or it cannot be read (the slide is redone)."""
    path = record_path(out_dir, slide_id)
    try:
        return SlideRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def finished(out_dir: Path, slide_id: str, key: str) -> SlideRecord | None:
    """The slide's record when the slide is complete for ``key`` (every file present), else None."""
    record = read_record(out_dir, slide_id)
    if record is None or record.key != key or record.status not in DONE_STATUSES:
        return None
    return record if all((out_dir / name).is_file() for name in record.files) else None
