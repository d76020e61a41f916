"""Pictures of a slide's tile predictions: per-class heatmaps over the thumbnail, top-k galleries.

The heatmap is rasterised onto the thumbnail's own pixel grid (each tile paints the thumbnail
pixels its level-0 square covers; overlapping tiles average), so it lines up with the tissue
whatever the tiling resolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pathology.atomic import atomic_path

__all__ = ["save_gallery", "save_heatmap", "tile_value_map"]

HEATMAP_ALPHA = 0.5
HEATMAP_CMAP = "jet"
FIGURE_INCHES = 6.0
DPI = 120


def tile_value_map(xy_level0: np.ndarray, tile_size_level0: float, values: np.ndarray,
                   size_level0: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
    """Rasterises one value per tile onto a picture of the whole slide.

    Args:
        xy_level0: (N, 2) tile top-left corners, level-0 pixels.
        tile_size_level0: tile edge in level-0 pixels.
        values: (N,) one value per tile, e.g. a class probability.
        size_level0: slide (width, height) at level 0.
        size_px: (width, height) of the picture, e.g. the thumbnail's.

    Returns:
        (height, width) float map: the mean value of the tiles covering each pixel, NaN where none does.
    """
    width, height = size_px
    scale_x, scale_y = width / size_level0[0], height / size_level0[1]
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for (x, y), value in zip(np.asarray(xy_level0, np.float64), np.asarray(values, np.float64), strict=True):
        x0, y0 = round(x * scale_x), round(y * scale_y)
        x1 = max(x0 + 1, round((x + tile_size_level0) * scale_x))
        y1 = max(y0 + 1, round((y + tile_size_level0) * scale_y))
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def save_heatmap(path: str | Path, thumbnail: np.ndarray, value_map: np.ndarray, title: str) -> Path:
    """Writes the thumbnail with a semi-transparent probability overlay (0–1 colour scale) as PNG.

    Args:
        path: output ``.png``.
        thumbnail: (H, W, 3) uint8 RGB.
        value_map: (H, W) values in [0, 1], NaN where no tile was predicted (left uncoloured).
        title: figure title, e.g. ``slide_7: tumour``.
    """
    height, width = thumbnail.shape[:2]
    fig = Figure(figsize=(FIGURE_INCHES, FIGURE_INCHES * height / width + 0.6))
    ax = fig.subplots()
    ax.imshow(thumbnail)
    overlay = ax.imshow(np.ma.masked_invalid(value_map), cmap=HEATMAP_CMAP, vmin=0, vmax=1, alpha=HEATMAP_ALPHA)
    fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.02, label="probability")
    ax.set_title(title, fontsize="small")
    ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    return Path(path)


def save_gallery(path: str | Path, tiles: Sequence[np.ndarray], scores: Sequence[float], title: str,
                 columns: int = 4) -> Path:
    """Writes the given tiles in a grid, each captioned with its score, as PNG.

    Args:
        path: output ``.png``.
        tiles: (T, T, 3) uint8 RGB tiles, best first.
        scores: one score per tile.
        title: figure title.
        columns: tiles per row.
    """
    rows = max(1, -(-len(tiles) // columns))
    fig = Figure(figsize=(2 * columns, 2 * rows + 0.4))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile, score in zip(axes.flat, tiles, scores, strict=False):
        ax.imshow(tile)
        ax.set_title(f"{score:.3f}", fontsize="small")
    fig.suptitle(title, fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    return Path(path)
