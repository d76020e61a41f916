"""Whole-slide thumbnails: size, scale and colour worked out by hand on an in-memory slide."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_tiling import InMemorySlide, MissingResolutionError, read_thumbnail

RED, BLUE = (200, 30, 30), (30, 30, 200)


def _slide(mpp: float | None = 0.5) -> InMemorySlide:
    """400 x 200 level 0, red left half, blue right half; a second level at downsample 4."""
    level0 = np.empty((200, 400, 3), np.uint8)
    level0[:, :200], level0[:, 200:] = RED, BLUE
    return InMemorySlide([level0, level0[::4, ::4]], mpp=mpp, path="halves.svs")


def test_size_limit_gives_the_longer_edge() -> None:
    rgb, scale = read_thumbnail(_slide(), 100)  # 400 / 100 = downsample 4: level 1 as it is
    assert rgb.shape == (50, 100, 3) and scale == (4.0, 4.0)
    assert (rgb[:, :50] == RED).all() and (rgb[:, 50:] == BLUE).all()


def test_mpp_is_honoured_unless_the_size_limit_is_coarser() -> None:
    rgb, scale = read_thumbnail(_slide(), 1000, mpp=4.0)  # 4 / 0.5 = downsample 8
    assert rgb.shape == (25, 50, 3) and scale == (8.0, 8.0)
    assert (rgb[:, :25] == RED).all() and (rgb[:, 25:] == BLUE).all()
    rgb, scale = read_thumbnail(_slide(), 25, mpp=4.0)  # 400 / 25 = 16 wins; 200 / 16 = 12.5 rows -> 12
    assert rgb.shape == (12, 25, 3) and scale == (16.0, 200 / 12)


def test_never_finer_than_level_0() -> None:
    rgb, scale = read_thumbnail(_slide(), 1000, mpp=0.1)
    assert rgb.shape == (200, 400, 3) and scale == (1.0, 1.0)


def test_slide_mpp_stands_in_for_missing_metadata() -> None:
    with pytest.raises(MissingResolutionError, match="halves.svs"):
        read_thumbnail(_slide(mpp=None), 1000, mpp=2.0)
    rgb, scale = read_thumbnail(_slide(mpp=None), 1000, mpp=2.0, slide_mpp=0.5)
    assert rgb.shape == (50, 100, 3) and scale == (4.0, 4.0)
