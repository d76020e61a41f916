"""Tile probabilities (and embeddings) from a classifier: the one prediction path of the project.

``pathology predict-tiles`` (a folder or CSV of tile images) and ``pathology infer`` (slides,
streamed one at a time) both go through a :class:`Predictor`: the model in its fastest form on
this process's device (:func:`~pathology.models.optimize_for_inference`: on a CPU ONNX Runtime
at fp32, or OpenVINO at bf16 where the CPU has AMX or AVX512-BF16; the fused torch model on a GPU;
``--backend`` and ``--precision`` force them), and with TTA on the 8 dihedral views of each
batch (:mod:`pathology.models.tta`), whatever the backend.
Devices come from Lightning Fabric, which launches one process per device for DDP and gives
each its rank; no Trainer, so no banners and no inner progress bars. :meth:`Predictor.predict`
is the only place the model is called.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pathology.checkpoint import ModelSpec
from pathology.data import TileDataset, collate_tiles, resize_transform, stack_tiles
from pathology.models.export import ExportError
from pathology.models.runtime import (
    BACKENDS,
    PRECISIONS,
    BackendUnavailable,
    InferenceRunner,
    Normalization,
    UnsupportedRun,
    optimize_for_inference,
)
from pathology.models.tta import mean_over_views

__all__ = ["RunOptions", "TilePredictions", "Predictor", "RUNNER_ERRORS", "add_backend_option", "add_precision_option",
           "add_tta_option",
           "start_devices", "make_predictor", "BatchRing", "batches", "predict_tiles"]

log = logging.getLogger(__name__)

# Reader processes: none on a 2-core laptop (they would compete with the model's threads for the
# same cores), up to 4 where cores are spare to overlap reading with compute.
DEFAULT_WORKERS = min(4, max(0, (os.cpu_count() or 1) - 2))
# Ranks wait for each other only at the end of a run; slides differ in size, so a rank may
# finish its share hours before the last one (gloo/NCCL default: 30 minutes).
RANK_WAIT = timedelta(days=7)
# What making the runner can raise for a run-wide reason (a CLI's one-line error, before any slide)
RUNNER_ERRORS = (BackendUnavailable, UnsupportedRun, ExportError)


@dataclass(frozen=True)
class RunOptions:
    """How to run the model: devices (Lightning Fabric arguments), batch size, reader processes.

    Attributes:
        batch_size: tiles per forward pass (per device).
        num_workers: DataLoader worker processes reading and preprocessing tiles while the model
            computes; 0 reads in a thread of the main process. Default: CPU cores − 2, at most 4.
        accelerator: ``auto``, ``cpu``, ``gpu``, ...
        devices: number of devices (or ``auto``); more than one predicts with DDP.
        strategy: Lightning strategy, e.g. ``ddp``; ``auto`` picks one.
        precision: ``auto`` (bf16 where the device has bf16 units: GPUs, CPUs with AMX or
            AVX512-BF16; else fp32), ``32-true`` (the eager function), ``bf16-mixed``,
            ``16-mixed`` (GPUs); see :func:`~pathology.models.runtime.choose_backend`.
        num_nodes: machines taking part.
        progress_bar: show the progress bar (over slides, or over batches of tile images).
        backend: what runs the model: ``auto`` (the fastest installed for the device), ``torch``,
            ``onnxruntime`` or ``openvino`` (see :func:`~pathology.models.optimize_for_inference`).
    """

    batch_size: int = 64
    num_workers: int = DEFAULT_WORKERS
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "auto"
    num_nodes: int = 1
    progress_bar: bool = True
    backend: str = "auto"


@dataclass(frozen=True)
class TilePredictions:
    """Predictions for every tile of a dataset, in dataset order.

    Attributes:
        probs: (N, C) float32 softmax probabilities.
        embeddings: (N, D) float32 pooled features (``forward_head(pre_logits=True)``), or None.
    """

    probs: np.ndarray
    embeddings: np.ndarray | None


@dataclass
class Predictor:
    """A classifier on this process's device.

    Attributes:
        runner: the classifier in its fastest form and precision (:func:`~pathology.models.optimize_for_inference`).
        embeddings: also return the pooled features.
        tta: average the softmax probabilities (and the features) over the 8 dihedral views of
            each tile; the runner sees one view at a time, so 8 passes of the batch size.
    """

    runner: InferenceRunner
    embeddings: bool = False
    tta: bool = False

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, C) float32 probabilities and, with ``embeddings``, (B, D) float32 features of a batch.

        Args:
            images: (B, 3, H, W) tiles in the runner's input form (uint8 pixels from
                :func:`make_predictor`; normalised floats for a runner built without
                ``normalize``), on any device.
        """
        if self.tta:
            probs, pooled = mean_over_views(self._probs_and_embeddings, images.to(self.runner.device))
        else:
            probs, pooled = self._probs_and_embeddings(images)
        return probs.cpu().numpy(), pooled.cpu().numpy() if self.embeddings else None

    def _probs_and_embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) softmax probabilities and (B, D) features, float32, from one forward pass."""
        logits, pooled = self.runner.logits_and_embeddings(images)
        return logits.float().softmax(dim=1), pooled.float()


def add_backend_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--backend``, shared by ``pathology infer`` and ``pathology predict-tiles``."""
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default=RunOptions.backend,
                        help="what runs the model (auto: the fastest installed for the device and precision: on a "
                             "CPU OpenVINO at bf16, ONNX Runtime at fp32; torch on a GPU)")


