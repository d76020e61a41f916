"""Whole-slide tiling at true physical resolution (never imports torch).

The public API: :class:`Resolution`, :func:`tile_slide` (one slide, one setting, one TRIDENT-layout
h5), :class:`TileReader` (the tiles of a store as arrays), :func:`read_thumbnail` (the whole slide
at a µm/px or size), :func:`draw_tiling_qc` (the QC picture of a slide's stores) and the typed errors.
"""
__version__ = "0.1.0"

from .errors import (InvalidParameterError, MissingResolutionError, OutputError, ResolutionUnavailableError,
                     SlideOpenError, SlideReadError, WsiTilingError)
from .qc import draw_tiling_qc
from .reader import InMemorySlide, SlideReader
from .regions import read_thumbnail
from .resolution import ReadPlan, Resolution, mpp_to_power, plan_read, power_to_mpp
from .store import StoreInfo, TileReader, read_attrs, read_store_info
from .tiler import TilingResult, default_slide_id, setting_name, store_path, tile_slide
from .tissue import TissueParams

__all__ = [
    "__version__",
    "Resolution", "ReadPlan", "plan_read", "power_to_mpp", "mpp_to_power",
    "SlideReader", "InMemorySlide", "read_thumbnail",
    "TissueParams",
    "tile_slide", "TilingResult", "setting_name", "store_path", "default_slide_id",
    "TileReader", "read_attrs", "StoreInfo", "read_store_info", "draw_tiling_qc",
    "WsiTilingError", "SlideOpenError", "SlideReadError", "MissingResolutionError",
    "ResolutionUnavailableError", "InvalidParameterError", "OutputError",
]
