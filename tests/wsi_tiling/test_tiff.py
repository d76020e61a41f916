"""The direct TIFF decoder must give OpenSlide's pixels exactly, wherever OpenSlide has pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from wsi_tiling import SlideReader
from wsi_tiling.tiff import TiffTiles


def _regions(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) at a level: a corner, one across tile seams, one running off the edge."""
    width, height = size
    return [(0, 0, min(width, 300), min(height, 200)), (width // 3, height // 3, 333, 257),
            (width - 50, height - 40, 120, 90)]


def _assert_same_as_openslide(path: Path) -> None:
    with openslide.OpenSlide(path) as slide:
        tiles = TiffTiles.for_openslide_levels(path, slide.level_dimensions)
        assert all(tiles.serves(level) for level in range(slide.level_count))
        for level, size in enumerate(slide.level_dimensions):
            downsample = slide.level_downsamples[level]
            for x, y, width, height in _regions(size):
                x0, y0 = round(x * downsample), round(y * downsample)
                if x0 / downsample != x or y0 / downsample != y:
                    continue  # OpenSlide paints such a region shifted by a sub-pixel (interpolated); we snap
                rgba = np.asarray(slide.read_region((x0, y0), level, (width, height)))
                ours = tiles.read(level, (x, y), (width, height))
                scanned = rgba[..., 3] == 255
                assert (ours[scanned] == rgba[..., :3][scanned]).all()
                assert (ours[~scanned] == 255).all()  # outside the image: white glass
        tiles.close()


def test_synthetic_lossless_pyramid_matches_openslide(stripes_slide: Path) -> None:
    _assert_same_as_openslide(stripes_slide)


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "fixtures/openslide-python_boxes.tiff"])
def test_real_tiffs_match_openslide(shared_data: Path, name: str) -> None:
    _assert_same_as_openslide(shared_data / "slides" / name)


def test_jpeg2000_svs_falls_back_to_openslide(shared_data: Path) -> None:
    # The TCGA slide's tiles are Aperio JPEG 2000 (33005): not decoded here, still readable.
    path = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    with openslide.OpenSlide(path) as slide:
        assert not TiffTiles.for_openslide_levels(path, slide.level_dimensions).serves(0)
    with SlideReader(path) as reader:
        assert reader.read_region((1000, 1000), 0, (64, 64)).std() > 0
