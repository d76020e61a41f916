"""Tiles and their class probabilities as a GeoJSON FeatureCollection that QuPath imports.

Coordinates are level-0 pixels with the origin at the slide's top-left corner, as QuPath
expects. Each tile is a closed square ``Polygon`` with ``objectType: "tile"``, the most probable
class as its ``classification``, and one measurement per class (``prob <class>``), so the tiles
can be coloured, filtered and summarised in QuPath (File > Import objects).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathology.atomic import atomic_path

__all__ = ["class_colours", "tiles_to_geojson", "write_geojson"]

# Distinct colours (tab10), one per class, as QuPath's 0-255 RGB triples.
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def class_colours(n_classes: int) -> list[tuple[int, int, int]]:
    """An RGB colour per class, repeating after ten."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(n_classes)]


def tiles_to_geojson(xy_level0: np.ndarray, tile_size_level0: float, probs: np.ndarray,
                     class_names: Sequence[str]) -> dict[str, Any]:
    """One square feature per tile.

    Args:
        xy_level0: (N, 2) tile top-left corners, level-0 pixels.
        tile_size_level0: tile edge in level-0 pixels.
        probs: (N, C) class probabilities.
        class_names: C names, in column order.

    Returns:
        A GeoJSON ``FeatureCollection`` as a dict.
    """
    colours = class_colours(len(class_names))
    features = []
    for (x, y), p in zip(np.asarray(xy_level0, np.float64), np.asarray(probs, np.float64), strict=True):
        x1, y1 = x + tile_size_level0, y + tile_size_level0
        best = int(p.argmax())
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": class_names[best], "color": list(colours[best])},
                "measurements": {f"prob {name}": float(v) for name, v in zip(class_names, p, strict=True)},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, xy_level0: np.ndarray, tile_size_level0: float, probs: np.ndarray,
                  class_names: Sequence[str]) -> Path:
    """Writes :func:`tiles_to_geojson` to ``path`` atomically; returns the path."""
    collection = tiles_to_geojson(xy_level0, tile_size_level0, probs, class_names)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection))
    return Path(path)
