"""A thin, context-managed slide reader over OpenSlide (or tifffile), and an in-memory twin for tests.

Only metadata and pixel regions: no tiling, no tissue logic, and never the raw OpenSlide handle.
OME-TIFFs and the TIFFs OpenSlide refuses are read by :class:`~wsi_tiling.tiff_slide.TiffSlide`
behind the same interface.
Regions come back as (height, width, 3) uint8 RGB arrays, transparent pixels (outside a
scanner's scanned area) composited onto white glass. Pixels are decoded by OpenSlide straight into
a numpy buffer (``openslide.lowlevel._read_region``, present since openslide-python 1.0): the
public ``read_region`` goes through three PIL copies that cost as much as the JPEG decoding. Should
a release rename or re-sign it, reads fall back to the public ``read_region`` with one warning.
Levels of plain tiled TIFFs (Aperio, generic TIFF) are decoded by :mod:`wsi_tiling.tiff` instead,
pixel-identical to OpenSlide and about three times faster.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import cv2
import numpy as np
import openslide
from openslide import lowlevel

from .errors import SlideOpenError, SlideReadError
from .tiff import FAST_VENDORS, TiffTiles
from .tiff_slide import TiffSlide, is_ome_tiff

__all__ = ["SlideReader", "SlideBackend", "OpenSlideBackend", "InMemorySlide", "DICOM_SUFFIX"]

log = logging.getLogger(__name__)

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


class SlideBackend(Protocol):
    """What :class:`SlideReader` delegates to: OpenSlide, or tifffile for the TIFFs OpenSlide cannot read."""

    reader_name: str

    @property
    def dimensions(self) -> tuple[int, int]: ...
    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...
    @property
    def level_downsamples(self) -> tuple[float, ...]: ...
    @property
    def mpp(self) -> float | None: ...
    @property
    def objective_power(self) -> float | None: ...
    @property
    def vendor(self) -> str: ...
    def native_tile_size(self, level: int) -> tuple[int, int] | None: ...
    def read_region(self, xy_level0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray: ...
    def close(self) -> None: ...


def _read_argb_private(slide: openslide.OpenSlide, xy_level0: tuple[int, int], level: int,
                       size_px: tuple[int, int]) -> np.ndarray:
    """OpenSlide's pixels straight into a numpy buffer (private API): (H, W) premultiplied ARGB uint32."""
    width, height = size_px
    argb = np.empty((height, width), np.uint32)
    pointer = argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
    lowlevel._read_region(slide._osr, pointer, int(xy_level0[0]), int(xy_level0[1]), level, width, height)
    return argb


