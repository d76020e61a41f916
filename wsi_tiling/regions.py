"""Reading a region of a pyramid level, or the whole slide as a thumbnail, resampled with area
interpolation in bounded memory.

Large regions are read in horizontal bands whose output rows are whole, so a 50,000-pixel-wide
level never sits in memory at once and the result equals one large area resize.
"""
from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from .reader import InMemorySlide, SlideReader
from .resolution import Resolution, plan_read

__all__ = ["RegionSource", "read_scaled", "read_thumbnail", "MAX_READ_PIXELS"]

MAX_READ_PIXELS = 4096 * 4096  # read-level pixels decoded per OpenSlide call (~64 MB RGBA)


class RegionSource(Protocol):
    """A :class:`~wsi_tiling.reader.SlideReader` or :class:`~wsi_tiling.reader.InMemorySlide`."""

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    def read_region(self, xy_level0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray: ...


def _resize(image: np.ndarray, size_out: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == tuple(size_out):
        return image
    shrinking = image.shape[0] >= size_out[1] and image.shape[1] >= size_out[0]
    return cv2.resize(image, size_out, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def read_scaled(slide: RegionSource, xy_level0: tuple[int, int], level: int, size_level: tuple[int, int],
                size_out: tuple[int, int]) -> np.ndarray:
    """Reads ``size_level`` pixels of ``level`` at ``xy_level0`` and resizes them to ``size_out``.

    Args:
        slide: the slide to read.
        xy_level0: top-left corner in level-0 pixels.
        level: pyramid level to read.
        size_level: (width, height) to read, in pixels of ``level``.
        size_out: (width, height) of the result; area interpolation when shrinking, cubic when
            enlarging (only with an explicit upsampling request).

    Returns:
        (height, width, 3) uint8 RGB of ``size_out``.
    """
    width, height = size_level
    out_w, out_h = size_out
    if width * height <= MAX_READ_PIXELS:
        return _resize(slide.read_region(xy_level0, level, size_level), size_out)
    downsample = slide.level_downsamples[level]
    rows_per_band = max(1, int(MAX_READ_PIXELS / width * out_h / height))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        y0, y1 = round(r0 * height / out_h), round(r1 * height / out_h)
        band_xy = (xy_level0[0], xy_level0[1] + round(y0 * downsample))
        out[r0:r1] = _resize(slide.read_region(band_xy, level, (width, y1 - y0)), (out_w, r1 - r0))
    return out


def read_thumbnail(slide: SlideReader | InMemorySlide, max_side_px: int, *, mpp: float | None = None,
                   slide_mpp: float | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide as one picture: at ``mpp`` µm/px, or coarser where that is needed to keep
    its longer edge within ``max_side_px``; never finer than level 0.

    Args:
        slide: the open slide.
        max_side_px: longest edge of the picture in pixels.
        mpp: µm/px asked for (default: only the size limit applies).
        slide_mpp: level-0 µm/px overriding the metadata (as given to the tiler).

    Returns:
        ((H, W, 3) uint8 RGB, level-0 pixels per picture pixel along (x, y)).

    Raises:
        MissingResolutionError: the slide's µm/px is unknown and ``slide_mpp`` is not given.
        SlideReadError: the slide cannot be decoded.
    """
    width, height = slide.dimensions
    downsample = max(1.0, max(width, height) / max_side_px)
    if mpp is not None:
        wanted = plan_read(Resolution(mpp, "mpp"), slide, slide_mpp=slide_mpp, allow_upsample=True)
        downsample = max(downsample, wanted.target_downsample)
    plan = plan_read(Resolution(downsample, "downsample"), slide, slide_mpp=slide_mpp)
    size_out = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    rgb = read_scaled(slide, (0, 0), plan.read_level, slide.level_dimensions[plan.read_level], size_out)
    return rgb, (width / size_out[0], height / size_out[1])
