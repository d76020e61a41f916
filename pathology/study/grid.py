"""A study config: one base YAML plus small override files, expanded into the cells of a grid.

A config names the slides (a CSV with ``slide_id``, ``slide_path``, ``split`` and one label column per
task), the tasks and their classes, the grid (resolutions, MHSA placements, MLP activations, tile sizes,
seeds) and the training config files the ``pathology train`` parser reads. Later files override earlier ones
key by key; relative paths are read from the folder of the file that gives them. Every file is
checked against the declared schema (:data:`SECTIONS`): a key it does not declare, such as
``tilling:`` or ``grid: {seeds: ...}``, is an error naming the file and the closest valid key. Example::

    slides_csv: slides.csv
    tasks: {chromatin: [smooth, coarse]}
    grid:
      resolution: [20x, 5x, 0.5mpp]
      mhsa_blocks: ["32:1", "16:1,32:1"]
      act_layer: [gelu, hard_swish]   # optional, default [gelu]
      tile_size: [64]
      seed: [0, 1]
    train: {configs: [study_train_demo.yaml], args: ["--trainer.max_steps=40"]}
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from pathology.models.efficientformer import ACT_LAYERS, DEFAULT_ACT_LAYER
from pathology.models.mhsa import MhsaBlocks
from wsi_tiling import Resolution

__all__ = ["StudyConfigError", "Cell", "Study", "expand_grid", "load_study"]


class StudyConfigError(ValueError):
    """A study config that cannot be used; the message names the file and the key."""


# The schema of a study config: its sections and their keys, with the defaults of optional ones.
# A key that is not declared here is an error (a typo must never be ignored silently).


@dataclass(frozen=True)
class GridSection:
    """``grid:``, each axis a value or a list: resolutions, MHSA placements, tile sizes (px), seeds and
    the blocks' MLP activations (timm names, :data:`~pathology.models.efficientformer.ACT_LAYERS`)."""

    resolution: Any
    mhsa_blocks: Any
    tile_size: Any
    seed: Any
    act_layer: Any = (DEFAULT_ACT_LAYER,)


@dataclass(frozen=True)
class TrainSection:
    """``train:``: YAML files given to ``pathology train`` as ``--config`` and further arguments."""

    configs: Any = ()
    args: Any = ()


@dataclass(frozen=True)
class TilingSection:
    """``tiling:``: tissue fraction a tile needs."""

    min_tissue: float = 0.5


@dataclass(frozen=True)
class InferenceSection:
    """``inference:``: slide aggregations (the first gives the slide metrics), tiles per forward pass."""

    aggregations: Any = ("mean", "max")
    batch_size: int = 64


@dataclass(frozen=True)
class SpeedSection:
    """``speed:``: batch used to measure throughput."""

    batch_size: int = 16


SECTIONS: dict[str, type | None] = {  # top-level key -> its section's schema; None: a value or a free mapping
    "slides_csv": None, "tasks": None, "grid": GridSection, "train": TrainSection, "tiling": TilingSection,
    "inference": InferenceSection, "speed": SpeedSection,
}
REQUIRED = ("slides_csv", "tasks", "grid", "train")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: what is tiled, trained and evaluated once.

    Attributes:
        task: label column of the slides CSV.
        resolution: resolution tiles are cut at.
        mhsa_blocks: {output stride: MHSA blocks} of the model.
        tile_size: tile edge in pixels at ``resolution`` (also the model input size).
        seed: training seed (the slide split is fixed by the slides CSV).
        act_layer: the blocks' MLP activation, a timm name (one of ``ACT_LAYERS``).
    """

    task: str
    resolution: Resolution
    mhsa_blocks: MhsaBlocks
    tile_size: int
    seed: int
    act_layer: str = DEFAULT_ACT_LAYER

    @property
    def name(self) -> str:
        """Folder-safe, readable id, e.g. ``chromatin_20x_mhsa16-1_32-1_64px_seed0`` or, with another
        activation than gelu, ``chromatin_20x_mhsa32-1_act-relu_64px_seed0`` (gelu cells keep the names
        they had before ``act_layer`` was an axis, so earlier study folders are reused)."""
        mhsa = str(self.mhsa_blocks).replace(":", "-").replace(",", "_")
        act = "" if self.act_layer == DEFAULT_ACT_LAYER else f"_act-{self.act_layer}"
        return f"{self.task}_{self.resolution}_mhsa{mhsa}{act}_{self.tile_size}px_seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The grid columns of ``results.csv``."""
        return {"task": self.task, "resolution": str(self.resolution), "mpp_or_power": self.resolution.value,
                "unit": self.resolution.unit, "mhsa_blocks": str(self.mhsa_blocks), "act_layer": self.act_layer,
                "tile_size": self.tile_size, "seed": self.seed}


