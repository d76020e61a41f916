"""The colour check: glass that is not bright grey, all-tissue slides, YCbCr read as RGB (and its fix)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_tiling import TileReader
from wsi_tiling.cli import main as wsi_tile
from wsi_tiling.colour import check_colours, ycbcr_to_rgb

GLASS = (240, 240, 240)
EOSIN = (230, 150, 200)
# The DICOM's frames are a second JPEG generation of the SVS's pixels (decoded and re-encoded by the
# converter): a few levels of difference per pixel on tissue, far below what YCbCr left as RGB costs.
JPEG_PSNR_DB = 27.0
JPEG_MEAN_ABS = 8.0  # mean absolute difference per channel (0-255)
# The tissue mask comes from each file's own pyramid: the SVS is single-level (its level 0 area-averaged),
# the DICOM's converter wrote its own 8x level (about 11 levels of difference per pixel), so mask edges
# move by a thumbnail pixel or two and tiles near the 50 % tissue threshold may flip.
TILE_COUNT_SLACK = 2


def _slide_like(background: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A 40 × 60 thumbnail: background with an eosin block covering a third, and its tissue mask."""
    thumbnail = np.full((40, 60, 3), background, np.uint8)
    thumbnail[10:30, 10:40] = EOSIN
    mask = np.zeros((40, 60), bool)
    mask[10:30, 10:40] = True
    return thumbnail, mask


def _as_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """RGB -> (Y, Cb, Cr) in the R, G, B channels, as the faulty converter stores them."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]]


def test_bright_grey_glass_passes() -> None:
    check = check_colours(*_slide_like(GLASS))
    assert check.background_rgb == GLASS and check.warnings == () and not check.ycbcr_as_rgb
    assert check.tissue_fraction == pytest.approx(20 * 30 / (40 * 60))


def test_ycbcr_glass_is_recognised_and_converted_back() -> None:
    rgb, mask = _slide_like(GLASS)
    ycbcr = _as_ycbcr(rgb)
    check = check_colours(ycbcr, np.ones_like(mask))  # as read, everything looked like tissue
    assert check.ycbcr_as_rgb and check.colour == "ycbcr-to-rgb"
    y, cb, cr = check.background_rgb  # grey: Y = the grey level, Cb = Cr = 128
    assert abs(y - 240) <= 1 and abs(cb - 128) <= 1 and abs(cr - 128) <= 1
    assert any("YCbCr" in w for w in check.warnings) and any("100% of the slide" in w for w in check.warnings)
    assert np.abs(ycbcr_to_rgb(ycbcr).astype(int) - rgb).max() <= 2  # 8-bit rounding both ways


def test_dark_background_is_warned_but_not_converted() -> None:
    check = check_colours(*_slide_like((5, 5, 20)))  # a fluorescence scan's dark field
    assert not check.ycbcr_as_rgb and len(check.warnings) == 1 and "not bright grey glass" in check.warnings[0]


def test_padding_outside_the_scan_stays_white() -> None:
    padded = np.full((2, 2, 3), 255, np.uint8)
    assert (ycbcr_to_rgb(padded) == 255).all()


def _pixels_match(svs: TileReader, dicom: TileReader, as_stored: bool = False) -> tuple[int, float, float]:
    """(tiles at shared coordinates, their pooled PSNR in dB, mean absolute difference); ``as_stored``
    compares the DICOM's tiles turned back into the YCbCr values OpenSlide passes through."""
    at = {tuple(xy): i for i, xy in enumerate(dicom.coords.tolist())}
    pairs = [(svs[i], dicom[at[tuple(xy)]]) for i, xy in enumerate(svs.coords.tolist()) if tuple(xy) in at]
    pairs = [(a, _as_ycbcr(b)) for a, b in pairs] if as_stored else pairs
    error = np.mean([((a.astype(np.float64) - b) ** 2).mean() for a, b in pairs])
    mean_abs = float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in pairs]))
    return len(pairs), float(10 * np.log10(255**2 / error)), mean_abs


def test_dicom_with_ycbcr_frames_tiles_like_the_svs(shared_data: Path, tmp_path: Path) -> None:
    slides = shared_data / "slides"
    out = tmp_path / "out"
    assert wsi_tile([str(slides / "CMU-1-Small-Region.svs"), str(slides / "dicom_cmu-1-small-region"), "--out",
                     str(out), "--magnification", "20", "--tile-size", "256", "--save-tiles", "--workers", "1"]) == 0
    with (out / "manifest.csv").open() as file:
        rows = {row["slide_id"]: row for row in csv.DictReader(file)}
    svs_row, dicom_row = rows["CMU-1-Small-Region"], rows["dicom_cmu-1-small-region"]
    assert svs_row["warning"] == "" and "YCbCr glass read as RGB" in dicom_row["warning"]
    svs, dicom = TileReader(svs_row["h5_path"]), TileReader(dicom_row["h5_path"])
    assert dicom.info.colour == "ycbcr-to-rgb" and svs.info.colour == "as-read"
    assert abs(len(dicom) - len(svs)) <= TILE_COUNT_SLACK  # was 88 against 33 before the fix
    shared, psnr, mean_abs = _pixels_match(svs, dicom)
    assert shared >= len(svs) - TILE_COUNT_SLACK and psnr >= JPEG_PSNR_DB and mean_abs <= JPEG_MEAN_ABS
    _, psnr_as_stored, mean_abs_as_stored = _pixels_match(svs, dicom, as_stored=True)
    assert psnr_as_stored < JPEG_PSNR_DB - 10 and mean_abs_as_stored > 5 * JPEG_MEAN_ABS
    red_bgr = (0, 0, 200)  # the QC picture's warning text
    assert (cv2.imread(str(out / "thumbnails" / "dicom_cmu-1-small-region.png")) == red_bgr).all(axis=2).any()
    assert not (cv2.imread(str(out / "thumbnails" / "CMU-1-Small-Region.png")) == red_bgr).all(axis=2).any()
