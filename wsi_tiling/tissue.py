"""Tissue detection on a low-resolution thumbnail, with sizes in µm² so it means the same everywhere.

Stained tissue is coloured and glass is grey, so the HSV saturation separates them: an Otsu
threshold (never below a floor, so empty glass stays empty; near-black pixels, such as a
fluorescence scan's dark field, never count), then morphological closing and
removal of specks and holes whose areas are given in µm². Pure functions, arrays in and out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

__all__ = ["TissueParams", "tissue_mask", "tissue_fraction"]


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings, physical where they can be.

    Attributes:
        mask_mpp: µm/px of the thumbnail the mask is computed on.
        min_saturation: saturation (0-255) below which a pixel is glass whatever Otsu says.
        min_brightness: HSV value (0-255) below which a pixel is background: the dark field of a
            fluorescence scan, black scanner borders (their noise is "saturated").
        close_um: diameter in µm of the closing that joins nearby tissue fragments.
        min_region_um2: tissue regions smaller than this (µm²) are dropped as dust.
        max_hole_um2: holes inside tissue smaller than this (µm²) are filled.
    """

    mask_mpp: float = 4.0
    min_saturation: int = 20
    min_brightness: int = 40
    close_um: float = 16.0
    min_region_um2: float = 2_500.0
    max_hole_um2: float = 2_500.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # label 0 is the background
    return keep[labels]


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of a thumbnail.

    Args:
        rgb: (H, W, 3) uint8 RGB thumbnail.
        mpp: µm/px of the thumbnail (sets the physical sizes of the morphology).
        params: detection settings.

    Returns:
        (H, W) bool, True on tissue.
    """
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    saturation = hsv[..., 1]
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (saturation > max(otsu, params.min_saturation)) & (hsv[..., 2] >= params.min_brightness)
    pixel_um2 = mpp * mpp
    diameter = 2 * round(params.close_um / mpp / 2) + 1  # odd, so the closing does not shift the mask
    if diameter > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (diameter, diameter))
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    mask = _drop_small(mask, params.min_region_um2 / pixel_um2)
    holes = ~mask & ~_drop_small(~mask, params.max_hole_um2 / pixel_um2)
    return mask | holes


def tissue_fraction(mask: np.ndarray, mask_downsample: tuple[float, float], coords_level0: np.ndarray,
                    footprint_level0: float) -> np.ndarray:
    """Fraction of each tile's area that is tissue, from a low-resolution mask (any boolean mask: the
    annotation coverage of ``pathology.data.annotations`` is measured with it too).

    Args:
        mask: (H, W) bool tissue mask.
        mask_downsample: level-0 pixels per mask pixel along (x, y).
        coords_level0: (N, 2) level-0 top-left (x, y) of the tiles.
        footprint_level0: tile edge in level-0 pixels.

    Returns:
        (N,) float32 in [0, 1].
    """
    if len(coords_level0) == 0:
        return np.zeros(0, np.float32)
    integral = cv2.integral(mask.astype(np.uint8)).astype(np.float64)  # (H+1, W+1)
    height, width = mask.shape
    scale = np.asarray(mask_downsample, np.float64)
    start = np.floor(coords_level0 / scale + 0.5).astype(np.int64)
    end = np.floor((coords_level0 + footprint_level0) / scale + 0.5).astype(np.int64)
    end = np.maximum(end, start + 1)
    x0, x1 = np.clip(start[:, 0], 0, width), np.clip(end[:, 0], 0, width)
    y0, y1 = np.clip(start[:, 1], 0, height), np.clip(end[:, 1], 0, height)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = (end[:, 0] - start[:, 0]) * (end[:, 1] - start[:, 1])
    return (inside / area).astype(np.float32)
