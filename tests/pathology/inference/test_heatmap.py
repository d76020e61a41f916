"""Heatmap rasterisation checked pixel by pixel; pictures checked for what they show."""
from __future__ import annotations

import matplotlib.image
import numpy as np

from pathology.inference.heatmap import save_gallery, save_heatmap, tile_value_map
from wsi_tiling import SlideReader, read_thumbnail


def test_tile_value_map_by_hand() -> None:
    # A 1000 x 500 slide drawn at 100 x 50 (0.1 thumbnail px per level-0 px); 200-px tiles cover 20 px.
    xy = np.array([[0, 0], [200, 0], [100, 0], [800, 300]])
    values = np.array([0.2, 0.8, 0.5, 1.0])
    grid = tile_value_map(xy, 200, values, (1000, 500), (100, 50))
    assert grid.shape == (50, 100)
    np.testing.assert_allclose(grid[0, 0:10], 0.2)  # first tile alone
    np.testing.assert_allclose(grid[5, 10:20], (0.2 + 0.5) / 2)  # overlapped by the third
    np.testing.assert_allclose(grid[19, 20:30], (0.8 + 0.5) / 2)
    np.testing.assert_allclose(grid[0, 30:40], 0.8)
    np.testing.assert_allclose(grid[30:50, 80:100], 1.0)  # last tile: x 80..100, y 30..50
    assert np.isnan(grid[20, 0]) and np.isnan(grid[29, 99])  # uncovered glass
    assert np.count_nonzero(~np.isnan(grid)) == 20 * 40 + 20 * 20


def test_heatmap_colours_only_predicted_tiles(tmp_path) -> None:
    thumbnail = np.full((60, 80, 3), 255, np.uint8)
    value_map = np.full((60, 80), np.nan)
    value_map[:, :40] = 1.0  # left half: probability 1 -> jet's dark red
    path = save_heatmap(tmp_path / "h.png", thumbnail, value_map, "slide: tumour")
    image = matplotlib.image.imread(path)[..., :3]
    reddish = (image[..., 0] > 0.6) & (image[..., 1] < 0.6) & (image[..., 2] < 0.6)
    assert reddish.sum() > 500  # the overlay is there; red is not in the white thumbnail


def test_gallery_has_a_panel_per_tile(tmp_path) -> None:
    tiles = [np.full((32, 32, 3), c, np.uint8) for c in (0, 60, 120, 180, 240)]
    path = save_gallery(tmp_path / "g.png", tiles, [0.9, 0.8, 0.7, 0.6, 0.5], "top 5", columns=4)
    image = matplotlib.image.imread(path)[..., :3]
    assert image.shape[0] > image.shape[1] / 4  # two rows of four columns
    for grey in (60, 120, 180):  # every tile is drawn as a solid square of its grey
        assert np.all(np.abs(image - grey / 255) < 0.01, axis=-1).sum() > 1000


def test_heatmap_thumbnail_keeps_geometry_and_colour(two_class_set) -> None:
    with SlideReader(two_class_set.slide["mixed"]) as slide:
        thumbnail, downsample = read_thumbnail(slide, 256)
    assert downsample == (4.0, 4.0) and thumbnail.shape == (256, 256, 3)  # a 1024 x 1024 slide
    # tissue spans level-0 256..896 px, i.e. 64..224 in the thumbnail; blue from 768, i.e. 192
    np.testing.assert_array_equal(thumbnail[100, 100], (230, 150, 200))
    np.testing.assert_array_equal(thumbnail[100, 210], (150, 170, 230))
    np.testing.assert_array_equal(thumbnail[30, 30], (240, 240, 240))
