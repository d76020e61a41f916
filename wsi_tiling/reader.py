"""A thin, context-managed slide reader over OpenSlide, and an in-memory twin for tests.

Only metadata and pixel regions: no tiling, no tissue logic, and never the raw OpenSlide handle.
Regions come back as (height, width, 3) uint8 RGB arrays, transparent pixels (outside a
scanner's scanned area) composited onto white glass. Pixels are decoded by OpenSlide straight into
a numpy buffer (``openslide.lowlevel._read_region``, present since openslide-python 1.0): the
public ``read_region`` goes through three PIL copies that cost as much as the JPEG decoding.
Levels of plain tiled TIFFs (Aperio, generic TIFF) are decoded by :mod:`wsi_tiling.tiff` instead,
pixel-identical to OpenSlide and about three times faster.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
import openslide
from openslide import lowlevel

from .errors import SlideOpenError, SlideReadError
from .tiff import FAST_VENDORS, TiffTiles

__all__ = ["SlideReader", "InMemorySlide", "DICOM_SUFFIX"]

DICOM_SUFFIX = ".dcm"
GLASS = 255  # value of pixels outside the scanned area
OPAQUE = 255


def _positive_float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number > 0 else None


def _resolve_path(path: Path) -> Path:
    """A DICOM slide is a folder of one file per level: OpenSlide opens any one of them."""
    if path.is_dir():
        files = sorted(path.glob(f"*{DICOM_SUFFIX}"))
        if not files:
            raise SlideOpenError(path, "is a folder without DICOM (.dcm) files, not a slide")
        return files[0]
    return path


def _premultiplied_to_rgb(argb: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied 0xAARRGGBB pixels (H, W) uint32 -> (H, W, 3) uint8 RGB on white.

    Premultiplied colour over white is ``colour + (255 - alpha)``, which cannot overflow.
    """
    channels = argb.view(np.uint8).reshape(*argb.shape, 4)
    if sys.byteorder == "little":  # bytes B, G, R, A
        rgb, alpha = cv2.cvtColor(channels, cv2.COLOR_BGRA2RGB), channels[..., 3]
    else:  # bytes A, R, G, B
        rgb, alpha = np.ascontiguousarray(channels[..., 1:]), channels[..., 0]
    if alpha.min() < OPAQUE:
        rgb += (OPAQUE - alpha)[..., None]
    return rgb


class SlideReader:
    """Opens a whole-slide image with OpenSlide; use as a context manager.

    Args:
        path: a slide file, or a folder holding a DICOM slide's ``.dcm`` files.

    Raises:
        SlideOpenError: the path does not exist or is not a slide OpenSlide can read.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        if not self._path.exists():
            raise SlideOpenError(self._path, "no such file or folder")
        try:
            self._slide = openslide.OpenSlide(_resolve_path(self._path))
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideOpenError(self._path, f"not a slide OpenSlide can open ({error})") from error
        self._tiff = self._open_tiff() if self.vendor in FAST_VENDORS else None

    def _open_tiff(self) -> TiffTiles | None:
        try:
            return TiffTiles(self._path, self._slide.level_dimensions)
        except (ValueError, OSError):  # tifffile cannot parse it: OpenSlide alone will do
            return None

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Releases the OpenSlide (and TIFF) handles."""
        self._slide.close()
        if self._tiff is not None:
            self._tiff.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._slide.dimensions

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px from the metadata (x axis), or None when absent."""
        return _positive_float(self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X))

    @property
    def objective_power(self) -> float | None:
        """Scanning objective magnification from the metadata, or None when absent."""
        return _positive_float(self._slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    @property
    def vendor(self) -> str:
        return self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"

    @property
    def reader_name(self) -> str:
        """The library that reads this slide: ``openslide``."""
        return "openslide"

    def native_tile_size(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the level's stored tiles, when the format records it."""
        props = self._slide.properties
        width = props.get(f"openslide.level[{level}].tile-width")
        height = props.get(f"openslide.level[{level}].tile-height")
        return (int(width), int(height)) if width and height else None

    def read_region(self, xy_level0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """Reads a region of one pyramid level.

        Args:
            xy_level0: top-left corner in level-0 pixels.
            level: pyramid level to read.
            size_px: (width, height) in pixels of that level.

        Returns:
            (height, width, 3) uint8 RGB; pixels outside the slide are white.

        Raises:
            SlideReadError: the region cannot be decoded (e.g. truncated file).
        """
        if self._tiff is not None and self._tiff.serves(level):
            downsample = self._slide.level_downsamples[level]
            xy_level = (round(xy_level0[0] / downsample), round(xy_level0[1] / downsample))
            try:
                return self._tiff.read(level, xy_level, size_px)
            except (ValueError, OSError, RuntimeError) as error:  # tifffile and imagecodecs errors
                raise SlideReadError(self._path, f"cannot decode level {level} at {xy_level0} ({error})") from error
        width, height = size_px
        argb = np.empty((height, width), np.uint32)
        pointer = argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
        try:
            lowlevel._read_region(self._slide._osr, pointer, int(xy_level0[0]), int(xy_level0[1]), level,
                                  width, height)
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideReadError(self._path, f"cannot decode level {level} at {xy_level0} ({error})") from error
        return _premultiplied_to_rgb(argb)


class InMemorySlide:
    """The same interface as :class:`SlideReader`, over arrays held in memory (for tests).

    Args:
        levels: (H, W, 3) uint8 images, level 0 first, each coarser than the previous.
        mpp: level-0 µm/px, or None.
        objective_power: scanning objective power, or None.
        path: a name used in error messages.
    """

    def __init__(self, levels: Sequence[np.ndarray], *, mpp: float | None = None,
                 objective_power: float | None = None, path: str | Path = "<memory>") -> None:
        self._levels = [np.asarray(level, np.uint8) for level in levels]
        self._path = Path(path)
        self.mpp = mpp
        self.objective_power = objective_power
        self.vendor = "memory"
        self.reader_name = "memory"

    def __enter__(self) -> InMemorySlide:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release; present for interface parity."""

    @property
    def path(self) -> Path:
        return self._path

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((level.shape[1], level.shape[0]) for level in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        width0 = self._levels[0].shape[1]
        return tuple(width0 / level.shape[1] for level in self._levels)

    def native_tile_size(self, level: int) -> tuple[int, int] | None:
        return None

    def read_region(self, xy_level0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """See :meth:`SlideReader.read_region`."""
        image = self._levels[level]
        downsample = self.level_downsamples[level]
        x, y = int(xy_level0[0] // downsample), int(xy_level0[1] // downsample)
        width, height = size_px
        out = np.full((height, width, 3), GLASS, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, image.shape[1]), min(y + height, image.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
        return out