@dataclass(frozen=True)
class Study:
    """A parsed study config.

    Attributes:
        slides_csv: the slides and their labels.
        tasks: label column -> class names in logit order.
        cells: the expanded grid, in config order.
        train_configs: YAML files given to ``pathology train`` as ``--config``, in order.
        train_args: further ``pathology train`` arguments (after the configs).
        min_tissue: tissue fraction a tile needs.
        aggregations: slide aggregations for inference; the first gives the slide metrics.
        infer_batch_size: tiles per forward pass at inference.
        speed_batch_size: batch used to measure throughput.
    """

    slides_csv: Path
    tasks: dict[str, list[str]]
    cells: list[Cell]
    train_configs: list[Path]
    train_args: list[str]
    min_tissue: float
    aggregations: list[str]
    infer_batch_size: int
    speed_batch_size: int

    def fingerprint(self, cell: Cell) -> str:
        """Hash of everything a cell's result depends on: its grid point, training files and args, slides.

        A gelu cell hashes its grid point without ``act_layer``, as before that was an axis, so the
        cells of earlier study folders are read back instead of rerun."""
        point = cell.to_dict()
        if cell.act_layer == DEFAULT_ACT_LAYER:
            del point["act_layer"]
        parts = [json.dumps(point, sort_keys=True), json.dumps(self.tasks[cell.task]),
                 json.dumps(self.train_args), str(self.min_tissue), json.dumps(self.aggregations),
                 self.slides_csv.read_text()]
        parts += [path.read_text() for path in self.train_configs]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_grid(grid: dict[str, Any], tasks: list[str], where: str | Path = "config") -> list[Cell]:
    """The Cartesian product task × resolution × MHSA placement × activation × tile size × seed.

    Args:
        grid: ``resolution`` (``"20x"``, ``"0.5mpp"``, ...), ``mhsa_blocks`` (``"16:1,32:1"`` or a
            mapping), ``tile_size`` (px), ``seed`` and optionally ``act_layer`` (timm names, default
            ``gelu``); each a value or a list.
        tasks: label columns, outermost loop.
        where: file name for error messages.

    Raises:
        StudyConfigError: an unknown or missing key, an unknown activation (with the closest valid one),
            or a value that cannot be read.
    """
    _check_keys(grid, GridSection, "grid", where, complete=True)
    section = GridSection(**grid)
    acts = _act_layers(section.act_layer, where)
    try:
        resolutions = [Resolution.parse(str(r)) for r in _as_list(section.resolution)]
        mhsa = [MhsaBlocks.parse(m) for m in _as_list(section.mhsa_blocks)]
        tile_sizes = [int(t) for t in _as_list(section.tile_size)]
        seeds = [int(s) for s in _as_list(section.seed)]
    except (ValueError, TypeError) as err:
        raise StudyConfigError(f"{where}: bad grid value ({err})") from err
    return [Cell(task, res, m, size, seed, act)
            for task, res, m, act, size, seed in itertools.product(tasks, resolutions, mhsa, acts, tile_sizes, seeds)]


def _act_layers(value: Any, where: str | Path) -> list[str]:
    """The ``grid.act_layer`` names, each checked against ``ACT_LAYERS``.

    Raises:
        StudyConfigError: an unknown name, naming the file and the closest valid name.
    """
    names = [str(name) for name in _as_list(value)]
    for name in names:
        if name not in ACT_LAYERS:
            raise StudyConfigError(f"{where}: unknown grid.act_layer {name} ({_hint(name, ACT_LAYERS, '', 'names')})")
    return names


