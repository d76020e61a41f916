"""Matching a new slide to what the model saw: physical (the checkpoint's µm/px) or nominal (its "20x")."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pathology.checkpoint import ModelSpec
from pathology.inference.match import UpsamplingRequiredError, resolution_for_slide, store_matches
from wsi_tiling import InMemorySlide, Resolution, plan_read, read_store_info, tile_slide

# A model trained at "20x" on a 0.25 µm/px, 40x scanner: its tiles were 0.50 µm/px.
SPEC = ModelSpec("efficientformer_tiny", {32: 1}, ("neg", "pos"), 32, 32, Resolution(20, "power"),
                 tile_mpp=0.50, tile_mpp_spread=0.0)


def _slide(mpp: float, power: float, name: str) -> InMemorySlide:
    level0 = np.full((64, 64, 3), 240, np.uint8)
    return InMemorySlide([level0, level0[::4, ::4]], mpp=mpp, objective_power=power, path=name)


def test_physical_match_asks_the_training_mpp_of_another_scanner() -> None:
    hamamatsu = _slide(0.2282, 40, "hamamatsu.ndpi")
    resolution = resolution_for_slide(SPEC, hamamatsu)
    assert resolution == Resolution(0.50, "mpp")
    assert plan_read(resolution, hamamatsu).target_mpp == pytest.approx(0.50, rel=0.01)


def test_nominal_match_asks_the_requested_power_relative_to_the_slide() -> None:
    hamamatsu = _slide(0.2282, 40, "hamamatsu.ndpi")
    resolution = resolution_for_slide(SPEC, hamamatsu, "nominal")
    assert resolution == Resolution(20, "power")
    assert plan_read(resolution, hamamatsu).target_mpp == pytest.approx(2 * 0.2282, rel=0.01)  # 0.456


def test_a_slide_coarser_than_the_model_is_refused_naming_it_and_the_option() -> None:
    coarse = _slide(0.52, 20, "coarse.svs")  # a 20x scan: 0.52 µm/px cannot become 0.50 without interpolating
    with pytest.raises(UpsamplingRequiredError, match=r"coarse\.svs: .*0\.5 µm/px.*0\.52 µm/px.*--allow-upsample"):
        resolution_for_slide(SPEC, coarse)
    assert resolution_for_slide(SPEC, coarse, allow_upsample=True) == Resolution(0.50, "mpp")
    # 0.504 µm/px is within 1 % of 0.50: reading it at scale 0.992 is not upsampling
    assert resolution_for_slide(SPEC, _slide(0.504, 20, "within.svs")) == Resolution(0.50, "mpp")


def test_old_checkpoint_falls_back_to_nominal_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        resolution = resolution_for_slide(replace(SPEC, tile_mpp=None), _slide(0.2282, 40, "old.ndpi"))
    assert resolution == Resolution(20, "power") and "old.ndpi" in caplog.text


def test_unknown_match_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="physical"):
        resolution_for_slide(SPEC, _slide(0.25, 40, "a.svs"), "magnification")


def test_stores_are_reused_within_one_percent_of_the_wanted_mpp(stripes_slide: Path, tmp_path: Path) -> None:
    info = read_store_info(tile_slide(stripes_slide, tmp_path, Resolution(0.5, "mpp"), 32).h5_path)
    assert store_matches(info, 0.5, 32, stripes_slide)
    assert store_matches(info, 0.504, 32, stripes_slide)  # 0.8 % apart
    assert not store_matches(info, 0.456, 32, stripes_slide)  # the nominal 20x of a 0.2282 µm/px scan
    assert not store_matches(info, 0.5, 64, stripes_slide)
    assert not store_matches(info, 0.5, 32, tmp_path / "other.svs")
    assert not store_matches(info, 0.5, 32, stripes_slide, slide_mpp=0.25)  # made from the metadata, not a user value
