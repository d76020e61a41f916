"""GeoJSON regions → tile coverage → labels, checked on tiles whose coverage is known by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pathology.data import AnnotationError, UNLABELLED, class_coverage, labels_from_coverage, read_geojson


def _feature(name: str, rings: list[list[list[float]]]) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}}}


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_coverage_of_half_tile_and_tile_with_hole(tmp_path: Path) -> None:
    # Tile A at (0, 0) and tile B at (200, 0), both 100 px: a tumour polygon covers A's left half;
    # a stroma square covers all of B but has a 50 x 50 hole, so it covers 1 - 0.25 = 0.75 of B.
    doc = {"type": "FeatureCollection", "features": [
        _feature("tumour", [_square(0, 0, 50, 100)]),
        _feature("stroma", [_square(200, 0, 300, 100), _square(225, 25, 275, 75)]),
        _feature("Ignore*", [_square(0, 0, 300, 100)]),
    ]}
    regions = read_geojson(_write(tmp_path / "slide.geojson", doc))
    coverage = class_coverage(regions, ["tumour", "stroma"], np.array([[0, 0], [200, 0]]), 100.0)
    np.testing.assert_allclose(coverage, [[0.5, 0.0], [0.0, 0.75]])


def test_overlapping_polygons_of_one_class_count_once(tmp_path: Path) -> None:
    doc = [_feature("tumour", [_square(0, 0, 100, 100)]), _feature("tumour", [_square(0, 0, 100, 100)])]
    regions = read_geojson(_write(tmp_path / "twice.geojson", doc))
    assert class_coverage(regions, ["tumour"], np.array([[0, 0]]), 100.0)[0, 0] == 1.0


def test_labels_from_coverage_threshold_and_background() -> None:
    coverage = np.array([[0.6, 0.1], [0.2, 0.3], [0.0, 0.9]])
    np.testing.assert_array_equal(labels_from_coverage(coverage, 0.5), [0, UNLABELLED, 1])
    np.testing.assert_array_equal(labels_from_coverage(coverage, 0.5, background=2), [0, 2, 1])


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]}),
    json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
                 "properties": {"classification": {"name": "tumour"}}}]),
    json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]},
                 "properties": {"classification": {"name": "tumour"}}}]),
    json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 1, 1)]},
                 "properties": {}}]),
])
def test_invalid_geojson_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "broken.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError, match="broken.geojson"):
        read_geojson(path)


def _regions(tmp_path: Path, *features: dict) -> list:
    return read_geojson(_write(tmp_path / "regions.geojson", list(features)))


def test_coverage_of_a_rectangle_computed_by_hand(tmp_path: Path) -> None:
    """x in [40, 160), y in [0, 50) over 160 px tiles at (0, 0) and (160, 0) (the rectangle reaches
    into neither the second tile nor below 50 px): (120 x 50) / 160² = 0.234375 of the first tile."""
    regions = _regions(tmp_path, _feature("tumour", [[[40, 0], [160, 0], [160, 50], [40, 50], [40, 0]]]))
    coverage = class_coverage(regions, ["tumour"], np.array([[0, 0], [160, 0]]), 160.0)
    np.testing.assert_allclose(coverage[:, 0], [120 * 50 / 160**2, 0.0])


def test_coverage_of_a_triangle_is_its_area_within_the_outline_pixels(tmp_path: Path) -> None:
    """A right triangle with 4-tile legs over a 4 x 4 block of 64 px tiles: tiles above the diagonal
    are full, below it empty, on it half covered; in all, half the block (8 tiles' area). The mask
    has 16 px per tile edge, so a tile on the diagonal is off by at most its 16 outline pixels / 256."""
    edge = 4 * 64
    regions = _regions(tmp_path, _feature("tumour", [[[0, 0], [edge, 0], [0, edge], [0, 0]]]))
    coords = np.array([[x, y] for y in range(0, edge, 64) for x in range(0, edge, 64)])
    coverage = class_coverage(regions, ["tumour"], coords, 64.0)[:, 0].reshape(4, 4)
    column, row = np.meshgrid(np.arange(4), np.arange(4))
    expected = np.where(column + row < 3, 1.0, np.where(column + row == 3, 0.5, 0.0))
    np.testing.assert_allclose(coverage, expected, atol=16 / 256)
    assert abs(coverage.sum() - 8.0) <= 4 * 16 / 256


def test_hole_in_a_polygon_and_tiles_off_the_mask_grid(tmp_path: Path) -> None:
    """A 200 px square with a centred 100 px hole covers 0.75 of a 200 px tile at its corner; a tile
    shifted by half its size (overlapping tiles) sees the square's lower-right quarter minus the
    hole's: (100² - 50²) / 200² = 0.1875."""
    square = [[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]
    hole = [[50, 50], [150, 50], [150, 150], [50, 150], [50, 50]]
    regions = _regions(tmp_path, _feature("tumour", [square, hole]))
    coverage = class_coverage(regions, ["tumour"], np.array([[0, 0], [100, 100]]), 200.0)
    np.testing.assert_allclose(coverage[:, 0], [0.75, 0.1875])


def test_no_tiles_give_an_empty_table(tmp_path: Path) -> None:
    regions = _regions(tmp_path, _feature("tumour", [_square(0, 0, 10, 10)]))
    assert class_coverage(regions, ["tumour", "stroma"], np.zeros((0, 2)), 100.0).shape == (0, 2)