def add_precision_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--precision``, shared by ``pathology infer``, ``predict-tiles`` and ``cv``."""
    parser.add_argument("--precision", choices=PRECISIONS, default=RunOptions.precision,
                        help="auto: bf16-mixed where the hardware has bf16 units (GPUs, CPUs with AMX or "
                             "AVX512-BF16; probabilities within ~1e-2 of fp32), else 32-true (the exact function)")


def add_tta_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--tta`` / ``--no-tta`` (None when neither is given: the checkpoint's spec decides), shared by
    ``pathology infer`` and ``pathology predict-tiles``."""
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the softmax over the 8 dihedral views of each tile (8x the compute); "
                             "default: as the checkpoint's spec says (its training evaluated with TTA or not)")


def start_devices(options: RunOptions) -> Fabric:
    """Starts Lightning Fabric: launches the DDP processes when asked for, and gives each its rank.

    With ``strategy="ddp"`` the processes wait for each other for up to :data:`RANK_WAIT`. The
    precision is the runner's (:func:`make_predictor`), not Fabric's, so runtimes honour it too.
    """
    strategy = DDPStrategy(timeout=RANK_WAIT) if options.strategy == "ddp" else options.strategy
    fabric = Fabric(accelerator=options.accelerator, devices=options.devices, strategy=strategy,
                    num_nodes=options.num_nodes)
    fabric.launch()
    return fabric


def make_predictor(model: nn.Module, fabric: Fabric, normalize: Normalization, embeddings: bool = False,
                   backend: str = "auto", cache_dir: Path | None = None, tta: bool = False,
                   precision: str = "auto") -> Predictor:
    """The model in its fastest form on ``fabric``'s device, taking uint8 tiles (:func:`batches`).

    Args:
        model: the classifier (left unchanged).
        fabric: from :func:`start_devices`.
        normalize: its ``(mean, std)`` (the spec's), applied inside the runner's graph.
        embeddings: also return the pooled features.
        backend: see :attr:`RunOptions.backend`.
        cache_dir: where an exported graph is kept (the checkpoint's folder); None, or a folder
            this process cannot write: the user cache.
        tta: average over the 8 dihedral views of each tile (see :class:`Predictor`).
        precision: see :attr:`RunOptions.precision`.

    Raises:
        BackendUnavailable: a forced backend whose package is not installed.
        UnsupportedRun: a backend or precision the device cannot run.
        ExportError: the ONNX export failed.
    """
    writable = cache_dir is not None and os.access(cache_dir, os.W_OK)
    runner = optimize_for_inference(model.to(fabric.device).eval(), backend=backend, precision=precision,
                                    cache_dir=cache_dir if writable else None, normalize=normalize)
    return Predictor(runner, embeddings, tta)


