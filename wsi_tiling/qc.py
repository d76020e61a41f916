"""Quality-control pictures: the slide thumbnail with the tissue outline and the tile grid drawn on,
one titled panel per tiling setting.

A glance at ``thumbnails/<slide_id>.png`` shows whether the tissue detector and the grid did
what the user expects, before any model sees a tile.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from .errors import InvalidParameterError, OutputError
from .grid import footprint_level0
from .reader import SlideReader
from .store import TileReader
from .tiler import detect_tissue, setting_name
from .tissue import TissueParams

__all__ = ["draw_qc", "draw_tiling_qc", "write_png"]

OUTLINE_RGB = (0, 160, 0)  # tissue mask outline
GRID_RGB = (0, 0, 255)  # kept tiles
TITLE_RGB = (0, 0, 0)
WARNING_RGB = (200, 0, 0)  # colour warnings above the panels
BACKGROUND = 255  # white around the titles and between panels
LINE_PX = 1
GAP_PX = 8  # between panels
TITLE_MARGIN_PX = 4
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALES = (0.3, 1.0)  # smallest, largest; titles shrink to fit the panel width


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


def _title_strips(titles: list[str], width: int, rgb: tuple[int, int, int] = TITLE_RGB) -> list[np.ndarray]:
    """Each title in one line on a white strip ``width`` wide; one font size, so equal heights."""
    longest = max(cv2.getTextSize(title, FONT, 1.0, 1)[0][0] for title in titles)
    scale = min(FONT_SCALES[1], max(FONT_SCALES[0], (width - 2 * TITLE_MARGIN_PX) / longest))
    (_, text_h), baseline = cv2.getTextSize(titles[0], FONT, scale, 1)
    height = text_h + baseline + 2 * TITLE_MARGIN_PX
    strips = []
    for title in titles:
        strip = np.full((height, width, 3), BACKGROUND, np.uint8)
        cv2.putText(strip, title, (TITLE_MARGIN_PX, TITLE_MARGIN_PX + text_h), FONT, scale, rgb, 1,
                    cv2.LINE_AA)
        strips.append(strip)
    return strips


def draw_tiling_qc(slide_path: str | Path, h5_paths: Sequence[str | Path]) -> np.ndarray:
    """One picture of a slide's tile stores: per store a panel with the thumbnail, the tissue outline
    and the kept tiles, titled with its setting and tile count.

    Panels sit side by side, or one above the other when the slide is wider than tall; colour
    warnings (:mod:`wsi_tiling.colour`) are written in red above them. The
    thumbnail and mask come from the tiler's own ``detect_tissue`` with the tissue settings and slide
    µm/px recorded in the stores (right after tiling, its remembered result), so the stores must
    agree on those (one ``wsi-tile`` run does).

    Args:
        slide_path: the slide the stores were made from.
        h5_paths: its stores (:func:`~wsi_tiling.tiler.tile_slide`), one panel each, in this order.

    Returns:
        (H, W, 3) uint8 RGB picture.

    Raises:
        InvalidParameterError: no store, or stores made with different tissue settings or µm/px.
        WsiTilingError: the slide cannot be opened or read.
    """
    stores = [TileReader(path) for path in h5_paths]
    infos = [store.info for store in stores]
    made_with = {(info.slide_mpp, json.dumps(info.request["tissue"], sort_keys=True)) for info in infos}
    if len(made_with) != 1:
        raise InvalidParameterError(slide_path, "a QC picture needs one or more tile stores made with the same "
                                    f"tissue settings and slide µm/px, got {len(made_with)} combinations")
    with SlideReader(slide_path) as slide:
        found = detect_tissue(slide, infos[0].slide_mpp, TissueParams(**infos[0].request["tissue"]))
    thumbnail, mask, scale = found.thumbnail, found.mask, found.scale
    titles = [f"{setting_name(i.resolution, i.tile_size, i.overlap)}: {len(s)} tiles" for s, i in zip(stores, infos)]
    strips = _title_strips(titles, thumbnail.shape[1])
    (title_h, width), height = strips[0].shape[:2], thumbnail.shape[0]
    across = width <= height
    step_y, step_x = (0, width + GAP_PX) if across else (title_h + height + GAP_PX, 0)
    canvas = np.full((title_h + height + step_y * (len(stores) - 1), width + step_x * (len(stores) - 1), 3),
                     BACKGROUND, np.uint8)
    for i, (strip, store) in enumerate(zip(strips, stores)):
        y, x = i * step_y, i * step_x
        footprint = footprint_level0(store.tile_size, store.info.target_downsample)
        canvas[y : y + title_h, x : x + width] = strip
        canvas[y + title_h : y + title_h + height, x : x + width] = draw_qc(thumbnail, mask, store.coords,
                                                                             footprint, scale)
    if found.colours.warnings:
        canvas = np.concatenate([*_title_strips(list(found.colours.warnings), canvas.shape[1], WARNING_RGB), canvas])
    return canvas


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
