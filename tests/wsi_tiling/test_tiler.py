"""tile_slide against physics, against OpenSlide, and on bad inputs."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest
from tests.conftest import STRIPES_MPP, STRIPES_PERIOD_UM, inside_tissue_boxes, stripe_period_px

from wsi_tiling import (InvalidParameterError, MissingResolutionError, OutputError, Resolution,
                        ResolutionUnavailableError, SlideOpenError, SlideReadError, TileReader,
                        tile_slide)
from wsi_tiling import tiler as tiler_module
from wsi_tiling.cli import main as wsi_tile
from wsi_tiling.colour import ycbcr_to_rgb
from wsi_tiling.synthetic import StripesPainter, write_slide
from wsi_tiling.tissue import TissueParams

TILE_UM = 96.0  # small enough that whole tiles fit inside the stripes slide's tissue boxes


@pytest.mark.parametrize(("resolution", "target_mpp"), [
    (Resolution(20, "power"), 0.5), (Resolution(10, "power"), 1.0), (Resolution(5, "power"), 2.0),
    (Resolution(0.8, "mpp"), 0.8), (Resolution(1.3, "mpp"), 1.3),
])
def test_stripe_period_has_its_physical_size(stripes_slide: Path, tmp_path: Path, resolution: Resolution,
                                              target_mpp: float) -> None:
    tile_size = round(TILE_UM / target_mpp)
    result = tile_slide(stripes_slide, tmp_path, resolution, tile_size, save_tiles=True)
    reader = TileReader(result.h5_path)
    inside = np.flatnonzero(inside_tissue_boxes(reader.coords, tile_size * target_mpp))
    assert len(inside) >= 1
    expected_px = STRIPES_PERIOD_UM / target_mpp
    for index in inside:
        assert stripe_period_px(reader[index]) == pytest.approx(expected_px, rel=0.01)
    assert reader.attrs["target_mpp"] == pytest.approx(target_mpp)


def test_upsampling_when_asked_keeps_the_physical_size(stripes_slide: Path, tmp_path: Path) -> None:
    # 80x from a 40x scan: 0.125 µm/px, so the 8 µm period spans 64 pixels.
    result = tile_slide(stripes_slide, tmp_path, Resolution(80, "power"), 512, save_tiles=True, allow_upsample=True)
    assert result.plan is not None and result.plan.resize_factor == 0.5
    reader = TileReader(result.h5_path)
    inside = np.flatnonzero(inside_tissue_boxes(reader.coords, 512 * 0.125))
    assert len(inside) >= 1
    for index in inside:
        assert stripe_period_px(reader[index]) == pytest.approx(64.0, rel=0.01)


def _pooled_psnr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    error = np.mean([((a.astype(np.float64) - b) ** 2).mean() for a, b in pairs])
    return float("inf") if error == 0 else 10 * np.log10(255**2 / error)


# Footprints are whole level-0 pixels here (a sub-pixel shift alone costs ~25 dB on sharp H&E), so
# "the same region read at level 0" is well defined; the real slides' pyramid levels are compressed
# on their own, hence the lower bound when a level other than 0 is read.
# The DICOM's frames are YCbCr declared RGB: its tiles are the level-0 read converted to RGB.
@pytest.mark.parametrize(("name", "resolution", "tile_size", "read_level", "min_psnr", "ycbcr"), [
    ("CMU-1-Small-Region.svs", Resolution(10, "power"), 128, 0, 40.0, False),  # single level: factor 2
    ("CMU-1-Small-Region.svs", Resolution(0.7984, "mpp"), 125, 0, 40.0, False),  # factor 1.6, footprint 200
    ("stritt_test3-DAPI-2-387.ndpi", Resolution(10, "power"), 128, 2, 30.0, False),  # its own 4x level
    ("dicom_cmu-1-small-region", Resolution(10, "power"), 128, 1, 30.0, True),  # its own 2.0003x level
])
def test_tiles_equal_level0_read_and_area_resize(shared_data: Path, tmp_path: Path, name: str,
                                                  resolution: Resolution, tile_size: int, read_level: int,
                                                  min_psnr: float, ycbcr: bool) -> None:
    slide_path = shared_data / "slides" / name
    result = tile_slide(slide_path, tmp_path, resolution, tile_size, min_tissue=0.0, save_tiles=True, threads=2)
    assert result.plan is not None and result.plan.read_level == read_level
    reader = TileReader(result.h5_path)
    footprint = round(tile_size * result.plan.target_downsample)
    pairs = []
    with openslide.OpenSlide(next(slide_path.glob("*.dcm")) if slide_path.is_dir() else slide_path) as slide:
        for index in np.linspace(0, len(reader) - 1, 12).astype(int):
            x, y = reader.coords[index]
            level0 = np.asarray(slide.read_region((int(x), int(y)), 0, (footprint, footprint)).convert("RGB"))
            level0 = ycbcr_to_rgb(level0) if ycbcr else level0
            pairs.append((reader[index], cv2.resize(level0, (tile_size,) * 2, interpolation=cv2.INTER_AREA)))
    assert _pooled_psnr(pairs) >= min_psnr


def test_coarse_tile_is_the_2x2_fine_tiles_under_it(stripes_slide: Path, tmp_path: Path) -> None:
    coarse = TileReader(tile_slide(stripes_slide, tmp_path, Resolution(5, "power"), 64, min_tissue=0.0,
                                   save_tiles=True).h5_path)
    fine = TileReader(tile_slide(stripes_slide, tmp_path, Resolution(10, "power"), 64, min_tissue=0.0,
                                 save_tiles=True, threads=2).h5_path)  # blocks read by two threads
    fine_at = {tuple(xy): i for i, xy in enumerate(fine.coords.tolist())}
    step = 64 * 4  # one 10x tile is 256 level-0 px on a 40x slide
    for index in range(0, len(coarse), 7):
        x, y = coarse.coords[index]
        quad = [[fine[fine_at[(x + dx * step, y + dy * step)]] for dx in (0, 1)] for dy in (0, 1)]
        mosaic = np.concatenate([np.concatenate(row, axis=1) for row in quad], axis=0)
        # lossless slide, both read from level 1: an exact 2 × 2 area average
        assert (cv2.resize(mosaic, (64, 64), interpolation=cv2.INTER_AREA) == coarse[index]).all()


def test_overlap_steps_by_tile_minus_overlap(stripes_slide: Path, tmp_path: Path) -> None:
    result = tile_slide(stripes_slide, tmp_path, Resolution(10, "power"), 64, overlap=16, min_tissue=0.0)
    coords = TileReader(result.h5_path).coords
    # step (64 - 16) × 4 = 192 level-0 px; footprint 256: (4096 - 256) // 192 + 1 = 21 columns, 15 rows
    assert sorted(set(coords[:, 0].tolist())) == [192 * i for i in range(21)]
    assert len(coords) == 21 * 15
    assert result.h5_path.parent.parent.name == "10x_64px_16px_overlap"


def test_store_records_what_was_asked_and_delivered(stripes_slide: Path, tmp_path: Path) -> None:
    result = tile_slide(stripes_slide, tmp_path, Resolution(10, "power"), 128, slide_id="case 7")
    assert result.h5_path == tmp_path / "10x_128px_0px_overlap" / "patches" / "case 7.h5"
    attrs = TileReader(result.h5_path).attrs
    expected = {"patch_size": 128, "patch_level": 1, "patch_size_level0": 512, "level0_magnification": 40,
                "target_magnification": 10, "target_mpp": 1.0, "slide_mpp": 0.25, "mpp_source": "metadata",
                "read_level": 1, "resize_factor": 1.0, "level0_width": 4096, "level0_height": 3072,
                "overlap": 0, "name": "case 7", "level_dim": [1024, 768], "downsample": [4.0, 4.0]}
    assert {key: attrs[key] for key in expected} == expected
    with h5py.File(result.h5_path) as file:
        assert file["coords"].dtype == np.int64 and "tiles" not in file
        assert file["tissue_fraction"][:].min() >= 0.5


def test_lazy_reader_equals_stored_tiles(stripes_slide: Path, tmp_path: Path) -> None:
    stored = TileReader(tile_slide(stripes_slide, tmp_path / "a", Resolution(20, "power"), 128,
                                   save_tiles=True).h5_path)
    lazy = TileReader(tile_slide(stripes_slide, tmp_path / "b", Resolution(20, "power"), 128).h5_path)
    assert not lazy.has_tiles and len(lazy) == len(stored) > 0
    for index in range(0, len(lazy), 5):
        assert (lazy[index] == stored[index]).all()


def test_threads_split_the_slide_into_balanced_blocks_with_the_same_tiles(stripes_slide: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    block_sizes: list[int] = []
    cut = tiler_module._read_block

    def counting(slide, plan, indices, *args):  # noqa: ANN001, ANN202 - a pass-through spy
        block_sizes.append(len(indices))
        return cut(slide, plan, indices, *args)

    monkeypatch.setattr(tiler_module, "_read_block", counting)
    one = TileReader(tile_slide(stripes_slide, tmp_path / "1", Resolution(10, "power"), 32, min_tissue=0,
                                save_tiles=True).h5_path)
    assert len(block_sizes) == 1  # one thread: the largest block memory allows (the whole slide here)
    block_sizes.clear()
    four = TileReader(tile_slide(stripes_slide, tmp_path / "4", Resolution(10, "power"), 32, min_tissue=0,
                                 save_tiles=True, threads=4).h5_path)
    assert len(block_sizes) >= tiler_module.BLOCKS_PER_THREAD * 4 and max(block_sizes) <= len(four) / 8
    assert (one.coords == four.coords).all()
    assert all((one[i] == four[i]).all() for i in range(len(one)))


def test_one_slide_decodes_its_thumbnail_once(stripes_slide: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    thumbnail = tiler_module.read_thumbnail
    monkeypatch.setattr(tiler_module, "read_thumbnail", lambda slide, *a, **k: reads.append(slide.path) or
                        thumbnail(slide, *a, **k))
    copy = tmp_path / "copy.svs"
    copy.write_bytes(stripes_slide.read_bytes())
    assert wsi_tile([str(copy), "--out", str(tmp_path / "out"), "--magnification", "10", "5", "2.5",
                     "--tile-size", "64", "--workers", "1"]) == 0
    assert len(reads) == 1  # three resolutions and the QC picture share one tissue detection
    tiles_before = len(TileReader(next((tmp_path / "out").glob("10x_*/patches/copy.h5"))))
    blank = TissueParams(min_saturation=255)  # new settings: detected again, and nothing is tissue
    assert tile_slide(copy, tmp_path / "blank", Resolution(10, "power"), 64, tissue=blank).status == "no-tissue"
    assert len(reads) == 2
    painter = StripesPainter(STRIPES_MPP, STRIPES_PERIOD_UM, ((0.0, 0.0, 100.0, 100.0),))  # a smaller tissue box
    write_slide(copy, painter, (3072, 3072), mpp=STRIPES_MPP, objective_power=40, downsamples=(1, 4, 16))
    rewritten = tile_slide(copy, tmp_path / "rewritten", Resolution(10, "power"), 64)
    assert len(reads) == 3 and 0 < rewritten.n_tiles < tiles_before  # a changed file is detected again


def test_blank_slide_is_no_tissue_not_a_crash(blank_slide: Path, tmp_path: Path) -> None:
    result = tile_slide(blank_slide, tmp_path, Resolution(10, "power"), 64, save_tiles=True)
    assert (result.status, result.n_tiles) == ("no-tissue", 0)
    assert len(TileReader(result.h5_path)) == 0


def test_resume_skips_only_identical_settings(stripes_slide: Path, tmp_path: Path) -> None:
    first = tile_slide(stripes_slide, tmp_path, Resolution(10, "power"), 128)
    again = tile_slide(stripes_slide, tmp_path, Resolution(10, "power"), 128, resume=True)
    changed = tile_slide(stripes_slide, tmp_path, Resolution(10, "power"), 128, min_tissue=0.9, resume=True)
    assert (first.status, again.status, changed.status) == ("ok", "skipped", "ok")
    assert again.n_tiles == first.n_tiles > changed.n_tiles


def test_power_only_slide_records_mpp_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    painter = StripesPainter(0.5, 8.0, ((0.0, 0.0, 512.0, 512.0),))
    slide = write_slide(tmp_path / "power_only.svs", painter, (1024, 1024), mpp=None, objective_power=20,
                        downsamples=(1, 4))
    with caplog.at_level(logging.WARNING):
        result = tile_slide(slide, tmp_path, Resolution(10, "power"), 64)
    attrs = TileReader(result.h5_path).attrs
    assert (attrs["mpp_source"], attrs["slide_mpp"], attrs["target_mpp"]) == ("objective-power", 0.5, 1.0)
    assert "power_only.svs" in caplog.text


def test_user_mpp_rescues_a_slide_without_metadata(no_mpp_slide: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingResolutionError, match="no_mpp.svs.*--slide-mpp"):
        tile_slide(no_mpp_slide, tmp_path, Resolution(10, "power"), 64)
    result = tile_slide(no_mpp_slide, tmp_path, Resolution(1.0, "mpp"), 64, slide_mpp=0.25)
    assert result.status == "ok" and result.plan is not None and result.plan.mpp_source == "user"


@pytest.mark.parametrize(("fixture", "error"), [
    ("text_as_svs", SlideOpenError), ("truncated_slide", (SlideOpenError, SlideReadError)),
])
def test_broken_files_raise_naming_the_file(request: pytest.FixtureRequest, tmp_path: Path, fixture: str,
                                            error: type[Exception]) -> None:
    path = request.getfixturevalue(fixture)
    with pytest.raises(error, match=path.name):
        tile_slide(path, tmp_path, Resolution(10, "power"), 64, save_tiles=True)
    assert not list(tmp_path.rglob("*.h5")) and not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"resolution": Resolution(80, "power")}, ResolutionUnavailableError, "finer than the slide"),
    ({"tile_size": 0}, InvalidParameterError, "tile size"),
    ({"overlap": -1}, InvalidParameterError, "overlap"),
    ({"overlap": 64}, InvalidParameterError, "overlap"),
])
def test_bad_settings_raise_naming_the_slide(stripes_slide: Path, tmp_path: Path, kwargs: dict,
                                             error: type[Exception], message: str) -> None:
    arguments = {"resolution": Resolution(10, "power"), "tile_size": 64, **kwargs}
    with pytest.raises(error, match=f"stripes.svs.*{message}"):
        tile_slide(stripes_slide, tmp_path, arguments.pop("resolution"), arguments.pop("tile_size"), **arguments)


def test_unwritable_output_names_the_folder(stripes_slide: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="a_file"):
        tile_slide(stripes_slide, blocker / "out", Resolution(10, "power"), 64)