def tile_dataset(table: pd.DataFrame, spec: ModelSpec) -> TileDataset:
    """The tiles of ``table`` as the model's spec says inference reads them: stain-normalised when
    it holds a reference, resized to its input; :func:`batches` stacks them as uint8 and the
    predictor's runner normalises them with the spec's mean and std. Together, training's
    ``eval_transform``."""
    return TileDataset(table, resize_transform(spec.img_size, spec.stain_reference))


class BatchRing:
    """Batch tensors :func:`batches` writes in turn, kept from call to call (slide to slide): a
    fresh batch costs its page faults every time (64 tiles of 224 px: 4.0 against 1.6 ms into a
    reused one, on the 2-core VM). A batch is overwritten ``size`` batches later, whichever call
    wrote it.
    """

    def __init__(self, size: int) -> None:
        self._slots: list[torch.Tensor | None] = [None] * size
        self._turn = 0

    def write(self, tiles: list[np.ndarray]) -> torch.Tensor:
        """The tiles stacked (:func:`~pathology.data.stack_tiles`) into the next slot (page-locked on a GPU machine)."""
        slot = self._turn % len(self._slots)
        batch = stack_tiles(tiles, self._slots[slot])
        if torch.cuda.is_available() and not batch.is_pinned():
            batch = batch.pin_memory()
        self._slots[slot] = batch
        self._turn += 1
        return batch


def batches(dataset: Dataset, batch_size: int, num_workers: int,
            ring: BatchRing | None = None) -> Iterator[torch.Tensor]:
    """The dataset's tiles in order, ``batch_size`` at a time, as (B, 3, H, W) uint8 batches
    (:func:`~pathology.data.stack_tiles`), the input of :func:`make_predictor`'s predictor.

    Args:
        dataset: ``(tile, label)`` pairs of resized (H, W, 3) uint8 tiles, e.g. a
            :class:`~pathology.data.TileDataset` with :func:`~pathology.data.resize_transform`.
        batch_size: tiles per batch.
        num_workers: DataLoader processes reading tiles; 0: here, in the caller's thread.
        ring: with no workers, the tensors batches are written into (None: one buffer for this
            call); the consumer must be done with a batch before the ring comes round to it.

    Raises:
        CorruptTileError / WsiTilingError: a tile cannot be read (from the dataset).
    """
    if num_workers:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                              collate_fn=collate_tiles, pin_memory=torch.cuda.is_available())
        return
    ring = ring or BatchRing(1)
    for start in range(0, len(dataset), batch_size):
        yield ring.write([dataset[index][0] for index in range(start, min(start + batch_size, len(dataset)))])


def predict_tiles(predictor: Predictor, dataset: Dataset, options: RunOptions = RunOptions()) -> TilePredictions:
    """Predicts every tile of ``dataset``.

    Args:
        predictor: the model, from :func:`make_predictor`.
        dataset: ``(tile, label)`` pairs of resized uint8 tiles (see :func:`batches`).
        options: batch size, workers, progress bar.

    Returns:
        (N, C) probabilities and, when the predictor computes them, (N, D) embeddings, in dataset order.
    """
    probs, pooled = [], []
    n_batches = -(-len(dataset) // options.batch_size)
    for images in tqdm(batches(dataset, options.batch_size, options.num_workers),
                       total=n_batches, unit="batch", disable=not options.progress_bar):
        batch_probs, batch_pooled = predictor.predict(images)
        probs.append(batch_probs)
        if batch_pooled is not None:
            pooled.append(batch_pooled)
    return TilePredictions(np.concatenate(probs), np.concatenate(pooled) if pooled else None)
