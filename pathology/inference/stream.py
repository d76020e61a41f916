"""Slides tiled and read ahead in a thread while the model predicts: the producer of ``pathology infer``.

A thread walks the slides in order: it finds or makes each slide's tile store at the model's
resolution, then reads its tiles batch by batch as uint8 (in DataLoader worker processes, or in
the thread itself with none; the model's runner normalises them) into a bounded queue. The main
thread takes each slide and its batches from the queue and predicts them. The producer starts a
slide only once the consumer has taken the one before, and the queue holds at most :data:`QUEUE_BATCHES` batches, so
the producer is at most one slide (and a few batches) ahead: tiling and reading overlap
prediction, and memory stays one slide's worth whatever the cohort size.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pathology.checkpoint import ModelSpec
from pathology.data import TileDataError, TileDataset
from pathology.inference.match import resolution_for_slide, store_matches
from pathology.inference.predict import BatchRing, batches, tile_dataset
from pathology.inference.results import STATUS_ERROR, STATUS_NO_TISSUE, STATUS_OK
from wsi_tiling import (
    Resolution,
    SlideReader,
    StoreInfo,
    TileReader,
    WsiTilingError,
    plan_read,
    read_store_info,
    store_path,
    tile_slide,
)
from wsi_tiling.inputs import SlideJob

__all__ = ["TiledSlide", "SlideStream", "tile_for_model", "slide_dataset"]

log = logging.getLogger(__name__)

OVERLAP_PX = 0  # the model was trained on non-overlapping tiles
QUEUE_BATCHES = 4  # batches read ahead of the model
# Batch tensors the producer writes into in turn: the queued ones, the one the consumer is
# predicting, and the one being written (which is thus never one the consumer still holds).
BATCH_BUFFERS = QUEUE_BATCHES + 2
STOP_POLL_S = 0.2  # how often a blocked producer checks whether the consumer has gone


@dataclass
class TiledSlide:
    """One slide as the producer hands it over.

    Attributes:
        job: the slide.
        status: ``ok`` (tiles follow), ``no-tissue`` or ``error``.
        error: one-line reason naming the file (tiling or, after the batches, reading failed).
        h5_path: its tile store (None on error).
        n_tiles: tiles in the store.
        seconds: tiling time (s).
        info: what the store asked for and delivered (its ``target_mpp`` is the µm/px the slide
            is read at; None on error).
    """

    job: SlideJob
    status: str
    error: str = ""
    h5_path: Path | None = None
    n_tiles: int = 0
    seconds: float = 0.0
    info: StoreInfo | None = None


@dataclass(frozen=True)
class _End:
    """End of a slide's batches; ``error`` when reading its tiles failed part way."""

    error: str = ""


@dataclass(frozen=True)
class _Failure:
    """An unexpected exception in the producer, re-raised in the consumer."""

    error: BaseException


def _reusable_store(job: SlideJob, h5_path: Path, spec: ModelSpec,
                    target_mpp: float) -> tuple[StoreInfo, int] | None:
    """An existing, readable store cut from this slide at ``target_mpp`` (within 1 %) and its tile
    count, else None.

    Tissue threshold and stored pixels may differ (e.g. a store written by ``wsi-tile
    --save-tiles``): they change which tiles exist, not what a tile looks like. A store that
    cannot be read (e.g. truncated) is not trusted: the slide is tiled again.
    """
    if not h5_path.is_file():
        return None
    try:
        info = read_store_info(h5_path)
        if not store_matches(info, target_mpp, spec.tile_size, job.slide_path, job.mpp):
            return None
        return info, len(TileReader(h5_path))  # a truncated store fails here
    except (OSError, KeyError, ValueError):
        return None


def _plan(job: SlideJob, spec: ModelSpec, match: str, allow_upsample: bool) -> tuple[Resolution, float]:
    """The resolution to tile the slide at (see :func:`~pathology.inference.match.resolution_for_slide`)
    and the µm/px it delivers."""
    with SlideReader(job.slide_path) as slide:
        resolution = resolution_for_slide(spec, slide, match, slide_mpp=job.mpp, allow_upsample=allow_upsample)
        return resolution, plan_read(resolution, slide, slide_mpp=job.mpp, allow_upsample=True).target_mpp


