"""Tissue mask and per-tile tissue fraction on hand-built thumbnails."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_tiling.tissue import TissueParams, tissue_fraction, tissue_mask

GLASS = (240, 240, 240)
PINK = (230, 150, 200)


def _thumbnail(size: int = 100) -> np.ndarray:
    return np.full((size, size, 3), GLASS, np.uint8)


def test_blank_glass_has_no_tissue_even_with_noise(rng: np.random.Generator) -> None:
    # JPEG-like noise of a few grey levels must not pass the saturation floor, whatever Otsu picks.
    noisy = np.clip(_thumbnail().astype(int) + rng.integers(-3, 4, (100, 100, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(noisy, mpp=4.0).any()


def test_tissue_square_is_found_and_dust_dropped_by_physical_area() -> None:
    image = _thumbnail()
    image[20:60, 20:60] = PINK  # 40 × 40 px at 4 µm/px = 25,600 µm²: tissue
    image[80:83, 80:83] = PINK  # 3 × 3 px = 144 µm²: dust below 2,500 µm²
    mask = tissue_mask(image, mpp=4.0)
    assert mask[20:60, 20:60].all()
    assert mask.sum() == 40 * 40
    # the same dust at 20 µm/px is 3,600 µm²: now above the area limit, so kept
    assert tissue_mask(image, mpp=20.0)[81, 81]


def test_dark_field_is_background_and_stained_nuclei_are_tissue(rng: np.random.Generator) -> None:
    # A fluorescence-like thumbnail: near-black noise (its hue is random, so "saturated") with a
    # bright blue DAPI block of 30 × 30 px.
    image = rng.integers(0, 12, (100, 100, 3)).astype(np.uint8)
    image[40:70, 40:70] = (40, 60, 220)
    mask = tissue_mask(image, mpp=4.0)
    assert mask[40:70, 40:70].all() and mask.sum() == 30 * 30


def test_small_hole_filled_large_hole_kept() -> None:
    image = _thumbnail()
    image[10:90, 10:90] = PINK
    image[20:25, 20:25] = GLASS  # 5 × 5 px × 16 µm² = 400 µm² hole: filled
    image[50:80, 50:80] = GLASS  # 30 × 30 px = 14,400 µm² hole: kept
    params = TissueParams(close_um=1.0)  # no closing, to see the hole logic alone
    mask = tissue_mask(image, mpp=4.0, params=params)
    assert mask[22, 22]
    assert not mask[65, 65]


def test_tissue_fraction_by_hand() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # top-left quarter of a 4 × 4 mask
    # each mask pixel is 10 level-0 px; tiles of 20 level-0 px at (0,0), (20,0), (10,10)
    coords = np.array([[0, 0], [20, 0], [10, 10]])
    fraction = tissue_fraction(mask, (10.0, 10.0), coords, 20.0)
    assert fraction.tolist() == pytest.approx([1.0, 0.0, 0.25])


def test_tissue_fraction_of_no_tiles_is_empty() -> None:
    assert tissue_fraction(np.ones((4, 4), bool), (1.0, 1.0), np.zeros((0, 2), np.int64), 2.0).shape == (0,)