def _hint(name: str, valid: Sequence[str], prefix: str, kind: str) -> str:
    """``did you mean <prefix><closest>?``, or the valid ``kind`` when none is close."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f"did you mean {prefix}{close[0]}?" if close else f"valid {kind}: {', '.join(valid)}"


def _unknown_key(key: str, valid: list[str], section: str, where: str | Path) -> StudyConfigError:
    """The error for ``section.key``, naming the file and the closest valid key."""
    prefix = f"{section}." if section else ""
    return StudyConfigError(f"{where}: unknown key {prefix}{key} ({_hint(key, valid, prefix, 'keys')})")


def _check_keys(data: Any, schema: type, section: str, where: str | Path, *, complete: bool) -> None:
    """Raises when ``data`` is not a mapping, has a key ``schema`` does not declare or, when ``complete``,
    lacks a key without a default."""
    if not isinstance(data, dict):
        raise StudyConfigError(f"{where}: {section} must be a mapping, got {data!r}")
    declared = [f.name for f in fields(schema)]
    for key in data:
        if key not in declared:
            raise _unknown_key(str(key), declared, section, where)
    missing = [f.name for f in fields(schema) if f.default is MISSING and f.name not in data]
    if complete and missing:
        raise StudyConfigError(f"{where}: {section} lacks {missing}")


def _check_schema(data: dict[str, Any], where: str | Path) -> None:
    """Checks every key of one config file against :data:`SECTIONS`; missing keys are checked after merging."""
    for key, value in data.items():
        if key not in SECTIONS:
            raise _unknown_key(str(key), list(SECTIONS), "", where)
        if SECTIONS[key] is not None:
            _check_keys(value, SECTIONS[key], key, where, complete=False)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    """Reads one config file, checks its keys against the schema and makes its relative paths absolute."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise StudyConfigError(f"{path}: not a readable YAML file ({err})") from err
    if not isinstance(data, dict):
        raise StudyConfigError(f"{path}: a study config must be a mapping")
    _check_schema(data, path)
    if "act_layer" in data.get("grid", {}):
        _act_layers(data["grid"]["act_layer"], path)  # here, where the file that names it is known
    if "slides_csv" in data:
        data["slides_csv"] = str(path.parent / data["slides_csv"])
    train = data.get("train", {})
    if "configs" in train:
        train["configs"] = [str(path.parent / c) for c in _as_list(train["configs"])]
    return data


def _section(data: dict[str, Any], key: str) -> Any:
    """The section ``key`` of the merged config with the schema's defaults for absent keys."""
    return SECTIONS[key](**data.get(key, {}))


def load_study(paths: list[str | Path], slides_csv: str | Path | None = None) -> Study:
    """Reads and merges study config files (later ones override earlier ones) and expands the grid.

    Every file is checked against the declared schema (:data:`SECTIONS`) before anything runs.

    Args:
        paths: the base config, then override files.
        slides_csv: replaces the config's ``slides_csv`` (e.g. the demo's generated slides).

    Raises:
        StudyConfigError: unreadable file, missing key, unknown key (with the closest valid one), bad value,
            missing file it refers to.
    """
    where = ", ".join(str(p) for p in paths)
    data: dict[str, Any] = {}
    for path in paths:
        data = _merge(data, _read_yaml(Path(path)))
    if slides_csv is not None:
        data["slides_csv"] = str(slides_csv)
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise StudyConfigError(f"{where}: missing key(s) {missing}")
    if not isinstance(data["tasks"], dict) or not data["tasks"]:
        raise StudyConfigError(f"{where}: tasks must map each label column to its class names")
    tasks = {str(k): [str(c) for c in v] for k, v in data["tasks"].items()}
    train, tiling, inference, speed = (_section(data, key) for key in ("train", "tiling", "inference", "speed"))
    cells = expand_grid(data["grid"], list(tasks), where)
    try:
        options = {"min_tissue": float(tiling.min_tissue),
                   "aggregations": [str(a) for a in _as_list(inference.aggregations)],
                   "infer_batch_size": int(inference.batch_size), "speed_batch_size": int(speed.batch_size)}
    except (TypeError, ValueError) as err:
        raise StudyConfigError(f"{where}: bad value in tiling, inference or speed ({err})") from err
    study = Study(slides_csv=Path(data["slides_csv"]), tasks=tasks, cells=cells,
                  train_configs=[Path(c) for c in _as_list(train.configs)],
                  train_args=[str(a) for a in _as_list(train.args)], **options)
    for path in [study.slides_csv, *study.train_configs]:
        if not path.is_file():
            raise StudyConfigError(f"{where}: {path} not found")
    return study
