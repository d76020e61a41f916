"""``tile_slide``: one slide, one resolution, one TRIDENT-layout tile store.

slide → read plan (resolution.py) → tissue mask on a thumbnail (tissue.py) → aligned grid
(grid.py) → tiles read in large blocks of the chosen level, area-resized once per block, and
written as gzip chunks (store.py). Each needed region of the read level is decoded once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from . import __version__
from .colour import ColourCheck, YCbCrAsRgb, check_colours, ycbcr_to_rgb
from .errors import InvalidParameterError
from .grid import footprint_level0, grid_coords, grid_indices, grid_shape, group_into_blocks
from .reader import SlideReader
from .regions import MAX_READ_PIXELS, RegionSource, read_scaled, read_thumbnail
from .resolution import ReadPlan, Resolution, plan_read
from .store import EncodedTile, TileStoreWriter, compress_tile
from .tissue import TissueParams, tissue_fraction, tissue_mask

__all__ = ["TilingResult", "tile_slide", "detect_tissue", "setting_name", "store_path", "default_slide_id"]

log = logging.getLogger(__name__)

MAX_THUMBNAIL_SIDE = 8192  # tissue-mask thumbnail edge cap, pixels
HASH_CHARS = 16
BLOCKS_PER_THREAD = 4  # enough blocks that threads finish together


@dataclass(frozen=True)
class TilingResult:
    """Outcome of tiling one slide at one setting.

    Attributes:
        slide_id: name of the store (``<slide_id>.h5``).
        slide_path: the slide read.
        status: ``ok``, ``no-tissue`` (zero tiles kept) or ``skipped`` (finished store found).
        n_tiles: tiles in the store.
        h5_path: the store.
        seconds: wall time spent.
        plan: the read plan (None when skipped).
        reader: the library that read the slide, ``openslide`` or ``tifffile`` ("" when skipped).
        warnings: colour warnings (see :mod:`wsi_tiling.colour`), one line each.
    """

    slide_id: str
    slide_path: Path
    status: str
    n_tiles: int
    h5_path: Path
    seconds: float
    plan: ReadPlan | None = None
    reader: str = ""
    warnings: tuple[str, ...] = ()


def setting_name(resolution: Resolution, tile_size: int, overlap: int) -> str:
    """TRIDENT's folder name for a setting, e.g. ``10x_256px_0px_overlap``."""
    return f"{resolution}_{tile_size}px_{overlap}px_overlap"


def store_path(out_dir: str | Path, resolution: Resolution, tile_size: int, overlap: int, slide_id: str) -> Path:
    """``out_dir/<setting>/patches/<slide_id>.h5``."""
    return Path(out_dir) / setting_name(resolution, tile_size, overlap) / "patches" / f"{slide_id}.h5"


OME_SUFFIX = ".ome"  # the inner extension of .ome.tif / .ome.tiff


def default_slide_id(slide_path: str | Path) -> str:
    """The file name without its extension (``.ome.tif`` counts as one; a DICOM folder's own name)."""
    path = Path(slide_path)
    if path.is_dir():
        return path.name
    return path.stem[: -len(OME_SUFFIX)] if path.stem.lower().endswith(OME_SUFFIX) else path.stem


