"""Direct tile (or strip) decoding of TIFF pages: OpenSlide's fast path and the TIFF reader's pixels.

OpenSlide decodes a JPEG tile, caches it and paints it through cairo; for the formats whose pyramid
levels are simply tiled TIFF pages, tifffile + imagecodecs (libjpeg-turbo, libdeflate) decode the
same tiles about three times faster, and release the GIL so threads scale. Behind OpenSlide
(:meth:`TiffTiles.for_openslide_levels`) a level is served here only when exactly one tiled page
has its dimensions and its encoding is one we decode to RGB unchanged; everything else falls back
to OpenSlide. Behind :class:`~wsi_tiling.tiff_slide.TiffSlide` every level is served here, from
tiles or strips, in any compression imagecodecs decodes.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile

from .errors import SlideReadError

__all__ = ["TiffTiles", "FAST_VENDORS", "is_rgb"]

FAST_VENDORS = frozenset({"aperio", "generic-tiff"})
_CODECS = frozenset({1, 5, 7, 8, 32946})  # none, LZW, JPEG, deflate (Adobe and old)
_PHOTOMETRIC = frozenset({2, 6})  # RGB, YCbCr (JPEG-decoded to RGB)
_CONTIG = 1
GLASS = 255
CACHE_BYTES = 128 * 2**20  # decoded tiles kept: a single-level slide's thumbnail pass feeds its tiling


def is_rgb(page: tifffile.TiffPage) -> bool:
    """Whether tifffile decodes the page to (H, W, 3) uint8 RGB: 8-bit, 3 interleaved samples, stored
    as RGB or as JPEG-compressed YCbCr."""
    return (page.samplesperpixel == 3 and page.bitspersample == 8 and page.planarconfig == _CONTIG
            and int(page.photometric) in _PHOTOMETRIC and (int(page.photometric) == 2 or int(page.compression) == 7))


def _decodable(page: tifffile.TiffPage) -> bool:
    return page.is_tiled and is_rgb(page) and int(page.compression) in _CODECS


def _segment_size(page: tifffile.TiffPage) -> tuple[int, int]:
    """(width, height) of the page's tiles, or of its strips (full width, ``rowsperstrip`` rows)."""
    if page.is_tiled:
        return page.tilewidth, page.tilelength
    return page.imagewidth, min(page.rowsperstrip or page.imagelength, page.imagelength)


class TiffTiles:
    """Decodes regions of a TIFF's pyramid pages, tiled or stripped; thread-safe.

    Args:
        tiff: the open file; closed by :meth:`close`.
        pages: the page of each level served here (pages of (H, W, 3) uint8 RGB, see :func:`is_rgb`).
    """

    def __init__(self, tiff: tifffile.TiffFile, pages: dict[int, tifffile.TiffPage]) -> None:
        self._tiff = tiff
        self._lock = threading.Lock()
        self._pages = pages
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    @classmethod
    def for_openslide_levels(cls, path: Path, level_dimensions: tuple[tuple[int, int], ...]) -> TiffTiles:
        """The levels of a slide OpenSlide opened that are decoded here, pixel-identically.

        Args:
            path: the TIFF file.
            level_dimensions: OpenSlide's (width, height) of each level, to match pages to levels.

        Raises:
            ValueError, OSError: tifffile cannot parse the file.
        """
        tiff = tifffile.TiffFile(path)
        tiled = [page for page in tiff.pages if isinstance(page, tifffile.TiffPage) and page.is_tiled]
        pages = {}
        for level, size in enumerate(level_dimensions):
            same = [page for page in tiled if (page.imagewidth, page.imagelength) == tuple(size)]
            if len(same) == 1 and _decodable(same[0]):
                pages[level] = same[0]
        return cls(tiff, pages)

    def serves(self, level: int) -> bool:
        """Whether ``level`` is decoded here."""
        return level in self._pages

    def close(self) -> None:
        self._tiff.close()

    def read_level0(self, path: Path, level: int, xy_level0: tuple[int, int], downsample: float,
                    size_px: tuple[int, int]) -> np.ndarray:
        """:meth:`read` at a level-0 position (snapped to the level's pixel grid).

        Raises:
            SlideReadError: a tile cannot be decoded; the message names ``path``.
        """
        xy_level = (round(xy_level0[0] / downsample), round(xy_level0[1] / downsample))
        try:
            return self.read(level, xy_level, size_px)
        except (ValueError, OSError, RuntimeError) as error:  # tifffile and imagecodecs errors
            raise SlideReadError(path, f"cannot decode level {level} at {xy_level0} ({error})") from error

    def read(self, level: int, xy_level: tuple[int, int], size_px: tuple[int, int]) -> np.ndarray:
        """(height, width, 3) uint8 RGB of a level region at level pixel ``xy_level``; outside is white.

        Raises:
            ValueError, OSError: a tile cannot be decoded (tifffile/imagecodecs errors).
        """
        page = self._pages[level]
        x, y = xy_level
        width, height = size_px
        out = np.full((height, width, 3), GLASS, np.uint8)
        tile_w, tile_h = _segment_size(page)
        columns = math.ceil(page.imagewidth / tile_w)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, page.imagewidth), min(y + height, page.imagelength)
        if x1 <= x0 or y1 <= y0:
            return out
        indices = [r * columns + c for r in range(y0 // tile_h, (y1 - 1) // tile_h + 1)
                   for c in range(x0 // tile_w, (x1 - 1) // tile_w + 1)]
        for index, tile in self._tiles(level, indices):
            tx, ty = (index % columns) * tile_w, (index // columns) * tile_h
            sx0, sy0 = max(x0, tx), max(y0, ty)
            sx1, sy1 = min(x1, tx + tile.shape[1]), min(y1, ty + tile.shape[0])
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx]
        return out

    def _tiles(self, level: int, indices: list[int]) -> list[tuple[int, np.ndarray]]:
        """Decoded (index, (h, w, 3) tile) pairs, from the cache or the file; unwritten tiles are skipped."""
        page = self._pages[level]
        with self._lock:  # one file position and one cache: reads are serialised, decoding is not
            found = [(i, self._cache[(level, i)]) for i in indices if (level, i) in self._cache]
            missing = [i for i in indices if (level, i) not in self._cache]
            segments = list(self._tiff.filehandle.read_segments(
                [page.dataoffsets[i] for i in missing], [page.databytecounts[i] for i in missing],
                indices=missing, sort=True)) if missing else []
        decoded = []
        for data, index in segments:
            if not data:  # a tile the scanner never wrote: glass
                continue
            tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
            decoded.append((index, tile.reshape(tile.shape[-3:])))
        with self._lock:
            for index, tile in decoded:
                self._remember((level, index), tile)
        return found + decoded

    def _remember(self, key: tuple[int, int], tile: np.ndarray) -> None:
        """Keeps a decoded tile, dropping the least recently stored beyond :data:`CACHE_BYTES`."""
        if key in self._cache:
            return
        self._cache[key] = tile
        self._cached_bytes += tile.nbytes
        while self._cached_bytes > CACHE_BYTES:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes
