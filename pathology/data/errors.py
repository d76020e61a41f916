"""Typed errors of the tile-data layer; each message names the offending file and what is wrong."""
from __future__ import annotations

__all__ = ["TileDataError", "LabelError", "AnnotationError", "CorruptTileError", "SplitError", "EmptyTileSetError",
           "TilingMismatchError"]


class TileDataError(ValueError):
    """Base error of ``pathology.data``: bad tiles, labels, annotations or splits."""


class LabelError(TileDataError):
    """A label table is unreadable, misses columns, or names slides or classes that do not exist."""


class AnnotationError(TileDataError):
    """A GeoJSON annotation file is not valid QuPath-style GeoJSON."""


class CorruptTileError(TileDataError):
    """A tile image cannot be decoded."""


class SplitError(TileDataError):
    """A split is unusable: a patient in two splits, a split with one class, or a stale split file."""


class EmptyTileSetError(TileDataError):
    """A tile source holds no labelled tiles."""


class TilingMismatchError(TileDataError):
    """Tile files were cut at another tile size or resolution than the config declares."""
