"""Pure grid functions on hand-sized inputs."""
from __future__ import annotations

import numpy as np

from wsi_tiling.grid import grid_coords, grid_indices, grid_shape, group_into_blocks


def test_only_whole_tiles_fit() -> None:
    # 1000 px wide at downsample 2 with 100 px tiles: footprint 200, so 5 columns (0..800);
    # 450 px high: 2 rows (0, 200; the third would end at 600).
    assert grid_shape((1000, 450), 100, 0, 2.0) == (5, 2)
    assert grid_shape((199, 199), 100, 0, 2.0) == (0, 0)


def test_overlap_shortens_the_step() -> None:
    # 64 px tiles, 16 px overlap, downsample 4: step 48 × 4 = 192, footprint 256.
    assert grid_shape((4096, 3072), 64, 16, 4.0) == ((4096 - 256) // 192 + 1, (3072 - 256) // 192 + 1)
    coords = grid_coords(np.array([[0, 0], [1, 0], [2, 3]]), 64, 16, 4.0)
    assert coords.tolist() == [[0, 0], [192, 0], [384, 576]]
    assert coords.dtype == np.int64


def test_grids_align_across_magnifications() -> None:
    # Non-integer downsamples (0.5 µm/px asked of a 0.2282 µm/px slide, and half that resolution).
    fine = 0.5 / 0.2282
    coarse = 2 * fine
    cols, rows = grid_shape((20000, 15000), 224, 0, coarse)
    coarse_xy = grid_coords(grid_indices((cols, rows)), 224, 0, coarse)
    fine_xy = {tuple(xy) for xy in grid_coords(grid_indices((2 * cols, 2 * rows)), 224, 0, fine).tolist()}
    assert all(tuple(xy) in fine_xy for xy in coarse_xy.tolist())
    # the coarse tile (3, 2) spans exactly the fine tiles (6..7, 4..5), to the level-0 pixel
    xy_c = grid_coords(np.array([[3, 2]]), 224, 0, coarse)[0]
    first, last = grid_coords(np.array([[6, 4], [7, 5]]), 224, 0, fine)
    assert (first == xy_c).all()
    assert np.abs(last + 224 * fine - (xy_c + 224 * coarse)).max() <= 1


def test_indices_are_row_major() -> None:
    assert grid_indices((3, 2)).tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]


def test_blocks_group_neighbours() -> None:
    indices = np.array([[0, 0], [5, 0], [1, 1], [2, 2], [4, 3]])
    blocks = group_into_blocks(indices, 2)
    assert [sorted(b.tolist()) for b in blocks] == [[0, 2], [1], [3], [4]]  # blocks (0,0) (2,0) (1,1) (2,1)
    assert group_into_blocks(np.zeros((0, 2), np.int64), 2) == []