def tile_for_model(job: SlideJob, spec: ModelSpec, tiles_dir: Path, min_tissue: float, match: str = "physical",
                   allow_upsample: bool = False) -> TiledSlide:
    """Finds or makes the slide's tile store at the resolution the match mode gives for the model
    (:func:`~pathology.inference.match.resolution_for_slide`); failures become a status.

    A store is looked for under the resolution tiled at and under the checkpoint's requested one
    (where stores tiled with the training's ``wsi-tile`` command are), and reused when it
    delivered the wanted µm/px within 1 % (:func:`~pathology.inference.match.store_matches`).
    """
    start = time.perf_counter()
    try:
        resolution, target_mpp = _plan(job, spec, match, allow_upsample)
        folders = dict.fromkeys([resolution, spec.resolution])
        found = (_reusable_store(job, store_path(tiles_dir, r, spec.tile_size, OVERLAP_PX, job.slide_id), spec,
                                 target_mpp) for r in folders)
        reused = next((store for store in found if store is not None), None)
        if reused is None:
            result = tile_slide(job.slide_path, tiles_dir, resolution, spec.tile_size, overlap=OVERLAP_PX,
                                min_tissue=min_tissue, slide_mpp=job.mpp, slide_id=job.slide_id, resume=True,
                                allow_upsample=allow_upsample)
            reused = read_store_info(result.h5_path), result.n_tiles
        info, n_tiles = reused
    except WsiTilingError as error:
        return TiledSlide(job, STATUS_ERROR, str(error).splitlines()[0], seconds=time.perf_counter() - start)
    status = STATUS_OK if n_tiles else STATUS_NO_TISSUE
    return TiledSlide(job, status, h5_path=info.h5_path, n_tiles=n_tiles, info=info,
                      seconds=time.perf_counter() - start)


def slide_dataset(slide: TiledSlide, spec: ModelSpec) -> TileDataset:
    """The slide's tiles in store order, resized to the model's input (normalised by the model's runner)."""
    table = pd.DataFrame({"path": str(slide.h5_path), "tile_index": np.arange(slide.n_tiles),
                          "slide_path": str(slide.job.slide_path), "label": -1})
    return tile_dataset(table, spec)


class SlideStream:
    """Iterates tiled slides, each with its batches of tiles in store order.

    Use as a context manager: leaving it stops the producer thread (and its reader processes).

    Args:
        jobs: the slides, in the order they are predicted.
        tile: finds or makes a slide's store (:func:`tile_for_model` with its settings bound).
        dataset: the slide's tiles as a dataset (:func:`slide_dataset` with the spec bound).
        batch_size: tiles per batch.
        num_workers: DataLoader worker processes per slide (0: read in the producer thread).
    """

    def __init__(self, jobs: Sequence[SlideJob], tile: Callable[[SlideJob], TiledSlide],
                 dataset: Callable[[TiledSlide], TileDataset], batch_size: int, num_workers: int) -> None:
        self._jobs, self._tile, self._dataset = list(jobs), tile, dataset
        self._batch_size, self._num_workers = batch_size, num_workers
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._ring = BatchRing(BATCH_BUFFERS)  # one for the whole cohort: a slide may be a single batch
        self._stop = threading.Event()
        self._may_start = threading.Semaphore(1)  # released when the consumer takes a slide
        self._thread = threading.Thread(target=self._produce, name="slide-producer", daemon=True)

    def __enter__(self) -> SlideStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _put(self, item: object) -> bool:
        """Blocks until there is room; False when the consumer has stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=STOP_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _wait_turn(self) -> bool:
        """Blocks until the consumer has taken the previous slide; False when it has stopped."""
        while not self._stop.is_set():
            if self._may_start.acquire(timeout=STOP_POLL_S):
                return True
        return False

    def _produce(self) -> None:
        try:
            for job in self._jobs:
                if not self._wait_turn():
                    return
                slide = self._tile(job)
                if not self._put(slide):
                    return
                if slide.status == STATUS_OK and not self._put_batches(slide):
                    return
        except BaseException as error:  # noqa: BLE001 - any bug here is re-raised in the consumer
            self._put(_Failure(error))

    def _put_batches(self, slide: TiledSlide) -> bool:
        """Queues the slide's batches, then its end marker; False when the consumer has stopped."""
        try:
            for images in batches(self._dataset(slide), self._batch_size, self._num_workers, self._ring):
                if not self._put(images):
                    return False
        except (WsiTilingError, TileDataError) as error:
            return self._put(_End(str(error).splitlines()[0]))
        return self._put(_End())

    def _get(self) -> object:
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def __iter__(self) -> Iterator[tuple[TiledSlide, Iterator[torch.Tensor]]]:
        """Each slide with an iterator over its batches of (B, 3, H, W) uint8 tiles (empty
        unless the status is ``ok``); a read failure part way sets the slide's status and error.

        A batch is valid until the next item is taken: its tensor is then written again (see
        :data:`BATCH_BUFFERS`), so a consumer that keeps one must copy it.
        """
        for _ in self._jobs:
            slide = self._get()
            self._may_start.release()
            images = self._images(slide)
            yield slide, images
            for _ in images:  # batches the consumer did not take
                pass

    def _images(self, slide: TiledSlide) -> Iterator[torch.Tensor]:
        if slide.status != STATUS_OK:
            return
        while not isinstance(item := self._get(), _End):
            yield item
        if item.error:
            slide.status, slide.error = STATUS_ERROR, item.error
