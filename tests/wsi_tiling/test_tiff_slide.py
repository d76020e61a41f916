"""OME-TIFF and plain TIFF slides, read with tifffile when OpenSlide cannot: metadata, physics, refusals."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from tests.conftest import (STRIPES_MPP, STRIPES_PERIOD_UM, STRIPES_SIZE_PX, STRIPES_TISSUE_UM, inside_tissue_boxes,
                            stripe_period_px, write_tiff)

from wsi_tiling import Resolution, SlideOpenError, SlideReader, TileReader, read_store_info, tile_slide
from wsi_tiling.cli import main as wsi_tile
from wsi_tiling.synthetic import StripesPainter

DOWNSAMPLES = (1, 4, 16)
UM_PER_CM = 10_000.0
UM_PER_INCH = 25_400.0


def _levels(downsamples: tuple[int, ...]) -> list[np.ndarray]:
    painter = StripesPainter(STRIPES_MPP, STRIPES_PERIOD_UM, STRIPES_TISSUE_UM)
    width, height = STRIPES_SIZE_PX
    return [painter(0, 0, width // d, height // d, d) for d in downsamples]


@pytest.fixture(scope="module")
def tiff_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiffs")
    pyramid, single = _levels(DOWNSAMPLES), _levels((1,))
    nanometres = {"PhysicalSizeX": STRIPES_MPP * 1000, "PhysicalSizeXUnit": "nm",
                  "PhysicalSizeY": STRIPES_MPP * 1000, "PhysicalSizeYUnit": "nm"}
    grey = np.zeros((256, 256), np.uint16)
    return {
        "ome_pyramid": write_tiff(folder / "ome_pyramid.ome.tif", pyramid, tiled=True, ome=True, metadata=nanometres),
        "ome_strips": write_tiff(folder / "ome_strips.ome.tif", single, tiled=False, ome=True,
                             metadata={"PhysicalSizeX": STRIPES_MPP, "PhysicalSizeY": STRIPES_MPP}),
        "ome_no_size": write_tiff(folder / "ome_no_size.ome.tif", single, tiled=True, ome=True, metadata={}),
        "plain_strips_cm": write_tiff(folder / "plain_strips_cm.tif", single, tiled=False, ome=False,
                                  resolution=(UM_PER_CM / STRIPES_MPP, UM_PER_CM / STRIPES_MPP, "CENTIMETER")),
        "plain_pyramid_inch": write_tiff(folder / "plain_pyramid_inch.tif", pyramid, tiled=False, ome=False,
                                     resolution=(UM_PER_INCH / STRIPES_MPP, UM_PER_INCH / STRIPES_MPP, "INCH")),
        "plain_no_unit": write_tiff(folder / "plain_no_unit.tif", single, tiled=False, ome=False),
        "grey": Path(tifffile.imwrite(folder / "grey.ome.tif", grey, ome=True, photometric="minisblack") or
                     folder / "grey.ome.tif"),
    }


@pytest.mark.parametrize(("name", "downsamples", "vendor"), [
    ("ome_pyramid", DOWNSAMPLES, "ome-tiff"), ("ome_strips", (1,), "ome-tiff"),
    ("plain_strips_cm", (1,), "generic-tiff"), ("plain_pyramid_inch", DOWNSAMPLES, "generic-tiff"),
])
def test_tifffile_reads_levels_and_physical_size(tiff_slides: dict[str, Path], name: str,
                                                  downsamples: tuple[int, ...], vendor: str) -> None:
    with SlideReader(tiff_slides[name]) as slide:
        assert (slide.reader_name, slide.vendor) == ("tifffile", vendor)
        assert slide.mpp == pytest.approx(STRIPES_MPP)
        assert slide.level_downsamples == pytest.approx(downsamples)
        # a region of the coarsest level crossing strip seams (every 64 rows) is that level as painted
        level, downsample = len(downsamples) - 1, downsamples[-1]
        expected = _levels((downsample,))[0][40:140, 100:250]
        assert (slide.read_region((100 * downsample, 40 * downsample), level, (150, 100)) == expected).all()


def test_openslide_reads_the_ome_tiff_without_its_levels_and_size(tiff_slides: dict[str, Path]) -> None:
    # why OME-TIFFs go to tifffile even though OpenSlide opens them
    with openslide.OpenSlide(tiff_slides["ome_pyramid"]) as slide:
        assert slide.level_count == 1 and openslide.PROPERTY_NAME_MPP_X not in slide.properties


def test_tiff_slides_through_wsi_tile(tiff_slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = wsi_tile([*map(str, tiff_slides.values()), "--out", str(out), "--mpp", "1.0", "--tile-size", "96",
                     "--workers", "1"])
    assert code == 1  # the slides without a physical size and the grey one
    with (out / "manifest.csv").open() as file:
        rows = {row["slide_id"]: row for row in csv.DictReader(file)}
    for name in ("ome_pyramid", "ome_strips", "plain_strips_cm", "plain_pyramid_inch"):
        row = rows[name]
        assert (row["status"], row["reader"]) == ("ok", "tifffile")
        assert read_store_info(row["h5_path"]).reader == "tifffile"
        reader = TileReader(row["h5_path"])
        inside = np.flatnonzero(inside_tissue_boxes(reader.coords, 96 * 1.0))
        assert len(inside) >= 1
        for index in inside:  # 8 µm stripes at 1.0 µm/px: 8 px
            assert stripe_period_px(reader[index]) == pytest.approx(STRIPES_PERIOD_UM / 1.0, rel=0.01)
    for name in ("ome_no_size", "plain_no_unit"):
        assert rows[name]["status"] == "error"
        assert f"{name}." in rows[name]["error"] and "--slide-mpp" in rows[name]["error"]
    assert rows["grey"]["status"] == "error"
    assert "grey.ome.tif" in rows["grey"]["error"] and "only 8-bit RGB" in rows["grey"]["error"]


def test_missing_size_is_given_with_slide_mpp(tiff_slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert wsi_tile([str(tiff_slides["plain_no_unit"]), "--out", str(out), "--magnification", "10",
                     "--tile-size", "96", "--slide-mpp", "0.25", "--workers", "1"]) == 0
    info = read_store_info(next(out.glob("10x_*/patches/plain_no_unit.h5")))
    assert (info.reader, info.mpp_source) == ("tifffile", "user")
    assert info.target_mpp == pytest.approx(1.0)  # 40x from 0.25 µm/px, so 10x is 1.0 µm/px


def test_non_rgb_tiff_is_refused_naming_it(tiff_slides: dict[str, Path]) -> None:
    with pytest.raises(SlideOpenError, match=r"grey\.ome\.tif: a TIFF of 1 x 16-bit samples \(minisblack\)"):
        SlideReader(tiff_slides["grey"])


def test_training_reads_tiff_tiles_lazily_as_the_tiler_stored_them(tiff_slides: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    # TileReader without stored pixels opens the slide again: through tifffile, at the recorded level
    slide = tiff_slides["ome_pyramid"]
    stored = TileReader(tile_slide(slide, tmp_path / "a", Resolution(10, "power"), 64, save_tiles=True).h5_path)
    lazy = TileReader(tile_slide(slide, tmp_path / "b", Resolution(10, "power"), 64).h5_path)
    assert lazy.info.read_level == 1 and not lazy.has_tiles and len(lazy) == len(stored) > 0
    assert all((lazy[i] == stored[i]).all() for i in range(0, len(lazy), 3))