def _check_params(slide_path: Path, tile_size: int, overlap: int, min_tissue: float) -> None:
    if tile_size <= 0:
        raise InvalidParameterError(slide_path, f"tile size must be a positive number of pixels, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise InvalidParameterError(slide_path, f"overlap must be in [0, tile size {tile_size}), got {overlap}")
    if not 0 <= min_tissue <= 1:
        raise InvalidParameterError(slide_path, f"min tissue fraction must be in [0, 1], got {min_tissue}")


def _params_hash(slide_path: Path, request: dict[str, Any]) -> str:
    """Hash of everything that decides a store's content: the request and the slide file's identity."""
    stat = slide_path.stat() if slide_path.is_file() else None
    identity = {"slide": slide_path.name, "bytes": stat.st_size if stat else None, **request}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _finished_store(h5_path: Path, params_hash: str) -> int | None:
    """Tile count of a complete store made with the same parameters, else None."""
    if not h5_path.is_file():
        return None
    try:
        with h5py.File(h5_path, "r") as file:
            same = file["coords"].attrs.get("params_hash") == params_hash
            return len(file["coords"]) if same else None
    except (OSError, KeyError):
        return None


@dataclass(frozen=True)
class TissueMap:
    """A slide's tissue detection: the thumbnail, its mask and what its colours say.

    Attributes:
        thumbnail: (H, W, 3) uint8 RGB at the mask's µm/px (converted when YCbCr was read as RGB).
        mask: (H, W) bool, True on tissue.
        scale: level-0 pixels per thumbnail pixel (x, y).
        colours: the colour check of the thumbnail as read.
    """

    thumbnail: np.ndarray
    mask: np.ndarray
    scale: tuple[float, float]
    colours: ColourCheck


_last_tissue: dict[tuple[Any, ...], TissueMap] = {}  # one slide: see detect_tissue
_last_tissue_lock = threading.Lock()


def detect_tissue(slide: SlideReader, slide_mpp: float, params: TissueParams) -> TissueMap:
    """The slide's thumbnail at ``params.mask_mpp``, its tissue mask and its colour check.

    A thumbnail whose glass is YCbCr read as RGB is converted before the mask is made. The last
    slide's result is remembered (keyed by the file's path, size and modification time, the µm/px
    and the settings), so the several resolutions of one slide and its QC picture decode the
    thumbnail once: on a single-level slide that is a decode of the whole slide. The arrays are
    shared, hence read-only.

    Args:
        slide: the open slide.
        slide_mpp: level-0 µm/px (the read plan's).
        params: tissue detection settings.
    """
    path = Path(slide.path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, slide_mpp, params)
    with _last_tissue_lock:
        if key in _last_tissue:
            return _last_tissue[key]
    thumbnail, scale = read_thumbnail(slide, MAX_THUMBNAIL_SIDE, mpp=params.mask_mpp, slide_mpp=slide_mpp)
    mask = tissue_mask(thumbnail, slide_mpp * scale[0], params)
    colours = check_colours(thumbnail, mask)
    for warning in colours.warnings:
        log.warning("%s: %s", slide.path, warning)
    if colours.ycbcr_as_rgb:
        thumbnail = ycbcr_to_rgb(thumbnail)
        mask = tissue_mask(thumbnail, slide_mpp * scale[0], params)
    thumbnail.setflags(write=False)
    mask.setflags(write=False)
    found = TissueMap(thumbnail, mask, scale, colours)
    with _last_tissue_lock:
        _last_tissue.clear()
        _last_tissue[key] = found
    return found


def _block_tiles(tile_size: int, overlap: int, resize_factor: float, n_tiles: int, threads: int) -> int:
    """Block edge in tiles: one block read stays within MAX_READ_PIXELS, and with several threads
    there are at least BLOCKS_PER_THREAD blocks per thread, so that no thread is left with most of
    the slide (native tiles on block borders come from the reader's cache, not a second decode)."""
    edge = math.sqrt(MAX_READ_PIXELS) / resize_factor
    memory_edge = max(1, int((edge - tile_size) // (tile_size - overlap)) + 1)
    if threads <= 1:
        return memory_edge
    return max(1, min(memory_edge, math.isqrt(n_tiles // (BLOCKS_PER_THREAD * threads))))


def _read_block(slide: RegionSource, plan: ReadPlan, indices: np.ndarray, tile_size: int,
                overlap: int) -> list[EncodedTile]:
    """Reads the bounding region of a block's tiles once, resizes it once, cuts and compresses tiles."""
    step = tile_size - overlap
    first, last = indices.min(axis=0), indices.max(axis=0)
    size_out = tuple(int(v) for v in (last - first) * step + tile_size)
    size_level = tuple(max(1, round(v * plan.resize_factor)) for v in size_out)
    xy_level0 = grid_coords(first[None], tile_size, overlap, plan.target_downsample)[0]
    region = read_scaled(slide, (int(xy_level0[0]), int(xy_level0[1])), plan.read_level, size_level, size_out)
    offsets = (indices - first) * step
    return [compress_tile(region[y : y + tile_size, x : x + tile_size]) for x, y in offsets]


def _windowed_map(function: Callable[[np.ndarray], list[EncodedTile]], items: list[np.ndarray],
                  threads: int) -> Iterator[list[EncodedTile]]:
    """``map`` over a thread pool keeping at most 2 × threads results in flight (bounded memory)."""
    if threads <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: list[Future[list[EncodedTile]]] = []
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * threads:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _write_tiles(slide: RegionSource, plan: ReadPlan, indices: np.ndarray, tile_size: int, overlap: int,
                 writer: TileStoreWriter, threads: int, progress: bool) -> None:
    edge = _block_tiles(tile_size, overlap, plan.resize_factor, len(indices), threads)
    blocks = group_into_blocks(indices, edge)

    def read(block: np.ndarray) -> list[EncodedTile]:
        return _read_block(slide, plan, indices[block], tile_size, overlap)

    hidden = None if progress else True  # tqdm's disable: None = shown only on a terminal
    with tqdm(total=len(indices), unit="tile", desc=writer.path.stem, leave=False, disable=hidden) as bar:
        for block, chunks in zip(blocks, _windowed_map(read, blocks, threads)):
            for position, tile in zip(block, chunks):
                writer.write_encoded(int(position), tile)
            bar.update(len(block))


def _store_attrs(slide: SlideReader, plan: ReadPlan, slide_id: str, tile_size: int, overlap: int,
                 request: dict[str, Any], params_hash: str, colours: ColourCheck) -> dict[str, Any]:
    """CLAM's, TRIDENT's and our own attributes of ``coords``."""
    width, height = slide.dimensions
    level_dim = slide.level_dimensions[plan.read_level]
    return {
        # CLAM
        "patch_size": tile_size, "patch_level": plan.read_level, "name": slide_id,
        "downsample": (plan.level_downsample, plan.level_downsample),
        "level_dim": level_dim, "downsampled_level_dim": level_dim,
        # TRIDENT
        "patch_size_level0": round(footprint_level0(tile_size, plan.target_downsample)),
        "level0_magnification": plan.slide_power, "target_magnification": plan.target_power,
        "overlap": overlap, "level0_width": width, "level0_height": height,
        # what was asked and what was delivered
        "target_mpp": plan.target_mpp, "slide_mpp": plan.slide_mpp, "mpp_source": plan.mpp_source,
        "read_level": plan.read_level, "resize_factor": plan.resize_factor,
        "target_downsample": plan.target_downsample,
        "patch_size_read_level": max(1, round(tile_size * plan.resize_factor)),
        "step_level0": (tile_size - overlap) * plan.target_downsample,
        "resolution": request["resolution"], "reader": slide.reader_name, "colour": colours.colour,
        "colour_warnings": "; ".join(colours.warnings),
        "slide_path": str(Path(slide.path).resolve()), "params_hash": params_hash,
        "params": json.dumps(request, sort_keys=True, default=str), "wsi_tiling_version": __version__,
    }


def tile_slide(slide_path: str | Path, out_dir: str | Path, resolution: Resolution, tile_size: int, *,
               overlap: int = 0, min_tissue: float = 0.5, slide_mpp: float | None = None,
               slide_id: str | None = None, save_tiles: bool = False, resume: bool = False,
               allow_upsample: bool = False, tissue: TissueParams = TissueParams(), threads: int = 1,
               progress: bool = False) -> TilingResult:
    """Tiles one slide at one resolution into ``out_dir/<setting>/patches/<slide_id>.h5``.

    Args:
        slide_path: the slide (a file, or a DICOM slide's folder).
        out_dir: root of the output; the setting folder is created under it.
        resolution: resolution of the tiles.
        tile_size: tile edge in output pixels.
        overlap: pixels shared by neighbouring tiles, in output pixels.
        min_tissue: keep tiles whose tissue fraction is at least this (0 keeps every tile).
        slide_mpp: level-0 µm/px overriding the metadata.
        slide_id: store name (default: the file name without extension).
        save_tiles: also store the pixels (dataset ``tiles``); else coordinates only.
        resume: return ``skipped`` when a complete store with the same parameters exists.
        allow_upsample: permit a resolution finer than the slide's own.
        tissue: tissue detection settings.
        threads: threads reading and compressing blocks of this slide.
        progress: show a progress bar over this slide's tiles (on a terminal).

    Returns:
        The result; ``no-tissue`` when no tile was kept (the store then has zero rows).

    Raises:
        WsiTilingError: a subclass naming the slide or the output (cannot open or decode the
            slide, missing or unavailable resolution, invalid parameter, unwritable output).
    """
    start = time.perf_counter()
    slide_path = Path(slide_path)
    _check_params(slide_path, tile_size, overlap, min_tissue)
    slide_id = slide_id or default_slide_id(slide_path)
    h5_path = store_path(out_dir, resolution, tile_size, overlap, slide_id)
    request = {"resolution": str(resolution), "tile_size": tile_size, "overlap": overlap,
               "min_tissue": min_tissue, "slide_mpp": slide_mpp, "save_tiles": save_tiles,
               "allow_upsample": allow_upsample, "tissue": tissue.to_dict()}
    params_hash = _params_hash(slide_path, request)
    if resume and (done := _finished_store(h5_path, params_hash)) is not None:
        return TilingResult(slide_id, slide_path, "skipped", done, h5_path, time.perf_counter() - start)
    with SlideReader(slide_path) as slide:
        plan = plan_read(resolution, slide, slide_mpp=slide_mpp, allow_upsample=allow_upsample)
        found = detect_tissue(slide, plan.slide_mpp, tissue)
        indices = grid_indices(grid_shape(slide.dimensions, tile_size, overlap, plan.target_downsample))
        coords = grid_coords(indices, tile_size, overlap, plan.target_downsample)
        footprint = footprint_level0(tile_size, plan.target_downsample)
        fraction = tissue_fraction(found.mask, found.scale, coords, footprint)
        keep = fraction >= min_tissue
        attrs = _store_attrs(slide, plan, slide_id, tile_size, overlap, request, params_hash, found.colours)
        source = YCbCrAsRgb(slide) if found.colours.ycbcr_as_rgb else slide
        with TileStoreWriter(h5_path, coords[keep], fraction[keep], attrs,
                             tile_size if save_tiles else None) as writer:
            if save_tiles:
                _write_tiles(source, plan, indices[keep], tile_size, overlap, writer, threads, progress)
    n_tiles = int(keep.sum())
    log.info("%s: %d tiles at %s (level %d, x%.3f)", slide_path, n_tiles, resolution, plan.read_level,
             plan.resize_factor)
    return TilingResult(slide_id, slide_path, "ok" if n_tiles else "no-tissue", n_tiles, h5_path,
                        time.perf_counter() - start, plan, slide.reader_name, found.colours.warnings)
