"""Tile probabilities and embeddings with Lightning's predict loop, on one device or many.

Every process (rank) predicts its share of the tiles and a :class:`ShardWriter` saves what it
saw, with the tiles' dataset indices, to ``rank<r>.npz``; rank 0 then merges the shards in
dataset order. One code path serves a laptop CPU, one GPU and DDP over several GPUs or machines,
and a run on two processes gives the same numbers as a run on one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pathology.atomic import atomic_path

__all__ = ["RunOptions", "ShardWriter", "TilePredictor", "TilePredictions", "predict_tiles"]

log = logging.getLogger(__name__)

# Reader processes: none on a 2-core laptop (they would compete with the model's threads for the
# same cores), up to 4 where cores are spare to overlap reading with compute.
DEFAULT_WORKERS = min(4, max(0, (os.cpu_count() or 1) - 2))


@dataclass(frozen=True)
class RunOptions:
    """How to run the model; the fields are Lightning Trainer and DataLoader arguments.

    Attributes:
        batch_size: tiles per forward pass (per device).
        num_workers: DataLoader worker processes reading and preprocessing tiles while the model
            computes; 0 reads in the main process. Default: CPU cores − 2, at most 4.
        accelerator: ``auto``, ``cpu``, ``gpu``, ...
        devices: number of devices (or ``auto``); more than one predicts with DDP.
        strategy: Lightning strategy, e.g. ``ddp``; ``auto`` picks one.
        precision: ``32-true``, or e.g. ``bf16-mixed`` / ``16-mixed`` on GPUs.
        num_nodes: machines taking part.
        progress_bar: show progress bars (slides tiled, Lightning's prediction, slides written).
    """

    batch_size: int = 64
    num_workers: int = DEFAULT_WORKERS
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    progress_bar: bool = True


@dataclass(frozen=True)
class TilePredictions:
    """Predictions for every tile of a dataset, in dataset order.

    Attributes:
        probs: (N, C) float32 softmax probabilities.
        embeddings: (N, D) float32 pooled features (``forward_head(pre_logits=True)``), or None.
    """

    probs: np.ndarray
    embeddings: np.ndarray | None


class TilePredictor(pl.LightningModule):
    """Wraps a classifier with ``forward_features``/``forward_head`` for ``Trainer.predict``.

    ``predict_step`` returns ``{"probs": (B, C)}`` and, with ``embeddings``, ``{"embeddings": (B, D)}``
    from the same forward pass.
    """

    def __init__(self, model: nn.Module, embeddings: bool = False) -> None:
        super().__init__()
        self.model = model
        self.embeddings = embeddings

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        images = images.contiguous(memory_format=torch.channels_last)  # the optimised model's layout
        features = self.model.forward_features(images)
        out = {"probs": self.model.forward_head(features).float().softmax(dim=1)}
        if self.embeddings:
            out["embeddings"] = self.model.forward_head(features, pre_logits=True).float()
        return out


class ShardWriter(BasePredictionWriter):
    """Collects one rank's predictions with their dataset indices; saves them at the end of the epoch."""

    def __init__(self, shard_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)
        self._parts: list[dict[str, np.ndarray]] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts = []

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        part = {key: value.detach().cpu().numpy() for key, value in prediction.items()}
        part["index"] = np.asarray(batch_indices, np.int64)
        self._parts.append(part)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        arrays = {key: np.concatenate([p[key] for p in self._parts]) for key in self._parts[0]} if self._parts else {}
        with atomic_path(self.shard_dir / f"rank{trainer.global_rank}.npz") as tmp:
            np.savez(tmp, **arrays)
        self._parts = []


def _merge(shard_dir: Path, n_tiles: int) -> TilePredictions:
    """Puts every shard's rows at their dataset index (DDP pads ranks with repeated tiles)."""
    merged: dict[str, np.ndarray] = {}
    seen = np.zeros(n_tiles, bool)
    for shard in sorted(shard_dir.glob("rank*.npz")):
        with np.load(shard) as data:
            if "index" not in data:
                continue
            index = data["index"]
            for key in data.files:
                if key != "index":
                    merged.setdefault(key, np.zeros((n_tiles, data[key].shape[1]), np.float32))[index] = data[key]
            seen[index] = True
    if not seen.all():
        raise RuntimeError(f"{shard_dir}: predictions missing for {int((~seen).sum())} of {n_tiles} tiles")
    return TilePredictions(merged["probs"], merged.get("embeddings"))


def predict_tiles(model: nn.Module, dataset: Dataset, shard_dir: str | Path, options: RunOptions = RunOptions(),
                  embeddings: bool = False) -> TilePredictions | None:
    """Predicts every item of ``dataset`` (``(image, label)`` pairs of normalised CHW tensors).

    Args:
        model: classifier in eval form.
        dataset: the tiles, e.g. a :class:`pathology.data.TileDataset` with the eval transform.
        shard_dir: folder for the per-rank files (on a file system every node sees); removed at the end.
        options: devices, batch size, workers, precision.
        embeddings: also return the pooled features.

    Returns:
        The predictions on rank 0; None on the other ranks (they have nothing more to do).
    """
    shard_dir = Path(shard_dir)
    trainer = pl.Trainer(accelerator=options.accelerator, devices=options.devices, strategy=options.strategy,
                         num_nodes=options.num_nodes, precision=options.precision, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=options.progress_bar,
                         callbacks=[ShardWriter(shard_dir)])
    if trainer.is_global_zero:
        shard_dir.mkdir(parents=True, exist_ok=True)
        for old in shard_dir.glob("rank*.npz"):
            old.unlink()
    loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False)
    trainer.predict(TilePredictor(model, embeddings), dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier("predictions written")
    if not trainer.is_global_zero:
        return None
    predictions = _merge(shard_dir, len(dataset))
    for shard in shard_dir.glob("rank*.npz"):
        shard.unlink()
    shard_dir.rmdir()
    log.info("predicted %d tiles on %d process(es)", len(dataset), trainer.world_size)
    return predictions
