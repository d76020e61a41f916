"""Colours that cannot be right: a background that is not glass, a slide that is all tissue, YCbCr read as RGB.

Bright-field glass is bright and grey. Some converters store YCbCr JPEG frames while declaring RGB
(the DICOM copy of CMU-1-Small-Region is one): OpenSlide passes the YCbCr values through, glass
reads about (243, 127, 128), everything counts as tissue and the tiles are false colour. The check
looks at the thumbnail the tissue mask is made from: its background (the most common colour of its
brighter half) and its tissue fraction. YCbCr glass (bright Y, Cb and Cr at their 128 midpoint)
is converted back to RGB, always: no real slide has salmon glass. Pure functions and one adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .regions import RegionSource

__all__ = ["ColourCheck", "check_colours", "ycbcr_to_rgb", "YCbCrAsRgb", "AS_READ", "YCBCR_TO_RGB"]

AS_READ = "as-read"
YCBCR_TO_RGB = "ycbcr-to-rgb"
BIN = 8  # colour histogram bin width (0-255 per channel) for the background's mode
MIN_GLASS = 180  # every channel of bright-field glass is at least this
MAX_GLASS_SPREAD = 30  # max - min channel of near-neutral glass
MIN_YCBCR_LUMA = 200  # Y of glass
CHROMA_MIDPOINT = 128  # Cb and Cr of anything grey
MAX_CHROMA_OFFSET = 12  # |Cb - 128| and |Cr - 128| of grey glass
MAX_TISSUE_FRACTION = 0.95  # above this the detector saw no glass at all
PADDING = 255  # what readers paint outside the scanned area


@dataclass(frozen=True)
class ColourCheck:
    """What the thumbnail says about the slide's colours.

    Attributes:
        background_rgb: the background colour as read (R, G, B).
        tissue_fraction: share of the thumbnail the tissue mask covers, as read.
        ycbcr_as_rgb: the background is YCbCr glass read as RGB.
        warnings: one line each, empty when the colours look right.
    """

    background_rgb: tuple[int, int, int]
    tissue_fraction: float
    ycbcr_as_rgb: bool
    warnings: tuple[str, ...]

    @property
    def colour(self) -> str:
        """What the tiler does with the pixels: ``as-read`` or ``ycbcr-to-rgb``."""
        return YCBCR_TO_RGB if self.ycbcr_as_rgb else AS_READ


def background_colour(thumbnail: np.ndarray) -> tuple[int, int, int]:
    """The most common colour (in :data:`BIN`-wide bins) of the brighter half of an (H, W, 3) uint8
    image, as the median (R, G, B) of that bin's pixels."""
    pixels = thumbnail.reshape(-1, 3)
    brightness = pixels.astype(np.int32).sum(axis=1)
    bright = pixels[brightness >= np.median(brightness)]
    bins = (bright // BIN).astype(np.int32)
    keys = (bins[:, 0] * 256 + bins[:, 1]) * 256 + bins[:, 2]
    mode = np.bincount(keys).argmax()
    return tuple(int(v) for v in np.median(bright[keys == mode], axis=0))


def check_colours(thumbnail: np.ndarray, mask: np.ndarray) -> ColourCheck:
    """Checks a slide's thumbnail for glass that is not bright and grey, and for all-tissue masks.

    Args:
        thumbnail: (H, W, 3) uint8 RGB thumbnail, as read.
        mask: (H, W) bool tissue mask of that thumbnail.

    Returns:
        The check; ``ycbcr_as_rgb`` when the background is bright YCbCr glass.
    """
    red, green, blue = background_colour(thumbnail)
    fraction = float(mask.mean()) if mask.size else 0.0
    ycbcr = (red >= MIN_YCBCR_LUMA and abs(green - CHROMA_MIDPOINT) <= MAX_CHROMA_OFFSET
             and abs(blue - CHROMA_MIDPOINT) <= MAX_CHROMA_OFFSET)
    warnings = []
    if ycbcr:
        warnings.append(f"background ({red}, {green}, {blue}) is YCbCr glass read as RGB; converted to RGB")
    elif min(red, green, blue) < MIN_GLASS or max(red, green, blue) - min(red, green, blue) > MAX_GLASS_SPREAD:
        warnings.append(f"background ({red}, {green}, {blue}) is not bright grey glass: fluorescence, "
                        "no glass in view, or wrong colours")
    if fraction > MAX_TISSUE_FRACTION:
        warnings.append(f"{fraction:.0%} of the slide counts as tissue (colours as read)")
    return ColourCheck((red, green, blue), fraction, ycbcr, tuple(warnings))


def ycbcr_to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 YCbCr (full-range BT.601, as in JPEG) held in the R, G, B channels -> RGB.

    Pure white stays white: it is the reader's padding outside the scanned area, not YCbCr.
    """
    rgb = cv2.cvtColor(np.ascontiguousarray(image[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
    rgb[(image == PADDING).all(axis=-1)] = PADDING
    return rgb


class YCbCrAsRgb:
    """A region source whose regions are converted from YCbCr read as RGB (a :class:`RegionSource`).

    Args:
        slide: the slide as read.
    """

    def __init__(self, slide: RegionSource) -> None:
        self._slide = slide

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._slide.level_downsamples

    def read_region(self, xy_level0: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """The slide's region, converted; see :meth:`~wsi_tiling.reader.SlideReader.read_region`."""
        return ycbcr_to_rgb(self._slide.read_region(xy_level0, level, size_px))
