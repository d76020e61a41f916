"""Resolution as a value with a unit, and the one place where units become a read plan.

Every unit a user may ask for (µm/px, objective power, pyramid level, downsample) is turned into
"read this pyramid level, then scale by this residual factor" here, from the slide's own
metadata, so a tile said to be at 10x or 1.0 µm/px really is at that resolution on every scanner.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import InvalidParameterError, MissingResolutionError, ResolutionUnavailableError

__all__ = ["Resolution", "ReadPlan", "SlideMetadata", "plan_read", "power_to_mpp", "mpp_to_power", "UNITS"]

log = logging.getLogger(__name__)

UNITS = ("mpp", "power", "level", "downsample")
MPP_TIMES_POWER = 10.0  # µm/px × objective power of a typical scanner (40x ≈ 0.25 µm/px)
STANDARD_POWERS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)
POWER_SNAP_RATIO = 1.25  # a derived power within this ratio of a standard one is snapped to it
SCALE_TOLERANCE = 0.01  # relative: a level 1 % finer than asked still counts as "not upsampling"
_TEXT_FORMS = {"x": "power", "mpp": "mpp", "ds": "downsample"}


@dataclass(frozen=True)
class Resolution:
    """A resolution asked for by the user: a number and its unit.

    Attributes:
        value: the number; µm/px for ``mpp``, objective magnification for ``power``, a pyramid
            index for ``level``, a factor from level 0 for ``downsample``.
        unit: one of ``mpp``, ``power``, ``level``, ``downsample``.
    """

    value: float
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown resolution unit {self.unit!r}; use one of {UNITS}")
        if self.unit == "level" and (self.value < 0 or self.value != int(self.value)):
            raise ValueError(f"a pyramid level is a whole number >= 0, got {self.value}")
        if self.unit != "level" and not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"a resolution in {self.unit} must be a positive number, got {self.value}")

    def __str__(self) -> str:
        """The folder-name form: ``10x``, ``0.50mpp``, ``level2``, ``4ds``."""
        if self.unit == "power":
            return f"{self.value:g}x"
        if self.unit == "mpp":
            return f"{self.value:.2f}mpp" if round(self.value, 2) == self.value else f"{self.value:g}mpp"
        if self.unit == "level":
            return f"level{int(self.value)}"
        return f"{self.value:g}ds"

    @classmethod
    def parse(cls, text: str) -> Resolution:
        """Reads the folder-name form back (``"10x"``, ``"0.50mpp"``, ``"level2"``, ``"4ds"``).

        Raises:
            ValueError: the text is none of those forms.
        """
        match = re.fullmatch(r"\s*(level)?([0-9]*\.?[0-9]+)(x|mpp|ds)?\s*", text.lower())
        if match is None or bool(match.group(1)) == bool(match.group(3)):
            raise ValueError(f"cannot read a resolution from {text!r}; write e.g. 10x, 0.5mpp, level2 or 4ds")
        unit = "level" if match.group(1) else _TEXT_FORMS[match.group(3)]
        return cls(float(match.group(2)), unit)


class SlideMetadata(Protocol):
    """What :func:`plan_read` needs from a slide (a :class:`~wsi_tiling.reader.SlideReader`)."""

    @property
    def path(self) -> Path: ...
    @property
    def mpp(self) -> float | None: ...
    @property
    def objective_power(self) -> float | None: ...
    @property
    def level_downsamples(self) -> tuple[float, ...]: ...


@dataclass(frozen=True)
class ReadPlan:
    """How to produce tiles at a resolution from one slide: what was asked and what is delivered.

    Attributes:
        target_downsample: level-0 pixels per output pixel.
        read_level: the pyramid level read (the coarsest one at least as fine as the target).
        level_downsample: that level's downsample from level 0.
        resize_factor: read-level pixels per output pixel (1 = no resampling, > 1 = shrink).
        target_mpp: µm/px of the output tiles.
        target_power: objective power of the output tiles (relative to ``slide_power``).
        slide_mpp: level-0 µm/px used.
        slide_power: level-0 objective power used.
        mpp_source: where ``slide_mpp`` came from: ``metadata``, ``user`` or ``objective-power``.
    """

    target_downsample: float
    read_level: int
    level_downsample: float
    resize_factor: float
    target_mpp: float
    target_power: float
    slide_mpp: float
    slide_power: float
    mpp_source: str


def power_to_mpp(power: float) -> float:
    """Nominal µm/px of an objective power (:data:`MPP_TIMES_POWER` / power: 40x is 0.25 µm/px).

    Only for slides, configs and plots that know nothing better: a slide's own µm/px or a store's
    delivered ``target_mpp`` is the physical truth.
    """
    return MPP_TIMES_POWER / power


def mpp_to_power(mpp: float) -> float:
    """Nominal objective power of a µm/px (the inverse of :func:`power_to_mpp`)."""
    return MPP_TIMES_POWER / mpp


def _snap_power(power: float) -> float:
    nearest = min(STANDARD_POWERS, key=lambda p: abs(math.log(power / p)))
    return nearest if abs(math.log(power / nearest)) < math.log(POWER_SNAP_RATIO) else power


def _slide_scale(slide: SlideMetadata, slide_mpp: float | None) -> tuple[float, float, str]:
    """Level-0 (µm/px, objective power, mpp source); fills one from the other with a warning."""
    power = slide.objective_power
    if slide_mpp is not None:
        mpp, source = slide_mpp, "user"
    elif slide.mpp is not None:
        mpp, source = slide.mpp, "metadata"
    elif power is not None:
        mpp, source = power_to_mpp(power), "objective-power"
        log.warning("%s: no µm/px in the metadata; assuming %.4g µm/px from its %gx objective "
                    "(pass --slide-mpp to set it)", slide.path, mpp, power)
    else:
        raise MissingResolutionError(slide.path, "no µm/px or objective power in the slide's metadata; "
                                     "give it with --slide-mpp (or an 'mpp' column in the CSV)")
    if power is None:
        power = _snap_power(mpp_to_power(mpp))
        log.info("%s: no objective power in the metadata; taking %gx from %.4g µm/px", slide.path, power, mpp)
    return mpp, power, source


def _target_downsample(resolution: Resolution, slide: SlideMetadata, mpp: float, power: float) -> float:
    if resolution.unit == "mpp":
        return resolution.value / mpp
    if resolution.unit == "power":
        return power / resolution.value
    if resolution.unit == "downsample":
        return resolution.value
    level = int(resolution.value)
    if level >= len(slide.level_downsamples):
        raise ResolutionUnavailableError(
            slide.path, f"level {level} asked for but the slide has {len(slide.level_downsamples)} levels")
    return slide.level_downsamples[level]


def _read_level(downsamples: Sequence[float], target_downsample: float) -> int:
    """The coarsest level not coarser than the target (within :data:`SCALE_TOLERANCE`)."""
    usable = [i for i, d in enumerate(downsamples) if d <= target_downsample * (1 + SCALE_TOLERANCE)]
    return max(usable, key=lambda i: downsamples[i]) if usable else 0


def plan_read(resolution: Resolution, slide: SlideMetadata, *, slide_mpp: float | None = None,
              allow_upsample: bool = False) -> ReadPlan:
    """Turns a requested resolution into a read level and a residual scale for one slide.

    Args:
        resolution: what the user asked for.
        slide: the slide's metadata (level-0 µm/px, objective power, level downsamples).
        slide_mpp: level-0 µm/px overriding the metadata (e.g. ``--slide-mpp`` or a CSV column).
        allow_upsample: permit a target finer than the slide's level 0 (interpolated pixels).

    Returns:
        The read plan, recording the target and the slide's µm/px and power used.

    Raises:
        MissingResolutionError: neither µm/px nor objective power is known.
        ResolutionUnavailableError: the target is finer than level 0 and upsampling is not allowed,
            or a level the slide lacks was asked for.
        InvalidParameterError: ``slide_mpp`` is not a positive number.
    """
    if slide_mpp is not None and not slide_mpp > 0:
        raise InvalidParameterError(slide.path, f"slide µm/px must be positive, got {slide_mpp}")
    mpp, power, source = _slide_scale(slide, slide_mpp)
    target_ds = _target_downsample(resolution, slide, mpp, power)
    if target_ds * (1 + SCALE_TOLERANCE) < 1 and not allow_upsample:
        raise ResolutionUnavailableError(
            slide.path, f"{resolution} is finer than the slide's own {power:g}x / {mpp:.4g} µm/px; "
            "pick a lower resolution or pass --allow-upsample")
    level = _read_level(slide.level_downsamples, target_ds)
    level_ds = slide.level_downsamples[level]
    return ReadPlan(target_downsample=target_ds, read_level=level, level_downsample=level_ds,
                    resize_factor=target_ds / level_ds, target_mpp=mpp * target_ds,
                    target_power=power / target_ds, slide_mpp=mpp, slide_power=power, mpp_source=source)
