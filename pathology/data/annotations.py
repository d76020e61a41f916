"""Region annotations (QuPath GeoJSON) to tile labels, by the fraction of each tile a class covers.

QuPath exports polygons in level-0 pixel coordinates with the class under
``properties.classification.name``. A tile's coverage by a class is measured the way tissue is, by
one function (:func:`wsi_tiling.tissue.tissue_fraction`): the class's polygons are rasterised
(``skimage.draw.polygon``, holes cleared) on a mask of ``RASTER_PER_TILE`` pixels per tile edge laid
on the tile grid, and each tile's share of mask pixels is read from the mask's integral image. A
mask pixel counts when its centre is inside a polygon: exact for regions aligned to 1/16 of a tile,
otherwise off by at most the mask pixels the outline crosses; fast for thousands of tiles.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.draw import polygon as polygon_pixels

from pathology.data.errors import AnnotationError
from wsi_tiling.tissue import tissue_fraction

__all__ = ["Region", "read_geojson", "class_coverage", "labels_from_coverage", "UNLABELLED"]

log = logging.getLogger(__name__)

RASTER_PER_TILE = 16  # mask pixels per tile edge
UNLABELLED = -1  # label of a tile left out of training
MIN_RING_POSITIONS = 4  # GeoJSON: a closed ring of at least 3 distinct vertices


@dataclass(frozen=True)
class Region:
    """One annotated polygon: ``exterior`` and ``holes`` are (K, 2) arrays of level-0 (x, y) pixels."""

    class_name: str
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()


def _class_name(feature: dict, path: Path) -> str:
    props = feature.get("properties") or {}
    classification = props.get("classification")
    if isinstance(classification, dict) and isinstance(classification.get("name"), str):
        return classification["name"]
    if isinstance(classification, str):
        return classification
    raise AnnotationError(f"{path}: feature {feature.get('id', '?')} has no properties.classification.name")


def _rings(geometry: dict, path: Path) -> list[list[np.ndarray]]:
    """Returns each polygon of a Polygon/MultiPolygon geometry as [exterior, *holes]."""
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else None
    if polygons is None:
        raise AnnotationError(f"{path}: geometry type {kind!r} is not Polygon or MultiPolygon")
    try:
        rings = [[np.asarray(ring, dtype=float).reshape(-1, 2) for ring in polygon] for polygon in polygons]
    except (TypeError, ValueError) as err:
        raise AnnotationError(f"{path}: polygon coordinates are not lists of (x, y) pairs") from err
    if any(not polygon or len(polygon[0]) < MIN_RING_POSITIONS for polygon in rings):
        raise AnnotationError(f"{path}: a polygon ring has fewer than {MIN_RING_POSITIONS} positions")
    return rings


def read_geojson(path: str | Path) -> list[Region]:
    """Reads the polygons of a QuPath GeoJSON export (FeatureCollection, Feature list or one Feature).

    Args:
        path: the ``.geojson`` file; coordinates are level-0 pixels.

    Returns:
        One :class:`Region` per polygon; other geometry types (points, lines) raise.

    Raises:
        AnnotationError: the file is not JSON, not GeoJSON features, or a feature has no class.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: not readable JSON ({err})") from err
    features = doc.get("features") if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" else doc
    features = [features] if isinstance(features, dict) else features
    if not isinstance(features, list) or not all(isinstance(f, dict) and "geometry" in f for f in features):
        raise AnnotationError(f"{path}: expected a GeoJSON FeatureCollection or a list of Features")
    regions = []
    for feature in features:
        name = _class_name(feature, path)
        for exterior, *holes in _rings(feature["geometry"] or {}, path):
            regions.append(Region(name, exterior, tuple(holes)))
    return regions


def _fill(mask: np.ndarray, region: Region, origin_level0: np.ndarray, pixel_level0: float) -> None:
    """ORs ``region`` (exterior minus holes) into ``mask``, drawing only inside the region's bounding box.

    Mask pixel (i, j) spans level-0 ``origin + [i, i + 1) * pixel`` and is set when its centre is inside;
    ``skimage.draw.polygon`` puts pixel centres at integers, so vertices move by half a pixel.
    """
    exterior = (region.exterior - origin_level0) / pixel_level0
    lo = np.clip(np.floor(exterior.min(axis=0)).astype(int), 0, mask.shape[::-1])
    hi = np.clip(np.ceil(exterior.max(axis=0)).astype(int), 0, mask.shape[::-1])
    if np.any(hi <= lo):
        return
    crop = np.zeros((hi[1] - lo[1], hi[0] - lo[0]), bool)
    for ring, inside in ((region.exterior, True), *((hole, False) for hole in region.holes)):
        xy = (ring - origin_level0) / pixel_level0 - lo - 0.5
        rows, cols = polygon_pixels(xy[:, 1], xy[:, 0], crop.shape)
        crop[rows, cols] = inside
    mask[lo[1]:hi[1], lo[0]:hi[0]] |= crop


def class_coverage(regions: list[Region], class_names: list[str], coords_level0: np.ndarray,
                   tile_size_level0: float) -> np.ndarray:
    """Fraction of each tile covered by each class's polygons (union of the polygons, minus holes).

    Args:
        regions: annotated polygons in level-0 pixels.
        class_names: the classes to measure; regions of other classes are ignored (and logged).
        coords_level0: (N, 2) tile top-left (x, y) in level-0 pixels.
        tile_size_level0: tile edge in level-0 pixels.

    Returns:
        (N, C) float coverage in [0, 1], C = len(class_names).
    """
    coords = np.asarray(coords_level0, np.float64).reshape(-1, 2)
    coverage = np.zeros((len(coords), len(class_names)), np.float32)
    ignored = sorted({r.class_name for r in regions} - set(class_names))
    if ignored:
        log.info("ignoring annotation classes not in class_names: %s", ignored)
    if not len(coords):
        return coverage
    pixel = tile_size_level0 / RASTER_PER_TILE
    origin = coords.min(axis=0)
    width, height = np.ceil((coords.max(axis=0) + tile_size_level0 - origin) / pixel).astype(int)
    for index, name in enumerate(class_names):
        mask = np.zeros((height, width), bool)
        for region in regions:
            if region.class_name == name:
                _fill(mask, region, origin, pixel)
        coverage[:, index] = tissue_fraction(mask, (pixel, pixel), coords - origin, tile_size_level0)
    return coverage


def labels_from_coverage(coverage: np.ndarray, min_coverage: float, background: int | None = None) -> np.ndarray:
    """Labels each tile by its most-covering class when that class covers at least ``min_coverage``.

    Args:
        coverage: (N, C) class coverage fractions from :func:`class_coverage`.
        min_coverage: fraction of the tile a class must cover to label it.
        background: class index for tiles no class covers enough; None leaves them out.

    Returns:
        (N,) int64 class indices, :data:`UNLABELLED` for tiles left out.
    """
    best = coverage.argmax(axis=1)
    enough = coverage[np.arange(len(coverage)), best] >= min_coverage
    fallback = UNLABELLED if background is None else background
    return np.where(enough, best, fallback).astype(np.int64)
