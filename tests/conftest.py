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

from wsi_tiling.synthetic import BlankPainter, StripesPainter, write_slide

REPO = Path(__file__).resolve().parents[1]

STRIPES_MPP = 0.25  # µm/px at level 0, i.e. a 40x scan
STRIPES_PERIOD_UM = 8.0
STRIPES_SIZE_PX = (4096, 3072)  # level-0 (width, height)
# Two tissue rectangles (x, y, width, height) in µm; the rest is glass.
STRIPES_TISSUE_UM = ((64.0, 64.0, 448.0, 320.0), (576.0, 448.0, 384.0, 256.0))


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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