def _read_rgb_public(slide: openslide.OpenSlide, xy_level0: tuple[int, int], level: int,
                     size_px: tuple[int, int]) -> np.ndarray:
    """The public ``read_region`` (non-premultiplied RGBA PIL image) composited onto white glass."""
    rgba = np.asarray(slide.read_region((int(xy_level0[0]), int(xy_level0[1])), level, tuple(size_px)))
    rgb, alpha = rgba[..., :3].astype(np.uint16), rgba[..., 3:].astype(np.uint16)
    return ((rgb * alpha + GLASS * (OPAQUE - alpha) + OPAQUE // 2) // OPAQUE).astype(np.uint8)


class _PrivateApi:
    """Whether OpenSlide's private fast read still works in this process (checked on first use)."""

    usable = True


def _warn_private_api(error: Exception) -> None:
    if _PrivateApi.usable:
        _PrivateApi.usable = False
        log.warning("openslide.lowlevel._read_region is missing or changed (%s); reading through the "
                    "public read_region instead (slower)", error)


class OpenSlideBackend:
    """A slide opened by OpenSlide; tiled TIFF levels decoded by :mod:`wsi_tiling.tiff` when possible.

    Args:
        path: the path the user gave (named in errors).
        file: the file OpenSlide opens (a DICOM folder's first ``.dcm``).

    Raises:
        openslide.OpenSlideError, OSError: OpenSlide cannot open the file.
    """

    reader_name = "openslide"

    def __init__(self, path: Path, file: Path) -> None:
        self._path = path
        self._slide = openslide.OpenSlide(file)
        self._tiff = self._open_tiff() if self.vendor in FAST_VENDORS else None

    def _open_tiff(self) -> TiffTiles | None:
        try:
            return TiffTiles.for_openslide_levels(self._path, self._slide.level_dimensions)
        except (ValueError, OSError):  # tifffile cannot parse it: OpenSlide alone will do
            return None

    def close(self) -> None:
        """Releases the OpenSlide (and TIFF) handles."""
        self._slide.close()
        if self._tiff is not None:
            self._tiff.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._slide.dimensions

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    @property
    def mpp(self) -> float | None:
        return _positive_float(self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X))

    @property
    def objective_power(self) -> float | None:
        return _positive_float(self._slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    @property
    def vendor(self) -> str:
        return self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"

    def native_tile_size(self, level: int) -> tuple[int, int] | None:
        props = self._slide.properties
        width = props.get(f"openslide.level[{level}].tile-width")
        height = props.get(f"openslide.level[{level}].tile-height")
        return (int(width), int(height)) if width and height else None

    def read_region(self, xy_level0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """See :meth:`SlideReader.read_region`; the private fast read, else the public one (warned once)."""
        if self._tiff is not None and self._tiff.serves(level):
            return self._tiff.read_level0(self._path, level, xy_level0, self._slide.level_downsamples[level], size_px)
        try:
            if _PrivateApi.usable:
                try:
                    return _premultiplied_to_rgb(_read_argb_private(self._slide, xy_level0, level, size_px))
                except (AttributeError, TypeError, ctypes.ArgumentError) as error:  # renamed or re-signed
                    _warn_private_api(error)
            return _read_rgb_public(self._slide, xy_level0, level, size_px)
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideReadError(self._path, f"cannot decode level {level} at {xy_level0} ({error})") from error


TIFF_FALLBACK_FORMATS = (None, "generic-tiff")  # OpenSlide's detect_format results tifffile may read


def _open_backend(path: Path) -> SlideBackend:
    """OpenSlide for what it reads with its metadata; tifffile for OME-TIFF and the TIFFs it refuses.

    A file OpenSlide recognises as a vendor format (e.g. a truncated ``.svs``) but cannot open is
    OpenSlide's error: tifffile would open its first page and lose the vendor's metadata.
    """
    file = _resolve_path(path)
    detected = openslide.OpenSlide.detect_format(file)
    if detected == "generic-tiff" and is_ome_tiff(file):
        return TiffSlide(file)  # OpenSlide would read one level and no µm/px
    try:
        return OpenSlideBackend(path, file)
    except (openslide.OpenSlideError, OSError) as error:
        if detected not in TIFF_FALLBACK_FORMATS:
            raise SlideOpenError(path, f"not a slide OpenSlide can open ({error})") from error
        refused = error
    try:
        return TiffSlide(file)
    except SlideOpenError as error:
        raise SlideOpenError(path, f"{error.reason}; OpenSlide: {refused}") from error


class SlideReader:
    """Opens a whole-slide image; use as a context manager.

    OpenSlide reads what it can; OME-TIFFs and the TIFFs OpenSlide refuses are read with tifffile
    (:class:`~wsi_tiling.tiff_slide.TiffSlide`); :attr:`reader_name` says which.

    Args:
        path: a slide file, or a folder holding a DICOM slide's ``.dcm`` files.

    Raises:
        SlideOpenError: the path does not exist or no reader can open it.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        if not self._path.exists():
            raise SlideOpenError(self._path, "no such file or folder")
        self._backend = _open_backend(self._path)

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Releases the file handles."""
        self._backend.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def reader_name(self) -> str:
        """The library reading this slide: ``openslide`` or ``tifffile``."""
        return self._backend.reader_name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._backend.dimensions

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._backend.level_downsamples

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px from the metadata (x axis), or None when absent."""
        return self._backend.mpp

    @property
    def objective_power(self) -> float | None:
        """Scanning objective magnification from the metadata, or None when absent."""
        return self._backend.objective_power

    @property
    def vendor(self) -> str:
        return self._backend.vendor

    def native_tile_size(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the level's stored tiles, when the format records it."""
        return self._backend.native_tile_size(level)

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
        return self._backend.read_region(xy_level0, level, size_px)


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
