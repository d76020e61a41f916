"""Resolution values and read plans, checked against hand-computed downsamples."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from wsi_tiling import (InMemorySlide, MissingResolutionError, Resolution, ResolutionUnavailableError, mpp_to_power,
                        plan_read, power_to_mpp)


def _slide(downsamples: tuple[int, ...] = (1, 4, 16), mpp: float | None = 0.25,
           power: float | None = 40, size: int = 256) -> InMemorySlide:
    levels = [np.zeros((size // d, size // d, 3), np.uint8) for d in downsamples]
    return InMemorySlide(levels, mpp=mpp, objective_power=power, path="slide_a.svs")


@pytest.mark.parametrize(("resolution", "text"), [
    (Resolution(10, "power"), "10x"), (Resolution(2.5, "power"), "2.5x"), (Resolution(0.5, "mpp"), "0.50mpp"),
    (Resolution(0.125, "mpp"), "0.125mpp"), (Resolution(2, "level"), "level2"), (Resolution(4, "downsample"), "4ds"),
])
def test_folder_name_form_round_trips(resolution: Resolution, text: str) -> None:
    assert str(resolution) == text
    assert Resolution.parse(text) == resolution


@pytest.mark.parametrize(("value", "unit"), [(0, "mpp"), (-1, "power"), (1.5, "level"), (1, "inch")])
def test_invalid_resolution_is_refused(value: float, unit: str) -> None:
    with pytest.raises(ValueError):
        Resolution(value, unit)


@pytest.mark.parametrize(("resolution", "level", "factor", "target_mpp"), [
    (Resolution(40, "power"), 0, 1.0, 0.25),
    (Resolution(20, "power"), 0, 2.0, 0.5),  # level 1 is 4x: too coarse for a downsample of 2
    (Resolution(10, "power"), 1, 1.0, 1.0),
    (Resolution(5, "power"), 1, 2.0, 2.0),
    (Resolution(2.5, "power"), 2, 1.0, 4.0),
    (Resolution(1.0, "mpp"), 1, 1.0, 1.0),  # 1.0 / 0.25 = downsample 4
    (Resolution(0.75, "mpp"), 0, 3.0, 0.75),
    (Resolution(2, "level"), 2, 1.0, 4.0),
    (Resolution(8, "downsample"), 1, 2.0, 2.0),
])
def test_read_level_is_coarsest_not_coarser_than_target(resolution: Resolution, level: int, factor: float,
                                                        target_mpp: float) -> None:
    plan = plan_read(resolution, _slide())
    assert (plan.read_level, plan.resize_factor) == (level, pytest.approx(factor))
    assert plan.target_mpp == pytest.approx(target_mpp)
    assert plan.target_downsample == pytest.approx(plan.level_downsample * plan.resize_factor)


def test_non_integer_level_downsample_within_tolerance_is_used() -> None:
    # The TCGA slide's level 1 is 2.0005x: a 2x target reads it and shrinks by 0.99975, not level 0.
    levels = [np.zeros((3567, 4443, 3), np.uint8), np.zeros((1783, 2221, 3), np.uint8)]
    slide = InMemorySlide(levels, mpp=0.25, objective_power=40)
    plan = plan_read(Resolution(20, "power"), slide)
    assert plan.read_level == 1
    assert plan.resize_factor == pytest.approx(2 / (4443 / 2221))


def test_magnification_above_native_is_refused_unless_asked() -> None:
    with pytest.raises(ResolutionUnavailableError, match="slide_a.svs"):
        plan_read(Resolution(80, "power"), _slide())
    plan = plan_read(Resolution(80, "power"), _slide(), allow_upsample=True)
    assert (plan.read_level, plan.resize_factor) == (0, 0.5)


def test_missing_level_is_refused() -> None:
    with pytest.raises(ResolutionUnavailableError, match="slide_a.svs.*3 levels"):
        plan_read(Resolution(3, "level"), _slide())


def test_missing_mpp_and_power_names_the_file_and_the_option() -> None:
    with pytest.raises(MissingResolutionError, match=r"slide_a\.svs.*--slide-mpp"):
        plan_read(Resolution(10, "power"), _slide(mpp=None, power=None))


def test_user_mpp_overrides_metadata_and_derives_power() -> None:
    plan = plan_read(Resolution(1.0, "mpp"), _slide(mpp=None, power=None), slide_mpp=0.5)
    assert (plan.mpp_source, plan.slide_mpp, plan.target_downsample) == ("user", 0.5, 2.0)
    assert plan.slide_power == 20  # 10 µm·x / 0.5 µm/px


def test_power_only_slide_derives_mpp_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        plan = plan_read(Resolution(10, "power"), _slide(mpp=None, power=20))
    assert plan.mpp_source == "objective-power"
    assert plan.slide_mpp == pytest.approx(0.5)
    assert plan.target_mpp == pytest.approx(1.0)
    assert "slide_a.svs" in caplog.text


def test_magnification_is_relative_to_the_slides_own_power() -> None:
    # 20x from a 40x scan is a downsample of 2 whatever the µm/px says (0.2282 µm/px NDPI).
    plan = plan_read(Resolution(20, "power"), _slide(mpp=0.2282, power=40))
    assert plan.target_downsample == 2.0
    assert plan.target_mpp == pytest.approx(0.4564)


def test_power_and_mpp_convert_through_one_nominal_rule() -> None:
    # the nominal scanner: 40x is 0.25 µm/px, 20x 0.5, 10x 1.0
    assert power_to_mpp(40) == pytest.approx(0.25) and power_to_mpp(10) == pytest.approx(1.0)
    assert mpp_to_power(0.5) == pytest.approx(20) and mpp_to_power(power_to_mpp(2.5)) == pytest.approx(2.5)
