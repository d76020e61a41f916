"""Which resolution to tile a new slide at so the model sees what it saw in training.

A checkpoint records the resolution training asked for (``"20x"``) and the µm/px its tiles were
delivered at (:attr:`~pathology.checkpoint.ModelSpec.tile_mpp`). ``physical`` matching (the
default) asks every slide for that µm/px, whatever its scanner and objective: a model trained at
"20x" on 0.25 µm/px scans (0.50 µm/px tiles) gets 0.50 µm/px tiles of a 0.2282 µm/px Hamamatsu
scan too. ``nominal`` matching re-asks the requested resolution relative to each slide's own
objective (0.456 µm/px on that scan): magnification semantics, as before checkpoints recorded
µm/px. Pure functions; the caller opens the slide and records what was read.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pathology.checkpoint import ModelSpec
from wsi_tiling import Resolution, ResolutionUnavailableError, StoreInfo, plan_read
from wsi_tiling.resolution import SCALE_TOLERANCE, SlideMetadata

__all__ = ["MATCH_MODES", "STORE_MPP_TOLERANCE", "UpsamplingRequiredError", "match_for_checkpoint",
           "resolution_for_slide", "store_matches"]

log = logging.getLogger(__name__)

MATCH_MODES = ("physical", "nominal")
STORE_MPP_TOLERANCE = 0.01  # relative: an existing store is reused when it delivered µm/px this close
UPSAMPLE_OPTION = "--allow-upsample"


class UpsamplingRequiredError(ResolutionUnavailableError):
    """The model's µm/px is finer than the slide's own: reaching it would interpolate pixels."""


def _check_mode(match: str) -> None:
    if match not in MATCH_MODES:
        raise ValueError(f"match must be one of {MATCH_MODES}, got {match!r}")


def _records_physics(spec: ModelSpec) -> bool:
    """Whether physical matching has a µm/px to ask for: the tiles' (or a request that was in µm/px)."""
    return spec.tile_mpp is not None or spec.resolution.unit == "mpp"


def match_for_checkpoint(spec: ModelSpec, match: str, checkpoint: Path) -> str:
    """The match mode a run uses with this checkpoint: ``nominal`` when ``physical`` has nothing to ask.

    A checkpoint written before training recorded its tiles' µm/px (or trained on image tiles,
    which carry none) and asked in objective power can only be matched nominally; that is said
    once, naming the checkpoint. One asked in µm/px is physical either way.

    Raises:
        ValueError: ``match`` is not one of :data:`MATCH_MODES`.
    """
    _check_mode(match)
    if match == "physical" and not _records_physics(spec):
        log.warning("%s: the checkpoint does not record its tiles' µm/px; every slide is tiled at the requested "
                    "%s relative to its own objective (--match nominal)", checkpoint, spec.resolution)
        return "nominal"
    return match


def resolution_for_slide(spec: ModelSpec, slide: SlideMetadata, match: str = "physical", *,
                         slide_mpp: float | None = None, allow_upsample: bool = False) -> Resolution:
    """The resolution to tile ``slide`` at for the model ``spec`` describes.

    Args:
        spec: the checkpoint's model spec.
        slide: the open slide (:class:`~wsi_tiling.SlideReader`): its path, µm/px, objective power
            and levels.
        match: ``physical`` (the checkpoint's delivered µm/px; the requested resolution for
            checkpoints that do not record it, with a warning when that is an objective power) or
            ``nominal`` (the requested resolution).
        slide_mpp: level-0 µm/px overriding the slide's metadata (``--slide-mpp`` or a CSV column).
        allow_upsample: permit a µm/px finer than the slide's own.

    Returns:
        ``Resolution(spec.tile_mpp, "mpp")`` or ``spec.resolution``.

    Raises:
        ValueError: ``match`` is not one of :data:`MATCH_MODES`.
        UpsamplingRequiredError: the slide cannot reach the resolution without upsampling; the
            message names the slide, its µm/px and ``--allow-upsample``.
        MissingResolutionError: the slide's µm/px is unknown (the message names ``--slide-mpp``).
    """
    _check_mode(match)
    resolution = spec.resolution
    if match == "physical" and not _records_physics(spec):
        log.warning("%s: the checkpoint does not record its tiles' µm/px; tiling at the requested %s "
                    "(nominal matching)", slide.path, spec.resolution)
    elif match == "physical" and spec.tile_mpp is not None:
        resolution = Resolution(spec.tile_mpp, "mpp")
    plan = plan_read(resolution, slide, slide_mpp=slide_mpp, allow_upsample=True)
    if plan.target_downsample * (1 + SCALE_TOLERANCE) < 1 and not allow_upsample:
        raise UpsamplingRequiredError(
            slide.path, f"the model's tiles are {plan.target_mpp:.4g} µm/px, finer than the slide's own "
            f"{plan.slide_mpp:.4g} µm/px; pass {UPSAMPLE_OPTION} to interpolate"
            + (" (or --match nominal)" if match == "physical" else ""))
    return resolution


def store_matches(info: StoreInfo, target_mpp: float, tile_size: int, slide_path: Path,
                  slide_mpp: float | None = None) -> bool:
    """Whether an existing tile store can stand in for tiling ``slide_path`` again.

    Args:
        info: the store (:func:`wsi_tiling.read_store_info`).
        target_mpp: the µm/px the tiles should have (``resolution.value`` for physical matching;
            ``plan_read(...).target_mpp`` for nominal).
        tile_size: the model's tile edge in pixels.
        slide_path: the slide to predict.
        slide_mpp: level-0 µm/px the user gives now (``--slide-mpp``), or None for the metadata's.

    Returns:
        True when the store was cut from a slide of that file name, at that tile size, delivering
        ``target_mpp`` within :data:`STORE_MPP_TOLERANCE`, with the same µm/px override (if any)
        within that tolerance, and without upsampling.
    """
    same_slide_mpp = (slide_mpp is None if info.mpp_source != "user"
                      else slide_mpp is not None and abs(info.slide_mpp / slide_mpp - 1) <= STORE_MPP_TOLERANCE)
    return (info.slide_path.name == Path(slide_path).resolve().name and info.tile_size == tile_size
            and abs(info.target_mpp / target_mpp - 1) <= STORE_MPP_TOLERANCE and same_slide_mpp
            and not info.request.get("allow_upsample", False))
