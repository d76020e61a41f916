"""Typed errors of the tiling package; each names the file it is about and how to fix it.

The CLI catches :class:`WsiTilingError`, writes its one-line message to the run manifest and
carries on with the other slides; library code only raises.
"""
from __future__ import annotations

from pathlib import Path

__all__ = [
    "WsiTilingError",
    "SlideOpenError",
    "SlideReadError",
    "MissingResolutionError",
    "ResolutionUnavailableError",
    "InvalidParameterError",
    "OutputError",
]


class WsiTilingError(Exception):
    """Base of every error raised by ``wsi_tiling``.

    Args:
        path: the slide, folder or output file the error is about.
        reason: what is wrong and, where there is one, the option that fixes it (one line).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SlideOpenError(WsiTilingError):
    """The file does not exist or OpenSlide cannot open it (not a slide, unsupported, corrupt)."""


class SlideReadError(WsiTilingError):
    """The slide opened but a region could not be decoded (e.g. a truncated file)."""


class MissingResolutionError(WsiTilingError):
    """The slide records no µm/px or objective power and the user gave none."""


class ResolutionUnavailableError(WsiTilingError):
    """The requested resolution is finer than the slide's own, or names a level it lacks."""


class InvalidParameterError(WsiTilingError, ValueError):
    """A tiling parameter is out of range (tile size, overlap, tissue fraction, ...)."""


class OutputError(WsiTilingError):
    """The output folder cannot be created or written."""
