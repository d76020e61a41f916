"""Shared fixtures: tiny synthetic slides with known physical patterns, broken files, real data.

Everything is written to pytest's temporary folders; real slides are read from
``../shared/data`` (or ``$PATHOLOGY_TEST_DATA``) and their tests skip when it is absent, unless
``$PATHOLOGY_REQUIRE_TEST_DATA`` is set (CI), which makes them fail instead.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_tiling import Resolution, tile_slide
from wsi_tiling.synthetic import BlankPainter, StripesPainter, write_slide

REPO = Path(__file__).resolve().parents[1]

STRIPES_MPP = 0.25  # µm/px at level 0, i.e. a 40x scan
STRIPES_PERIOD_UM = 8.0
TIFF_TILE_PX = 256  # TIFF tile edge of write_tiff's tiled layout
STRIPES_SIZE_PX = (4096, 3072)  # level-0 (width, height)
# Two tissue rectangles (x, y, width, height) in µm; the rest is glass.
STRIPES_TISSUE_UM = ((64.0, 64.0, 448.0, 320.0), (576.0, 448.0, 384.0, 256.0))


def stripe_period_px(tile: np.ndarray) -> float:
    """Stripe period of a tile of vertical stripes, from sub-pixel dark-to-bright crossings."""
    profile = tile.astype(np.float64).mean(axis=(0, 2))
    middle = (profile.max() + profile.min()) / 2
    rising = np.flatnonzero((profile[:-1] <= middle) & (profile[1:] > middle))
    crossings = rising + (middle - profile[rising]) / (profile[rising + 1] - profile[rising])
    return (crossings[-1] - crossings[0]) / (len(crossings) - 1)


def inside_tissue_boxes(coords: np.ndarray, footprint_um: float) -> np.ndarray:
    """Which tiles of a stripes slide (level-0 coords, footprint in µm) lie wholly inside its tissue boxes."""
    x_um, y_um = coords[:, 0] * STRIPES_MPP, coords[:, 1] * STRIPES_MPP
    inside = np.zeros(len(coords), bool)
    for bx, by, bw, bh in STRIPES_TISSUE_UM:
        inside |= (x_um >= bx) & (x_um + footprint_um <= bx + bw) & (y_um >= by) & (y_um + footprint_um <= by + bh)
    return inside


def write_tiff(path: Path, levels: list[np.ndarray], *, tiled: bool, ome: bool, metadata: dict | None = None,
               resolution: tuple[float, float, str] | None = None) -> Path:
    """Writes an OME-TIFF or plain TIFF that OpenSlide cannot read as a slide: level 0 with the
    others as SubIFDs (how QuPath and bfconvert write pyramids), lossless.

    Args:
        levels: (H, W, 3) uint8 images, level 0 first.
        tiled: TIFF tiles of :data:`TIFF_TILE_PX`, else strips.
        ome: OME-TIFF, with ``metadata`` (``PhysicalSizeX``...) in its OME-XML.
        resolution: (x, y, unit) resolution tags, e.g. pixels per ``CENTIMETER``.
    """
    layout = {"tile": (TIFF_TILE_PX, TIFF_TILE_PX)} if tiled else {"rowsperstrip": 64}
    extra = {} if resolution is None else {"resolution": resolution[:2], "resolutionunit": resolution[2]}
    with tifffile.TiffWriter(path, ome=ome) as tif:
        tif.write(levels[0], photometric="rgb", compression="zlib", subifds=len(levels) - 1,
                  metadata=metadata if ome else None, **layout, **extra)
        for level in levels[1:]:
            tif.write(level, photometric="rgb", compression="zlib", subfiletype=1, **layout, **extra)
    return path


REQUIRE_DATA_ENV = "PATHOLOGY_REQUIRE_TEST_DATA"  # set by .ci/run: CI must never skip the real-data tests


def real_data_root(environ: Mapping[str, str]) -> Path:
    """The real test data folder of ``environ``; skips the calling test when it is absent, or fails
    it when ``$PATHOLOGY_REQUIRE_TEST_DATA`` is set (a skip in CI would hide a missing folder)."""
    root = Path(environ.get("PATHOLOGY_TEST_DATA", REPO.parent / "shared" / "data"))
    if not root.is_dir():
        reason = f"real test data not found at {root} (set PATHOLOGY_TEST_DATA)"
        if environ.get(REQUIRE_DATA_ENV):
            pytest.fail(f"{reason}; {REQUIRE_DATA_ENV} is set, so the real-data tests must run")
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real test data folder; skips the test when it is not there (see :func:`real_data_root`)."""
    return real_data_root(os.environ)


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def stripes_slide(slides_dir: Path) -> Path:
    """40x, 0.25 µm/px, 3 levels (1, 4, 16), lossless; 8 µm stripes inside two tissue boxes."""
    painter = StripesPainter(STRIPES_MPP, STRIPES_PERIOD_UM, STRIPES_TISSUE_UM)
    return write_slide(slides_dir / "stripes.svs", painter, STRIPES_SIZE_PX, mpp=STRIPES_MPP,
                       objective_power=40, downsamples=(1, 4, 16), compression="zlib")


