"""Quality-control pictures: the slide thumbnail with the tissue outline and the tile grid drawn on.

A glance at ``thumbnails/<slide_id>.png`` shows whether the tissue detector and the grid did
what the user expects, before any model sees a tile.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .errors import OutputError

__all__ = ["draw_qc", "write_png"]

OUTLINE_RGB = (0, 160, 0)  # tissue mask outline
GRID_RGB = (0, 0, 255)  # kept tiles
LINE_PX = 1


def draw_qc(thumbnail: np.ndarray, mask: np.ndarray, coords_level0: np.ndarray, footprint_level0: float,
            mask_downsample: tuple[float, float]) -> np.ndarray:
    """Draws the tissue outline and the kept tiles on a copy of the thumbnail.

    Args:
        thumbnail: (H, W, 3) uint8 RGB, the image the mask was computed on.
        mask: (H, W) bool tissue mask.
        coords_level0: (N, 2) level-0 top-left (x, y) of the kept tiles.
        footprint_level0: tile edge in level-0 pixels.
        mask_downsample: level-0 pixels per thumbnail pixel along (x, y).

    Returns:
        (H, W, 3) uint8 RGB picture.
    """
    picture = np.ascontiguousarray(thumbnail).copy()
    scale = np.asarray(mask_downsample, np.float64)
    start = np.floor(np.asarray(coords_level0, np.float64) / scale + 0.5).astype(int)
    end = np.floor((np.asarray(coords_level0, np.float64) + footprint_level0) / scale + 0.5).astype(int) - 1
    for (x0, y0), (x1, y1) in zip(start, end):
        cv2.rectangle(picture, (int(x0), int(y0)), (int(x1), int(y1)), GRID_RGB, LINE_PX)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(picture, contours, -1, OUTLINE_RGB, LINE_PX + 1)
    return picture


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Writes an RGB image as PNG under a temporary name, then renames it.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OutputError(path, "PNG encoding failed")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(encoded.tobytes())
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OutputError(path, f"cannot write thumbnail ({error.strerror or error})") from error
    return path
