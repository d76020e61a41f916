"""The LightningDataModule: tile source → labels → patient split → datasets → DataLoaders.

Datasets are built in :meth:`TileDataModule.setup` (once per process, after DDP starts), never
in ``__init__``, so constructing the module from YAML is cheap and reads no file.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, WeightedRandomSampler

from pathology.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from pathology.data.dataset import TileDataset
from pathology.data.errors import EmptyTileSetError, TileDataError, TilingMismatchError
from pathology.data.sources import TileSource
from pathology.data.splits import assign_splits, check_splits, load_or_make_folds
from pathology.data.transforms import AugmentConfig, eval_transform, train_transform
from pathology.stain import StainReference, fit_stain_reference
from wsi_tiling import Resolution

__all__ = ["TileDataModule"]

log = logging.getLogger(__name__)
RESOLUTION_TOLERANCE = 0.01  # relative: declared and delivered µm/px or magnification agree within 1 %
STAIN_FIT_TILES = 256  # non-test tiles the stain reference is fitted on (drawn with the split seed)


class TileDataModule(L.LightningDataModule):
    """Labelled tiles split by patient into train / val / test, with augmentation for training."""

    def __init__(
        self,
        source: TileSource,
        class_names: list[str],
        split_csv: str | Path,
        tile_size: int,
        resolution: str,
        img_size: int = 224,
        normalization: tuple[tuple[float, float, float], tuple[float, float, float]] = (IMAGENET_MEAN, IMAGENET_STD),
        test_fraction: float = 0.2,
        val_fraction: float = 0.2,
        n_folds: int | None = None,
        val_fold: int | None = 0,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        balanced_sampling: bool = False,
        augment: AugmentConfig | None = None,
        stain_normalization: Literal["macenko"] | None = None,
    ) -> None:
        """Args:
            source: where tiles and labels come from (``ImageFolderSource``, ``ImageCsvSource``, ``H5Source``).
            class_names: class names in logit order; labels outside them are errors.
            split_csv: patient → fold file; made on first use, reused afterwards.
            tile_size: tile edge in pixels as cut, at ``resolution`` (recorded in the checkpoint).
            resolution: what tiles were cut at, e.g. ``"10x"`` or ``"0.50mpp"`` (recorded in the checkpoint).
            img_size: model input edge in pixels; tiles are resized to it (linked from the model).
            normalization: (mean, std) of RGB in [0, 1] (linked from the model's pretrained config).
            test_fraction: share of patients held out for testing, when the split file is made.
            val_fraction: share of patients for validation, when ``n_folds`` is None.
            n_folds: k for cross-validation; ``val_fold`` picks the validation fold.
            val_fold: fold used for validation (0 … k-1); None trains on every non-test fold with no
                validation (the final fit after cross-validation, ``pathology cv``).
            seed: split seed.
            batch_size: tiles per batch per device.
            num_workers: DataLoader worker processes (0 loads in the main process).
            balanced_sampling: draw training tiles with probability inverse to their class frequency.
            augment: training augmentation; None uses :class:`AugmentConfig`'s defaults.
            stain_normalization: ``"macenko"``: every tile (training, validation, test and, through
                the checkpoint, inference) is re-rendered with the stains of a reference fitted on
                :data:`STAIN_FIT_TILES` non-test tiles (:mod:`pathology.stain`); None: tiles as they are.
        """
        super().__init__()
        self.source, self.class_names, self.split_csv = source, list(class_names), Path(split_csv)
        self.tile_size, self.resolution, self.img_size = tile_size, resolution, img_size
        self.mean, self.std = (tuple(v) for v in normalization)
        self.split_kwargs = {"test_fraction": test_fraction, "val_fraction": val_fraction, "n_folds": n_folds,
                             "seed": seed}
        self.val_fold, self.batch_size, self.num_workers = val_fold, batch_size, num_workers
        self.balanced_sampling = balanced_sampling
        self.augment = augment or AugmentConfig()
        self.stain_normalization = stain_normalization
        self.stain_reference: StainReference | None = None  # fitted in setup when asked for
        self.tables: dict[str, pd.DataFrame] = {}
        self.tiling: dict | None = None  # how the tiles were cut, when the source knows (after setup)

    def setup(self, stage: str | None = None) -> None:
        """Reads the source, splits by patient (checked) and keeps one tile table per split."""
        if self.tables:
            return
        table = self.source.table(self.class_names)
        self.tiling = table.attrs.get("tiling")
        self._check_tiling(self.tiling)
        table = table[table["label"] >= 0].reset_index(drop=True)
        if table.empty:
            raise EmptyTileSetError(f"{self.source.__class__.__name__}: no labelled tiles for {self.class_names}")
        folds = load_or_make_folds(self.split_csv, table, **self.split_kwargs)
        split = assign_splits(table, folds, self.val_fold)
        check_splits(table, split, self.split_csv)
        self.tables = {name: table[split == name].reset_index(drop=True) for name in ("train", "val", "test")}
        counts = {name: self.class_counts(name).tolist() for name in self.tables}
        log.info("tiles per class and split (%s): %s", self.class_names, counts)
        if self.stain_normalization is not None:
            self.stain_reference = self._fit_stain_reference(table[split != "test"].reset_index(drop=True))

    def _fit_stain_reference(self, tiles: pd.DataFrame) -> StainReference:
        """The reference of a seeded sample of the non-test tiles.

        Not of the training split alone: every fold of a cross-validation and its final fit then
        share one reference, so their models can be ensembled. It is fitted on pixels, never
        labels, and test patients take no part.
        """
        rows = np.random.default_rng(self.split_kwargs["seed"]).permutation(len(tiles))[:STAIN_FIT_TILES]
        dataset = TileDataset(tiles.iloc[np.sort(rows)].reset_index(drop=True))
        try:
            return fit_stain_reference([dataset.tile(i) for i in range(len(dataset))])
        except ValueError as error:
            raise TileDataError(f"{self.source.__class__.__name__}: non-test tiles: {error}") from error

    def _check_tiling(self, tiling: dict | None) -> None:
        """The checkpoint records ``tile_size`` and ``resolution``: they must be what the tiles really are."""
        if tiling is None:
            return
        declared = Resolution.parse(self.resolution)
        delivered = {"mpp": tiling["mpp"], "power": tiling["power"]}.get(declared.unit)
        same = (math.isclose(declared.value, delivered, rel_tol=RESOLUTION_TOLERANCE) if delivered is not None
                else declared == Resolution.parse(tiling["resolution"]))
        if tiling["tile_size"] != self.tile_size or not same:
            raise TilingMismatchError(f"{tiling['where']}: tiles were cut at {tiling['tile_size']} px, "
                                      f"{tiling['mpp']:g} µm/px ({tiling['power']:g}x); "
                                      f"the config says {self.tile_size} px, {self.resolution}")

    def class_counts(self, split: str = "train") -> np.ndarray:
        """(C,) number of tiles of each class in ``split`` (after :meth:`setup`)."""
        return np.bincount(self.tables[split]["label"], minlength=len(self.class_names))

    def _loader(self, split: str, train: bool) -> DataLoader:
        transform = (train_transform(self.augment, self.img_size, self.mean, self.std, self.stain_reference) if train
                     else eval_transform(self.img_size, self.mean, self.std, self.stain_reference))
        dataset = TileDataset(self.tables[split], transform)
        sampler = None
        if train and self.balanced_sampling:
            weights = 1.0 / np.maximum(self.class_counts(split), 1)
            sampler = WeightedRandomSampler(weights[dataset.labels], num_samples=len(dataset), replacement=True)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          drop_last=train and len(dataset) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The validation tiles; with no validation fold none, which Lightning takes as "skip validation"."""
        return [] if self.val_fold is None else self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
