"""Synthetic pyramidal Aperio-style slides with known physical content.

Tests, benchmarks and the demo need slides whose true µm/px, objective power and pattern sizes
are known exactly. OpenSlide reads a tiled TIFF as an Aperio slide when the first page's
description starts with ``Aperio Image Library``; every further tiled page is a pyramid level.
Pixels come from a *painter*, so slides far larger than memory are written tile by tile.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import tifffile

__all__ = ["Painter", "ArrayPainter", "StripesPainter", "BlankPainter", "write_slide"]

WHITE = 240  # typical bright-field glass background
BIGTIFF_BYTES = 2**31  # classic TIFF offsets are 32-bit


class Painter(Protocol):
    """Renders a region of a slide at a given downsample.

    Called with the region's top-left (x, y) and size in pixels *of the level being written*
    and that level's downsample from level 0; returns (height, width, 3) uint8 RGB.
    """

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray: ...


@dataclass(frozen=True)
class ArrayPainter:
    """Paints from an in-memory level-0 image; lower levels are area-averaged."""

    image: np.ndarray  # (H, W, 3) uint8, level 0

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        if downsample == 1:
            return self.image[y : y + height, x : x + width]
        x0, y0 = round(x * downsample), round(y * downsample)
        x1, y1 = round((x + width) * downsample), round((y + height) * downsample)
        region = self.image[y0:y1, x0:x1]
        return cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class BlankPainter:
    """Empty glass: no tissue anywhere."""

    value: int = WHITE

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        return np.full((height, width, 3), self.value, np.uint8)


@dataclass(frozen=True)
class StripesPainter:
    """Pink tissue rectangles holding dark vertical stripes of a known physical period.

    A stripe period of ``period_um`` µm must measure ``period_um / mpp`` pixels in a tile cut at
    ``mpp`` µm/px: the physical truth that the tiler is tested against.

    Attributes:
        mpp: level-0 µm/px of the slide being painted.
        period_um: stripe period in µm (half dark, half tissue).
        tissue_boxes_um: (x, y, width, height) tissue rectangles in level-0 µm.
    """

    mpp: float
    period_um: float = 8.0
    tissue_boxes_um: Sequence[tuple[float, float, float, float]] = field(default_factory=tuple)

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        um_per_px = self.mpp * downsample
        xs_um = (x + np.arange(width) + 0.5) * um_per_px  # pixel centres, level-0 µm
        ys_um = (y + np.arange(height) + 0.5) * um_per_px
        inside = np.zeros((height, width), bool)
        for bx, by, bw, bh in self.tissue_boxes_um:
            inside |= ((ys_um >= by) & (ys_um < by + bh))[:, None] & ((xs_um >= bx) & (xs_um < bx + bw))[None, :]
        dark = (np.floor(xs_um / (self.period_um / 2)) % 2 == 0)[None, :] & inside
        out = np.full((height, width, 3), WHITE, np.uint8)
        out[inside] = (230, 150, 200)  # eosin pink
        out[dark] = (70, 30, 120)  # haematoxylin purple
        return out


def _aperio_description(width: int, height: int, tile_px: int, mpp: float | None, objective_power: float | None) -> str:
    fields = [f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({tile_px}x{tile_px}) RGB"]
    if objective_power is not None:
        fields.append(f"AppMag = {objective_power:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:g}")
    return "|".join(fields)


def _tiles(painter: Painter, width: int, height: int, tile_px: int, downsample: float) -> Iterator[np.ndarray]:
    """Yields the level's tiles in row-major order, edge tiles padded to full size."""
    for y in range(0, height, tile_px):
        for x in range(0, width, tile_px):
            w, h = min(tile_px, width - x), min(tile_px, height - y)
            tile = np.full((tile_px, tile_px, 3), WHITE, np.uint8)
            tile[:h, :w] = painter(x, y, w, h, downsample)
            yield tile


def write_slide(
    path: str | Path,
    painter: Painter | np.ndarray,
    size_px: tuple[int, int] | None = None,
    *,
    mpp: float | None = 0.25,
    objective_power: float | None = 40,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_px: int = 256,
    compression: str = "jpeg",
) -> Path:
    """Writes a pyramidal Aperio-style TIFF that OpenSlide opens as vendor ``aperio``.

    Args:
        path: output file (``.svs`` or ``.tiff``).
        painter: a :class:`Painter`, or a level-0 (H, W, 3) uint8 image.
        size_px: level-0 (width, height); taken from the image when ``painter`` is an array.
        mpp: level-0 µm/px written as ``MPP``; None leaves it out (the missing-mpp case).
        objective_power: written as ``AppMag``; None leaves it out.
        downsamples: integer downsample of each pyramid level, starting with 1.
        tile_px: TIFF tile edge in pixels (a multiple of 16).
        compression: ``jpeg`` (like real scanners) or ``zlib`` (lossless, for exact tests).

    Returns:
        The path written.
    """
    path = Path(path)
    if isinstance(painter, np.ndarray):
        size_px = (painter.shape[1], painter.shape[0])
        painter = ArrayPainter(painter)
    if size_px is None:
        raise ValueError("size_px is required when painter is not an array")
    width, height = size_px
    if not downsamples or downsamples[0] != 1:
        raise ValueError(f"downsamples must start with 1, got {list(downsamples)}")
    description = _aperio_description(width, height, tile_px, mpp, objective_power)
    bigtiff = width * height * 3 > BIGTIFF_BYTES
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for i, downsample in enumerate(downsamples):
            w, h = max(1, width // downsample), max(1, height // downsample)
            tif.write(
                _tiles(painter, w, h, tile_px, downsample),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile_px, tile_px),
                photometric="rgb",
                compression=compression,
                description=description if i == 0 else None,
                metadata=None,
            )
    return path
