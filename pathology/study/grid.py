"""A study config: one base YAML plus small override files, expanded into the cells of a grid.

A config names the slides (a CSV with ``slide_id``, ``slide_path``, ``split`` and one label column per
task), the tasks and their classes, the grid (resolutions, MHSA placements, tile sizes, seeds) and
the training config files the ``pathology train`` parser reads. Later files override earlier ones
key by key; relative paths are read from the folder of the file that gives them. Example::

    slides_csv: slides.csv
    tasks: {chromatin: [smooth, coarse]}
    grid:
      resolution: [20x, 5x, 0.5mpp]
      mhsa_blocks: ["32:1", "16:1,32:1"]
      tile_size: [64]
      seed: [0, 1]
    train: {configs: [study_train_demo.yaml], args: ["--trainer.max_steps=40"]}
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pathology.models.info import parse_mhsa_blocks
from wsi_tiling import Resolution

__all__ = ["StudyConfigError", "Cell", "Study", "expand_grid", "load_study", "mhsa_label"]

GRID_KEYS = ("resolution", "mhsa_blocks", "tile_size", "seed")
PATH_KEYS = ("slides_csv",)
OPTIONAL_KEYS = {  # Study field: (config section, key, conversion); an absent key keeps Study's default
    "min_tissue": ("tiling", "min_tissue", float),
    "aggregations": ("inference", "aggregations", lambda values: [str(v) for v in values]),
    "infer_batch_size": ("inference", "batch_size", int),
    "speed_batch_size": ("speed", "batch_size", int),
}


class StudyConfigError(ValueError):
    """A study config that cannot be used; the message names the file and the key."""


def mhsa_label(mhsa_blocks: dict[int, int]) -> str:
    """``{16: 1, 32: 1}`` -> ``"16:1,32:1"`` (the config and table form); ``{}`` -> ``"none"``."""
    return ",".join(f"{stride}:{count}" for stride, count in sorted(mhsa_blocks.items())) or "none"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: what is tiled, trained and evaluated once.

    Attributes:
        task: label column of the slides CSV.
        resolution: resolution tiles are cut at.
        mhsa_blocks: {output stride: MHSA blocks} of the model.
        tile_size: tile edge in pixels at ``resolution`` (also the model input size).
        seed: training seed (the slide split is fixed by the slides CSV).
    """

    task: str
    resolution: Resolution
    mhsa_blocks: dict[int, int]
    tile_size: int
    seed: int

    @property
    def name(self) -> str:
        """Folder-safe, readable id, e.g. ``chromatin_20x_mhsa16-1_32-1_64px_seed0``."""
        mhsa = mhsa_label(self.mhsa_blocks).replace(":", "-").replace(",", "_")
        return f"{self.task}_{self.resolution}_mhsa{mhsa}_{self.tile_size}px_seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The grid columns of ``results.csv``."""
        return {"task": self.task, "resolution": str(self.resolution), "mpp_or_power": self.resolution.value,
                "unit": self.resolution.unit, "mhsa_blocks": mhsa_label(self.mhsa_blocks),
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
    train_args: list[str] = field(default_factory=list)
    min_tissue: float = 0.5
    aggregations: list[str] = field(default_factory=lambda: ["mean", "max"])
    infer_batch_size: int = 64
    speed_batch_size: int = 16

    def fingerprint(self, cell: Cell) -> str:
        """Hash of everything a cell's result depends on: its grid point, training files and args, slides."""
        parts = [json.dumps(cell.to_dict(), sort_keys=True), json.dumps(self.tasks[cell.task]),
                 json.dumps(self.train_args), str(self.min_tissue), json.dumps(self.aggregations),
                 self.slides_csv.read_text()]
        parts += [path.read_text() for path in self.train_configs]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_grid(grid: dict[str, Any], tasks: list[str], where: str = "config") -> list[Cell]:
    """The Cartesian product task × resolution × MHSA placement × tile size × seed.

    Args:
        grid: ``resolution`` (``"20x"``, ``"0.5mpp"``, ...), ``mhsa_blocks`` (``"16:1,32:1"`` or a
            mapping), ``tile_size`` (px) and ``seed``; each a value or a list.
        tasks: label columns, outermost loop.
        where: file name for error messages.

    Raises:
        StudyConfigError: an unknown or missing key, or a value that cannot be read.
    """
    unknown, missing = set(grid) - set(GRID_KEYS), [k for k in GRID_KEYS if k not in grid]
    if unknown or missing:
        raise StudyConfigError(f"{where}: grid needs exactly {list(GRID_KEYS)} (unknown {sorted(unknown)}, "
                               f"missing {missing})")
    try:
        resolutions = [Resolution.parse(str(r)) for r in _as_list(grid["resolution"])]
        mhsa = [parse_mhsa_blocks(m) if isinstance(m, str) else {int(k): int(v) for k, v in m.items()}
                for m in _as_list(grid["mhsa_blocks"])]
        tile_sizes = [int(t) for t in _as_list(grid["tile_size"])]
        seeds = [int(s) for s in _as_list(grid["seed"])]
    except (ValueError, TypeError, AttributeError) as err:
        raise StudyConfigError(f"{where}: bad grid value ({err})") from err
    return [Cell(task, res, m, size, seed)
            for task, res, m, size, seed in itertools.product(tasks, resolutions, mhsa, tile_sizes, seeds)]


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    """Reads one config file with its relative paths made absolute."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise StudyConfigError(f"{path}: not a readable YAML file ({err})") from err
    if not isinstance(data, dict):
        raise StudyConfigError(f"{path}: a study config must be a mapping")
    for key in PATH_KEYS:
        if key in data:
            data[key] = str(path.parent / data[key])
    train = data.get("train", {})
    if "configs" in train:
        train["configs"] = [str(path.parent / c) for c in _as_list(train["configs"])]
    return data


def load_study(paths: list[str | Path], slides_csv: str | Path | None = None) -> Study:
    """Reads and merges study config files (later ones override earlier ones) and expands the grid.

    Args:
        paths: the base config, then override files.
        slides_csv: replaces the config's ``slides_csv`` (e.g. the demo's generated slides).

    Raises:
        StudyConfigError: unreadable file, missing or unknown key, missing file it refers to.
    """
    where = ", ".join(str(p) for p in paths)
    data: dict[str, Any] = {}
    for path in paths:
        data = _merge(data, _read_yaml(Path(path)))
    if slides_csv is not None:
        data["slides_csv"] = str(slides_csv)
    for key in ("slides_csv", "tasks", "grid", "train"):
        if key not in data:
            raise StudyConfigError(f"{where}: missing key {key!r}")
    tasks = {str(k): [str(c) for c in v] for k, v in data["tasks"].items()}
    train = data["train"]
    options = {name: convert(data[section][key]) for name, (section, key, convert) in OPTIONAL_KEYS.items()
               if key in data.get(section, {})}
    study = Study(slides_csv=Path(data["slides_csv"]), tasks=tasks,
                  cells=expand_grid(data["grid"], list(tasks), where),
                  train_configs=[Path(c) for c in _as_list(train.get("configs", []))],
                  train_args=[str(a) for a in train.get("args", [])], **options)
    for path in [study.slides_csv, *study.train_configs]:
        if not path.is_file():
            raise StudyConfigError(f"{where}: {path} not found")
    return study
