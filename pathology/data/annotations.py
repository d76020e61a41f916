"""Region annotations (QuPath GeoJSON) to tile labels, by the fraction of each tile a class covers.

QuPath exports polygons in level-0 pixel coordinates with the class under
``properties.classification.name``. A tile's coverage by a class is measured on a regular grid of
``SAMPLES_PER_SIDE``² sample points (pixel centres of a 16 × 16 subdivision): exact for regions
aligned to 1/16 of a tile, within 1/256 otherwise, and fast for thousands of tiles.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.path import Path as PolygonPath

from pathology.data.errors import AnnotationError

__all__ = ["Region", "read_geojson", "class_coverage", "labels_from_coverage", "UNLABELLED"]

log = logging.getLogger(__name__)

SAMPLES_PER_SIDE = 16
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


def _sample_points(coords_level0: np.ndarray, tile_size_level0: float) -> np.ndarray:
    """(N * S², 2) level-0 sample points, S² per tile, at the centres of an S × S subdivision."""
    offsets = (np.arange(SAMPLES_PER_SIDE) + 0.5) * tile_size_level0 / SAMPLES_PER_SIDE
    grid = np.stack(np.meshgrid(offsets, offsets), axis=-1).reshape(-1, 2)
    return (coords_level0[:, None, :].astype(float) + grid[None]).reshape(-1, 2)


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
    points = _sample_points(np.asarray(coords_level0).reshape(-1, 2), tile_size_level0)
    inside = np.zeros((len(class_names), len(points)), bool)
    ignored = sorted({r.class_name for r in regions} - set(class_names))
    if ignored:
        log.info("ignoring annotation classes not in class_names: %s", ignored)
    for region in regions:
        if region.class_name not in class_names:
            continue
        hit = PolygonPath(region.exterior).contains_points(points)
        for hole in region.holes:
            hit &= ~PolygonPath(hole).contains_points(points)
        inside[class_names.index(region.class_name)] |= hit
    return inside.reshape(len(class_names), -1, SAMPLES_PER_SIDE**2).mean(axis=2).T


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