@pytest.fixture(scope="session")
def blank_slide(slides_dir: Path) -> Path:
    """A slide of empty glass: tiling must report 'no tissue', not crash."""
    return write_slide(slides_dir / "blank.svs", BlankPainter(), (1024, 1024), downsamples=(1, 4))


@pytest.fixture(scope="session")
def no_mpp_slide(slides_dir: Path) -> Path:
    """Neither µm/px nor objective power in the metadata."""
    painter = StripesPainter(STRIPES_MPP, STRIPES_PERIOD_UM, ((0.0, 0.0, 200.0, 200.0),))
    return write_slide(slides_dir / "no_mpp.svs", painter, (1024, 1024), mpp=None,
                       objective_power=None, downsamples=(1, 4))


@pytest.fixture(scope="session")
def text_as_svs(slides_dir: Path) -> Path:
    """A text file renamed .svs."""
    path = slides_dir / "notes.svs"
    path.write_text("this is not a slide\n")
    return path


@pytest.fixture(scope="session")
def truncated_slide(stripes_slide: Path, slides_dir: Path) -> Path:
    """The stripes slide cut to a third of its bytes, as after an interrupted copy."""
    data = stripes_slide.read_bytes()
    path = slides_dir / "truncated.svs"
    path.write_bytes(data[: len(data) // 3])
    return path


# Level-0 µm/px of 40x scanners: two within 1 % of each other, and a Hamamatsu-like one 9 % finer.
SCANNER_MPP = {"aperio_a": 0.25, "aperio_b": 0.25, "close_a": 0.2475, "close_b": 0.2475, "hamamatsu": 0.2282}
SCANNER_TILE_PX = 64


@pytest.fixture(scope="session")
def scanner_stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``patches/`` of one small stripes slide per entry of :data:`SCANNER_MPP`, each a 40x scan,
    tiled at 10x (downsample 4, so 1.0, 0.99 or 0.9128 µm/px delivered), 64 px tiles."""
    root = tmp_path_factory.mktemp("scanners")
    (root / "slides").mkdir()
    h5_dir = None
    for slide_id, mpp in SCANNER_MPP.items():
        painter = StripesPainter(mpp, STRIPES_PERIOD_UM, ((0.0, 0.0, 600.0, 600.0),))
        size = round(640 / mpp)
        slide = write_slide(root / "slides" / f"{slide_id}.svs", painter, (size, size), mpp=mpp, objective_power=40,
                            downsamples=(1, 4), compression="zlib")
        h5_dir = tile_slide(slide, root / "tiles", Resolution(10, "power"), SCANNER_TILE_PX).h5_path.parent
    assert h5_dir is not None
    return h5_dir


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
