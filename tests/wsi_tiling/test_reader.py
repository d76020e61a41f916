"""The OpenSlide wrapper and its in-memory twin."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from wsi_tiling import InMemorySlide, SlideOpenError, SlideReader, SlideReadError
from wsi_tiling import reader as reader_module


def test_synthetic_slide_metadata(stripes_slide: Path) -> None:
    with SlideReader(stripes_slide) as slide:
        assert slide.mpp == 0.25
        assert slide.objective_power == 40
        assert slide.dimensions == (4096, 3072)
        assert slide.level_downsamples == pytest.approx((1, 4, 16))
        region = slide.read_region((0, 0), 0, (32, 16))
    assert region.shape == (16, 32, 3) and region.dtype == np.uint8


def test_missing_metadata_is_none(no_mpp_slide: Path) -> None:
    with SlideReader(no_mpp_slide) as slide:
        assert slide.mpp is None and slide.objective_power is None


def test_text_file_named_svs_is_refused_naming_it(text_as_svs: Path) -> None:
    with pytest.raises(SlideOpenError, match="notes.svs"):
        SlideReader(text_as_svs)


def test_missing_path_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SlideOpenError, match="absent.svs: no such file"):
        SlideReader(tmp_path / "absent.svs")


def test_truncated_slide_fails_naming_it(truncated_slide: Path) -> None:
    with pytest.raises((SlideOpenError, SlideReadError), match="truncated.svs"):
        with SlideReader(truncated_slide) as slide:
            width, height = slide.dimensions
            slide.read_region((0, 0), 0, (width, height))


def test_dicom_folder_opens_as_one_slide(shared_data: Path) -> None:
    with SlideReader(shared_data / "slides" / "dicom_cmu-1-small-region") as slide:
        assert slide.dimensions == (2220, 2967)
        assert len(slide.level_downsamples) == 12
        assert slide.mpp == pytest.approx(0.499)


def test_in_memory_twin_reads_levels_and_pads_with_glass() -> None:
    level0 = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    slide = InMemorySlide([level0, level0[::2, ::2]], mpp=0.5)
    assert slide.level_downsamples == (1.0, 2.0)
    # level-1 pixel (1, 1) is level-0 (2, 2); a 4 × 4 read from there runs 1 px off the edge
    region = slide.read_region((2, 2), 1, (4, 4))
    assert (region[:3, :3] == level0[2::2, 2::2][:3, :3]).all()
    assert (region[3, :] == 255).all() and (region[:, 3] == 255).all()


def test_missing_private_read_falls_back_to_the_public_one_with_one_warning(
        stripes_slide: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(reader_module, "FAST_VENDORS", frozenset())  # every read through OpenSlide
    with SlideReader(stripes_slide) as slide:
        fast = slide.read_region((200, 240), 0, (96, 64))
    monkeypatch.setattr(reader_module._PrivateApi, "usable", True)
    monkeypatch.setattr(reader_module, "lowlevel", SimpleNamespace())  # a release without it
    with caplog.at_level(logging.WARNING), SlideReader(stripes_slide) as slide:
        public = slide.read_region((200, 240), 0, (96, 64))
        slide.read_region((0, 0), 1, (32, 32))
    assert (public == fast).all()  # lossless slide: the same pixels either way
    assert caplog.text.count("_read_region is missing or changed") == 1


def test_changed_private_signature_falls_back(stripes_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader_module, "FAST_VENDORS", frozenset())
    monkeypatch.setattr(reader_module._PrivateApi, "usable", True)
    changed = SimpleNamespace(_read_region=lambda osr, x, y, level, w, h: None)  # one argument fewer
    monkeypatch.setattr(reader_module, "lowlevel", changed)
    with SlideReader(stripes_slide) as slide:
        region = slide.read_region((0, 0), 2, (16, 16))
    assert region.shape == (16, 16, 3) and not reader_module._PrivateApi.usable
