"""The tile store: one TRIDENT-layout h5 per slide and setting, written atomically, and its reader.

``coords`` (N × 2 int64, level-0 top-left x, y) carries CLAM's, TRIDENT's and our own attributes;
``tissue_fraction`` (N) and, optionally, ``tiles`` (N × T × T × 3 uint8, one gzip chunk per tile).
The file is written under a temporary name and renamed when complete, so a crash never leaves a
file that looks finished.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, overload

import h5py
import imagecodecs
import numpy as np

from .colour import AS_READ, YCBCR_TO_RGB, YCbCrAsRgb
from .errors import OutputError
from .reader import SlideReader
from .regions import read_scaled
from .resolution import Resolution

__all__ = ["TileStoreWriter", "TileReader", "EncodedTile", "StoreInfo", "compress_tile", "read_attrs",
           "read_store_info", "store_info", "GZIP_LEVEL", "DEFAULT_READER"]

log = logging.getLogger(__name__)

GZIP_LEVEL = 1  # fastest deflate: tiles are written once and read many times
PARTIAL_SUFFIX = ".partial"
PROBE_ROWS = 16  # rows of a tile deflated to predict whether the whole tile is worth deflating
RAW_ABOVE_RATIO = 0.85  # predicted compressed/raw size above which a tile is stored raw
GZIP_SKIPPED = 1  # HDF5 chunk filter mask: the first (gzip) filter was not applied
DEFAULT_READER = "openslide"  # what stores written before the attribute existed were read with
DEFAULT_COLOUR = AS_READ  # stores written before the colour check: pixels as the reader gave them


class EncodedTile(NamedTuple):
    """One tile as an h5 chunk: its bytes and the HDF5 filter mask (1 = gzip skipped, raw bytes)."""

    data: bytes
    filter_mask: int


def compress_tile(tile: np.ndarray) -> EncodedTile:
    """Encodes one (T, T, 3) uint8 tile as an h5 gzip chunk, or raw when deflate would not pay.

    Glass and background deflate several-fold, but JPEG-decoded tissue barely shrinks (about 10 %)
    at the cost of ~3 ms a tile, more than decoding it. The first rows are deflated as a probe;
    a tile predicted above :data:`RAW_ABOVE_RATIO` is stored unfiltered, which HDF5 records per
    chunk and every reader (h5py, CLAM, TRIDENT) undoes transparently. libdeflate (through
    imagecodecs) is 2-3x faster than zlib and releases the GIL, so the tiler's threads compress in
    parallel.
    """
    tile = np.ascontiguousarray(tile)
    probe = tile[:PROBE_ROWS]
    if len(imagecodecs.deflate_encode(probe, level=GZIP_LEVEL)) > RAW_ABOVE_RATIO * probe.nbytes:
        return EncodedTile(tile.tobytes(), GZIP_SKIPPED)
    return EncodedTile(imagecodecs.deflate_encode(tile, level=GZIP_LEVEL), 0)


def _h5_value(value: Any) -> Any:
    return "none" if value is None else value


class TileStoreWriter:
    """Writes one slide's tile store under a temporary name; renames it only on clean exit.

    Args:
        path: final ``.h5`` path.
        coords: (N, 2) int64 level-0 top-left (x, y).
        tissue_fraction: (N,) tissue fraction of each tile.
        attrs: attributes for ``coords`` (None values are stored as ``"none"``).
        tile_size: tile edge in pixels to create a ``tiles`` dataset, or None for coordinates only.

    Raises:
        OutputError: the folder cannot be created or the file cannot be written.
    """

    def __init__(self, path: str | Path, coords: np.ndarray, tissue_fraction: np.ndarray,
                 attrs: Mapping[str, Any], tile_size: int | None = None) -> None:
        self.path = Path(path)
        self._partial = self.path.with_name(f"{self.path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        self._coords = np.asarray(coords, np.int64).reshape(-1, 2)
        self._fraction = np.asarray(tissue_fraction, np.float32)
        self._attrs = dict(attrs)
        self._tile_size = tile_size
        self._file: h5py.File | None = None
        self._tiles: h5py.Dataset | None = None

    def __enter__(self) -> TileStoreWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self._partial, "w")
        except OSError as error:
            raise OutputError(self.path.parent, f"cannot write tile store ({error.strerror or error})") from error
        try:
            self._create_datasets(self._file)
        except (OSError, ValueError):
            self._file.close()
            self._partial.unlink(missing_ok=True)
            raise
        return self

    def _create_datasets(self, file: h5py.File) -> None:
        coords = file.create_dataset("coords", data=self._coords)
        for key, value in self._attrs.items():
            coords.attrs[key] = _h5_value(value)
        file.create_dataset("tissue_fraction", data=self._fraction)
        if self._tile_size is not None:
            size = self._tile_size
            self._tiles = file.create_dataset(
                "tiles", shape=(len(self._coords), size, size, 3), maxshape=(None, size, size, 3),
                dtype=np.uint8, chunks=(1, size, size, 3), compression="gzip", compression_opts=GZIP_LEVEL)

    def write_encoded(self, index: int, tile: EncodedTile) -> None:
        """Stores tile ``index`` from :func:`compress_tile` output as is (no re-compression)."""
        if self._tiles is None:
            raise ValueError(f"{self.path}: opened without a tiles dataset")
        self._tiles.id.write_direct_chunk((index, 0, 0, 0), tile.data, filter_mask=tile.filter_mask)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()
        if kind is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class StoreInfo:
    """What a tile store says about itself, parsed once: what was asked and what was delivered.

    Attributes:
        h5_path: the store.
        slide_path: the slide it was cut from (as recorded).
        resolution: the requested resolution (``"20x"`` -> ``Resolution(20, "power")``).
        tile_size: tile edge in output pixels.
        overlap: pixels shared by neighbouring tiles, output pixels.
        target_mpp: delivered µm/px of the tiles (the physical truth).
        target_power: delivered objective power, relative to ``slide_power``.
        slide_mpp: level-0 µm/px used for the slide.
        slide_power: level-0 objective power used for the slide.
        mpp_source: where ``slide_mpp`` came from: ``metadata``, ``user`` or ``objective-power``.
        read_level: pyramid level read.
        resize_factor: read-level pixels per output pixel.
        target_downsample: level-0 pixels per output pixel.
        patch_size_level0: tile footprint in level-0 pixels.
        reader: the slide reader used, ``openslide`` or ``tifffile``.
        colour: ``as-read``, or ``ycbcr-to-rgb`` when the slide's YCbCr-as-RGB pixels were converted.
        request: the tiling request as recorded (tissue settings, ``min_tissue``, ``slide_mpp``
            override, ``allow_upsample``, ...).
    """

    h5_path: Path
    slide_path: Path
    resolution: Resolution
    tile_size: int
    overlap: int
    target_mpp: float
    target_power: float
    slide_mpp: float
    slide_power: float
    mpp_source: str
    read_level: int
    resize_factor: float
    target_downsample: float
    patch_size_level0: int
    reader: str
    colour: str
    request: Mapping[str, Any]


def store_info(h5_path: str | Path, attrs: Mapping[str, Any]) -> StoreInfo:
    """Parses a store's ``coords`` attributes (:func:`read_attrs`) into a :class:`StoreInfo`.

    Stores written before ``reader`` and ``colour`` were recorded load with :data:`DEFAULT_READER`
    and ``as-read``, with a warning.

    Raises:
        KeyError: an attribute every store of this project has is missing (not a tile store).
        ValueError: an attribute cannot be read (e.g. an unparsable request).
    """
    request = json.loads(attrs["params"])
    missing = [key for key in ("reader", "colour") if key not in attrs]
    if missing:
        log.warning("%s: tile store written before %s were recorded; assuming %s", h5_path,
                    " and ".join(missing), {"reader": DEFAULT_READER, "colour": DEFAULT_COLOUR})
    return StoreInfo(
        h5_path=Path(h5_path), slide_path=Path(attrs["slide_path"]),
        resolution=Resolution.parse(str(request["resolution"])), tile_size=int(attrs["patch_size"]),
        overlap=int(attrs["overlap"]), target_mpp=float(attrs["target_mpp"]),
        target_power=float(attrs["target_magnification"]), slide_mpp=float(attrs["slide_mpp"]),
        slide_power=float(attrs["level0_magnification"]), mpp_source=str(attrs["mpp_source"]),
        read_level=int(attrs["read_level"]), resize_factor=float(attrs["resize_factor"]),
        target_downsample=float(attrs["target_downsample"]), patch_size_level0=int(attrs["patch_size_level0"]),
        reader=str(attrs.get("reader", DEFAULT_READER)), colour=str(attrs.get("colour", DEFAULT_COLOUR)),
        request=request)


def read_store_info(h5_path: str | Path) -> StoreInfo:
    """What a tile store asked for and delivered (see :class:`StoreInfo`).

    Raises:
        OSError: not a readable h5 file.
        KeyError, ValueError: not a tile store written by :func:`~wsi_tiling.tiler.tile_slide`.
    """
    return store_info(h5_path, read_attrs(h5_path))


def read_attrs(h5_path: str | Path) -> dict[str, Any]:
    """The ``coords`` attributes of a tile store, as Python values."""
    with h5py.File(h5_path, "r") as file:
        return _coords_attrs(file)


def _coords_attrs(file: h5py.File) -> dict[str, Any]:
    return {key: _python_value(value) for key, value in file["coords"].attrs.items()}


def _python_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


class TileReader(Sequence[np.ndarray]):
    """The tiles of one store as a sequence of (T, T, 3) uint8 RGB arrays.

    Tiles come from the stored ``tiles`` dataset when present, else are read from the slide at
    the recorded level and resized by the recorded factor (identical to the tiler's pixels when
    that factor is a whole number; within a sub-pixel shift otherwise, as the tiler resizes
    whole blocks and this reads tile by tile). Handles are
    opened lazily in the process that reads, so the object pickles into DataLoader workers
    (fork or spawn).

    Args:
        h5_path: a tile store written by :func:`~wsi_tiling.tiler.tile_slide`.
        slide_path: the slide, when it moved since tiling (default: the path recorded in the store).
    """

    def __init__(self, h5_path: str | Path, slide_path: str | Path | None = None) -> None:
        self.h5_path = Path(h5_path)
        with h5py.File(self.h5_path, "r") as file:
            self.coords: np.ndarray = file["coords"][:]
            self.tissue_fraction: np.ndarray = file["tissue_fraction"][:]
            self.has_tiles = "tiles" in file
            self.attrs: dict[str, Any] = _coords_attrs(file)
        self.slide_path = Path(slide_path if slide_path is not None else self.attrs["slide_path"])
        self.tile_size = int(self.attrs["patch_size"])
        self._read_size = int(self.attrs["patch_size_read_level"])
        self._handles: tuple[int, h5py.File | None, SlideReader | None] | None = None

    @cached_property
    def info(self) -> StoreInfo:
        """The store's attributes parsed once (see :func:`read_store_info`)."""
        return store_info(self.h5_path, self.attrs)

    def __len__(self) -> int:
        return len(self.coords)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.h5_path}: tile {index} out of range ({len(self)} tiles)")
        index %= len(self)
        h5, slide = self._open()
        if h5 is not None:
            return h5["tiles"][index]
        x, y = self.coords[index]
        size = self.tile_size
        source = YCbCrAsRgb(slide) if self.attrs.get("colour") == YCBCR_TO_RGB else slide
        return read_scaled(source, (int(x), int(y)), int(self.attrs["read_level"]),
                           (self._read_size, self._read_size), (size, size))

    def _open(self) -> tuple[h5py.File | None, SlideReader | None]:
        """Opens the h5 or slide handle once per process (a forked worker reopens its own)."""
        if self._handles is None or self._handles[0] != os.getpid():
            if self.has_tiles:
                self._handles = (os.getpid(), h5py.File(self.h5_path, "r"), None)
            else:
                self._handles = (os.getpid(), None, SlideReader(self.slide_path))
        return self._handles[1], self._handles[2]

    def close(self) -> None:
        """Closes handles opened by this process."""
        if self._handles is not None and self._handles[0] == os.getpid():
            for handle in self._handles[1:]:
                if handle is not None:
                    handle.close()
        self._handles = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = None
        return state

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
