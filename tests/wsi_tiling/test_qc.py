"""The QC picture of a slide's tile stores: one titled panel per setting, outline and grid where physics says."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_tiling import InvalidParameterError, Resolution, TissueParams, draw_tiling_qc, tile_slide
from wsi_tiling.qc import GAP_PX, write_png

GREEN, BLUE = (0, 160, 0), (0, 0, 255)
THUMB_W, THUMB_H = 4096 // 16, 3072 // 16  # 4 µm/px thumbnail of the 0.25 µm/px stripes slide
# Boundary pixels of the two tissue boxes at 4 µm/px: 112 x 80 and 96 x 64 pixels.
OUTLINE_MIN_PX = 2 * (112 + 80) - 4 + 2 * (96 + 64) - 4


def _is(picture: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return (picture == rgb).all(axis=-1)


def test_one_panel_per_setting_with_outline_and_its_own_grid(stripes_slide: Path, tmp_path: Path) -> None:
    stores = [tile_slide(stripes_slide, tmp_path, Resolution(power, "power"), 128).h5_path for power in (10, 5)]
    picture = draw_tiling_qc(stripes_slide, stores)
    # The slide is wider than tall, so the panels are stacked: (title + thumbnail) x 2 + gap.
    title_h = (picture.shape[0] - GAP_PX) // 2 - THUMB_H
    assert picture.shape == (2 * (title_h + THUMB_H) + GAP_PX, THUMB_W, 3) and title_h > 0
    tenx = picture[title_h : title_h + THUMB_H]
    fivex = picture[2 * title_h + THUMB_H + GAP_PX :]
    for title in (picture[:title_h], picture[title_h + THUMB_H + GAP_PX :][:title_h]):
        assert (title < 128).any()  # the setting and tile count are written
    for panel in (tenx, fivex):
        assert _is(panel, GREEN).sum() >= OUTLINE_MIN_PX
    # 10x, 128 px = 128 µm = 32 thumbnail px: tile (1, 1), inside the first box, has its top edge
    # on row 32, columns 32..63; the 5x grid (64 px) has no edge there.
    assert _is(tenx[32, 32:64], BLUE).all() and not _is(fivex[32, 32:64], BLUE).all()
    # 5x tile (1, 0) is 3/4 tissue: kept, its top edge on row 0, columns 64..127.
    assert _is(fivex[0, 64:128], BLUE).all()


def test_panels_of_a_square_slide_sit_side_by_side(no_mpp_slide: Path, tmp_path: Path) -> None:
    stores = [tile_slide(no_mpp_slide, tmp_path, Resolution(power, "power"), 64, slide_mpp=0.25).h5_path
              for power in (10, 5)]
    picture = draw_tiling_qc(no_mpp_slide, stores)
    thumb = 1024 // 16  # 4 µm/px of 0.25 µm/px, taken from the stores as the slide has no metadata
    assert picture.shape[1] == 2 * thumb + GAP_PX and thumb < picture.shape[0] < 2 * thumb
    assert _is(picture[:, :thumb], GREEN).any() and _is(picture[:, thumb + GAP_PX :], GREEN).any()


def test_stores_with_different_tissue_settings_are_refused(stripes_slide: Path, tmp_path: Path) -> None:
    default = tile_slide(stripes_slide, tmp_path / "a", Resolution(10, "power"), 128).h5_path
    other = tile_slide(stripes_slide, tmp_path / "b", Resolution(10, "power"), 128,
                       tissue=TissueParams(min_saturation=40)).h5_path
    with pytest.raises(InvalidParameterError, match="stripes.svs"):
        draw_tiling_qc(stripes_slide, [default, other])


def test_png_is_written_under_a_temporary_name_then_renamed(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200
    path = write_png(tmp_path / "thumbnails" / "a.png", rgb)
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]
    assert (cv2.imread(str(path))[..., ::-1] == rgb).all()
