"""A map-style dataset over a tile table: image files and the tiler's h5 tiles alike.

Only paths and arrays are stored, so the dataset pickles cheaply into DataLoader workers
(``fork`` or ``spawn``); each worker opens its own :class:`wsi_tiling.TileReader` on first use.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pathology.data.errors import CorruptTileError, EmptyTileSetError
from wsi_tiling import TileReader

__all__ = ["TileDataset", "read_image"]


def read_image(path: str) -> np.ndarray:
    """Reads a tile image as (H, W, 3) uint8 RGB.

    Raises:
        CorruptTileError: missing, truncated or not an image (the message names the file).
    """
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise CorruptTileError(f"{path}: cannot decode tile image (missing, truncated or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class TileDataset(Dataset):
    """Tiles of a tile table (see :mod:`pathology.data.sources`) as ``(image, label)`` pairs.

    ``image`` is whatever ``transform`` makes of the (H, W, 3) uint8 RGB tile (a CHW float tensor
    for the training transforms); ``label`` is the int64 class index (-1 when unknown).
    """

    def __init__(self, table: pd.DataFrame, transform: Callable[..., dict[str, Any]] | None = None) -> None:
        """Args:
            table: tile table; its row order is the dataset order.
            transform: an albumentations pipeline called as ``transform(image=tile)``.

        Raises:
            EmptyTileSetError: the table has no rows.
        """
        if len(table) == 0:
            raise EmptyTileSetError("tile set is empty: no tiles left after labelling and splitting")
        self.paths = table["path"].astype(str).to_numpy()
        self.tile_index = table["tile_index"].to_numpy(np.int64)
        self.slide_paths = table["slide_path"].astype(str).to_numpy()
        self.labels = table["label"].to_numpy(np.int64)
        self._label_tensors = torch.tensor(self.labels)  # one copy; indexing it is 20x cheaper than a tensor per tile
        self.transform = transform
        self._readers: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": {}}  # handles are per process, reopened lazily

    def _reader(self, h5_path: str, slide_path: str):
        if h5_path not in self._readers:
            self._readers[h5_path] = TileReader(h5_path, slide_path or None)
        return self._readers[h5_path]

    def tile(self, index: int) -> np.ndarray:
        """The raw (H, W, 3) uint8 RGB tile at ``index``, before any transform."""
        if self.tile_index[index] < 0:
            return read_image(self.paths[index])
        return self._reader(self.paths[index], self.slide_paths[index])[int(self.tile_index[index])]

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        tile = self.tile(index)
        image = tile if self.transform is None else self.transform(image=tile)["image"]
        return image, self._label_tensors[index]
