"""Pure grid functions: where tiles sit on a slide, aligned across magnifications.

Every grid starts at the level-0 origin and tile ``(col, row)`` sits at level-0
``round(col × step × downsample)``; so with the same tile size and no overlap, the 5x tile
``(c, r)`` covers exactly the four 10x tiles ``(2c .. 2c+1, 2r .. 2r+1)`` and a resolution study
compares the same tissue. Only whole tiles inside the slide are listed.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["grid_shape", "grid_indices", "grid_coords", "footprint_level0", "group_into_blocks"]

EDGE_EPSILON = 1e-9  # absorbs floating error when a tile ends exactly on the slide edge


def footprint_level0(tile_size: int, downsample: float) -> float:
    """Edge of one tile in level-0 pixels (``tile_size`` output pixels × ``downsample``)."""
    return tile_size * downsample


def grid_shape(size_level0: tuple[int, int], tile_size: int, overlap: int, downsample: float) -> tuple[int, int]:
    """Number of whole tiles (columns, rows) that fit in the slide.

    Args:
        size_level0: slide (width, height) in level-0 pixels.
        tile_size: tile edge in output pixels.
        overlap: pixels shared by neighbouring tiles, in output pixels (0 <= overlap < tile_size).
        downsample: level-0 pixels per output pixel.
    """
    footprint = footprint_level0(tile_size, downsample)
    step = (tile_size - overlap) * downsample

    def count(extent: int) -> int:
        return 0 if extent < footprint - EDGE_EPSILON else math.floor((extent - footprint) / step + EDGE_EPSILON) + 1

    return count(size_level0[0]), count(size_level0[1])


def grid_indices(shape: tuple[int, int]) -> np.ndarray:
    """All (col, row) indices of a grid of (columns, rows), row-major; (N, 2) int64."""
    cols, rows = shape
    row, col = np.divmod(np.arange(cols * rows, dtype=np.int64), max(cols, 1))
    return np.stack([col, row], axis=1)


def grid_coords(indices: np.ndarray, tile_size: int, overlap: int, downsample: float) -> np.ndarray:
    """Level-0 top-left (x, y) of tiles given by (col, row) indices; (N, 2) int64."""
    step = (tile_size - overlap) * downsample
    return np.floor(np.asarray(indices, np.float64) * step + 0.5).astype(np.int64)


def group_into_blocks(indices: np.ndarray, block_tiles: int) -> list[np.ndarray]:
    """Groups tiles into square blocks of ``block_tiles`` × ``block_tiles`` grid cells.

    Args:
        indices: (N, 2) (col, row) tile indices.
        block_tiles: block edge in tiles (>= 1).

    Returns:
        Positions into ``indices`` of each non-empty block, blocks in row-major order.
    """
    keys = np.asarray(indices, np.int64) // block_tiles
    if len(keys) == 0:
        return []
    order = np.lexsort((keys[:, 0], keys[:, 1]))
    sorted_keys = keys[order]
    breaks = np.flatnonzero(np.any(np.diff(sorted_keys, axis=0) != 0, axis=1)) + 1
    return np.split(order, breaks)
