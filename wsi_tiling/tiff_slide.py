"""The reader for slides OpenSlide cannot open, or opens without their metadata: OME-TIFF and plain TIFF.

QuPath and Bio-Formats export OME-TIFF (pyramid levels as SubIFDs, µm/px in the OME-XML), other
pipelines write plain tiled or stripped TIFFs. OpenSlide refuses stripped TIFFs and reads an
OME-TIFF as a one-level generic TIFF without its µm/px, so both are read here with tifffile: levels
from tifffile's series levels (SubIFDs or OME series), µm/px from ``PhysicalSizeX/Y`` and their
units, or from the resolution tags when their unit is a length, pixels by
:class:`~wsi_tiling.tiff.TiffTiles`. Only 8-bit RGB slides are read; anything else is refused
with its photometric and sample layout named.
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import tifffile

from .errors import SlideOpenError
from .tiff import TiffTiles, is_rgb

__all__ = ["TiffSlide", "is_ome_tiff", "READER_NAME"]

READER_NAME = "tifffile"
UM_PER_UNIT = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "Å": 1e-4,
               "pm": 1e-6}
OME_DEFAULT_UNIT = "µm"  # the OME schema's default for PhysicalSizeX/Y
UM_PER_RESOLUTION_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit inch, centimetre (1 = no unit)
ANISOTROPY_TOLERANCE = 0.01  # relative x/y µm/px difference accepted as square pixels
VENDOR_FLAGS = ("is_svs", "is_ndpi", "is_scn", "is_philips", "is_bif", "is_qpi")  # OpenSlide's formats


def is_ome_tiff(path: Path) -> bool:
    """Whether tifffile reads the file as an OME-TIFF (False for anything it cannot parse)."""
    try:
        with tifffile.TiffFile(path) as tiff:
            return tiff.is_ome
    except (tifffile.TiffFileError, OSError, ValueError):
        return False


def _square(path: Path, mpp_x: float | None, mpp_y: float | None) -> float | None:
    """The µm/px of square pixels; None when unknown; an error when x and y differ."""
    if mpp_x is None or mpp_y is None:
        return mpp_x or mpp_y
    if abs(mpp_x - mpp_y) > ANISOTROPY_TOLERANCE * mpp_x:
        raise SlideOpenError(path, f"pixels are not square ({mpp_x:.4g} x {mpp_y:.4g} µm); "
                             "only square-pixel slides can be tiled")
    return mpp_x


def _ome_scale(path: Path, xml: str) -> tuple[float | None, float | None]:
    """(µm/px, objective power) of the first image of the OME-XML; None where absent."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise SlideOpenError(path, f"unreadable OME-XML ({error})") from error
    pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
    mpp = [None, None]
    for i, axis in enumerate("XY"):
        if pixels is not None and (size := pixels.get(f"PhysicalSize{axis}")) is not None:
            unit = pixels.get(f"PhysicalSize{axis}Unit", OME_DEFAULT_UNIT)
            if unit not in UM_PER_UNIT:
                raise SlideOpenError(path, f"OME PhysicalSize{axis}Unit {unit!r} is not a length; "
                                     "give the µm/px with --slide-mpp")
            mpp[i] = float(size) * UM_PER_UNIT[unit] if float(size) > 0 else None
    objective = next((e for e in root.iter() if e.tag.endswith("}Objective")), None)
    power = objective.get("NominalMagnification") if objective is not None else None
    return _square(path, *mpp), float(power) if power else None


def _tag_mpp(path: Path, page: tifffile.TiffPage) -> float | None:
    """µm/px from the X/YResolution tags when ResolutionUnit is a length, else None."""
    tags = page.tags
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # the TIFF default: inch
    if unit not in UM_PER_RESOLUTION_UNIT or "XResolution" not in tags:
        return None
    mpp = []
    for name in ("XResolution", "YResolution"):
        numerator, denominator = tags[name].value if name in tags else tags["XResolution"].value
        mpp.append(UM_PER_RESOLUTION_UNIT[unit] * denominator / numerator if numerator > 0 else None)
    return _square(path, *mpp)


def _describe(page: tifffile.TiffPage) -> str:
    photometric = getattr(page.photometric, "name", str(page.photometric)).lower()
    return f"{page.samplesperpixel} x {page.bitspersample}-bit samples ({photometric})"


class TiffSlide:
    """An OME-TIFF or plain TIFF slide read with tifffile: a :class:`~wsi_tiling.reader.SlideBackend`
    (:class:`~wsi_tiling.reader.SlideReader` picks it when OpenSlide refuses a file or would drop its
    OME metadata).

    Args:
        path: the TIFF file.

    Raises:
        SlideOpenError: not a TIFF, not 8-bit RGB, or non-square pixels; the message names the file.
    """

    reader_name = READER_NAME

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        try:
            tiff = tifffile.TiffFile(self._path)
        except (tifffile.TiffFileError, OSError, ValueError) as error:
            raise SlideOpenError(self._path, f"not a slide OpenSlide can open, nor a TIFF ({error})") from error
        try:
            vendor = next((flag[3:] for flag in VENDOR_FLAGS if getattr(tiff, flag, False)), None)
            if vendor is not None:  # OpenSlide's own format, refused by it: broken, not merely plain
                raise SlideOpenError(self._path, f"a {vendor.upper()} file OpenSlide cannot open "
                                     "(truncated or corrupt?)")
            levels = [level.keyframe for level in tiff.series[0].levels]
            refused = next((page for page in levels if not is_rgb(page)), None)
            if refused is not None:
                raise SlideOpenError(self._path, f"a TIFF of {_describe(refused)}; only 8-bit RGB slides "
                                     "(bright-field) can be tiled")
            self._mpp, self._power = (_ome_scale(self._path, tiff.ome_metadata) if tiff.is_ome
                                      else (_tag_mpp(self._path, levels[0]), None))
        except (SlideOpenError, IndexError, ValueError, KeyError) as error:
            tiff.close()
            if isinstance(error, SlideOpenError):
                raise
            raise SlideOpenError(self._path, f"unreadable TIFF structure ({error!r})") from error
        self.vendor = "ome-tiff" if tiff.is_ome else "generic-tiff"
        self._levels = levels
        self._tiles = TiffTiles(tiff, dict(enumerate(levels)))

    def close(self) -> None:
        """Releases the file."""
        self._tiles.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((page.imagewidth, page.imagelength) for page in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Mean of the x and y ratios to level 0, as OpenSlide computes them."""
        (width0, height0), *_ = self.level_dimensions
        return tuple((width0 / w + height0 / h) / 2 for w, h in self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px from the OME-XML or the resolution tags, or None when absent."""
        return self._mpp

    @property
    def objective_power(self) -> float | None:
        """The OME objective's nominal magnification, or None."""
        return self._power

    def native_tile_size(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the level's stored tiles; None for stripped pages."""
        page = self._levels[level]
        return (page.tilewidth, page.tilelength) if page.is_tiled else None

    def read_region(self, xy_level0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """See :meth:`~wsi_tiling.reader.SlideReader.read_region`.

        Raises:
            SlideReadError: a tile or strip cannot be decoded.
        """
        return self._tiles.read_level0(self._path, level, xy_level0, self.level_downsamples[level], size_px)
