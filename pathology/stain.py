"""Macenko stain normalisation: every tile re-rendered with one reference's H and E colours.

Stain jitter (:class:`~pathology.data.HEDJitter`) teaches the model to ignore stain variation;
normalisation removes it instead, before training and inference alike. A
:class:`StainReference` is fitted once on non-test tiles and stored in the checkpoint's spec, so
``predict-tiles`` and ``infer`` re-render tiles exactly as training did. The decomposition is
torchstain's (Macenko et al., ISBI 2009): per tile, the H and E optical-density vectors and the
99th-percentile concentrations are estimated and the concentrations re-rendered with the
reference's vectors and scale. A tile with too little stained tissue to estimate its own stains
(glass, fat) is left as it is. A tile of one single colour has no second stain to find, and its
re-rendering is arbitrary (tissue tiles have both).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

__all__ = ["StainReference", "StainNormalizer", "fit_stain_reference", "MIN_TISSUE_FRACTION"]

TRANSMITTED = 240  # torchstain's light intensity Io: brighter pixels are glass
OD_THRESHOLD = 0.15  # torchstain's beta: a pixel is stained when every channel's optical density reaches it
MAX_STAINED = TRANSMITTED * np.exp(-OD_THRESHOLD) - 1  # the same test on uint8 values: -ln((v + 1) / Io) >= beta
MIN_TISSUE_FRACTION = 0.02  # fewer stained pixels give no stable stain vectors: the tile is left unchanged


@dataclass(frozen=True)
class StainReference:
    """The stain colours every tile is re-rendered with.

    Attributes:
        stain_matrix: optical density per unit of stain, one row per RGB channel, columns (H, E).
        max_concentrations: the reference's 99th-percentile (H, E) concentrations.
    """

    stain_matrix: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    max_concentrations: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for the checkpoint's spec."""
        return {"stain_matrix": [list(row) for row in self.stain_matrix],
                "max_concentrations": list(self.max_concentrations)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainReference:
        """From :meth:`to_dict`'s lists (or arrays), as plain floats."""
        matrix = tuple(tuple(float(v) for v in row) for row in data["stain_matrix"])
        return cls(matrix, tuple(float(v) for v in data["max_concentrations"]))


def _stained_fraction(tile: np.ndarray) -> float:
    return float(np.all(tile <= MAX_STAINED, axis=-1).mean())


def fit_stain_reference(tiles: Sequence[np.ndarray]) -> StainReference:
    """The reference of ``tiles`` (H, W, 3) uint8 RGB taken together as one image.

    Raises:
        ValueError: the tiles hold too little stained tissue, or no two stains can be told apart.
    """
    pixels = np.concatenate([tile.reshape(-1, 3) for tile in tiles])[None]
    if _stained_fraction(pixels) < MIN_TISSUE_FRACTION:
        raise ValueError(f"{len(tiles)} tiles have under {MIN_TISSUE_FRACTION:.0%} stained pixels: "
                         "no stain reference can be fitted")
    normalizer = NumpyMacenkoNormalizer()
    with np.errstate(all="ignore"):
        normalizer.fit(pixels, Io=TRANSMITTED, beta=OD_THRESHOLD)
    matrix, concentrations = np.asarray(normalizer.HERef), np.asarray(normalizer.maxCRef)
    if not (np.isfinite(matrix).all() and np.isfinite(concentrations).all() and (concentrations > 0).all()):
        raise ValueError(f"{len(tiles)} tiles: the H and E stains cannot be separated (one stain only?)")
    return StainReference.from_dict({"stain_matrix": matrix, "max_concentrations": concentrations})


class StainNormalizer:
    """Re-renders (H, W, 3) uint8 RGB tiles with ``reference``'s stains; picklable (DataLoader workers)."""

    def __init__(self, reference: StainReference) -> None:
        self._normalizer = NumpyMacenkoNormalizer()
        self._normalizer.HERef = np.asarray(reference.stain_matrix, dtype=np.float64)
        self._normalizer.maxCRef = np.asarray(reference.max_concentrations, dtype=np.float64)

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """The normalised tile; the tile itself when it has too little stained tissue."""
        if _stained_fraction(tile) < MIN_TISSUE_FRACTION:
            return tile
        try:
            with np.errstate(all="ignore"):
                normalized, _, _ = self._normalizer.normalize(tile, Io=TRANSMITTED, beta=OD_THRESHOLD, stains=False)
        except (np.linalg.LinAlgError, ValueError, IndexError):  # degenerate stains: nothing to re-render
            return tile
        return normalized
