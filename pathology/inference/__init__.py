"""Slide-level inference: tile predictions, aggregation into slide scores, calibration, evaluation.

The pure parts import quickly; :func:`infer_slides` and its option classes load torch and
Lightning on first use.
"""
from __future__ import annotations

from typing import Any

from pathology.inference.aggregate import DEFAULT_AGGREGATIONS, Aggregation, aggregate, aggregate_all, parse_aggregation
from pathology.inference.calibrate import Calibration, calibration_path, decide, fit_temperature, temper
from pathology.inference.evaluate import auroc, bootstrap_ci
from pathology.inference.geojson import tiles_to_geojson, write_geojson
from pathology.inference.results import InferenceError, read_run

__all__ = [
    "Aggregation", "DEFAULT_AGGREGATIONS", "aggregate", "aggregate_all", "parse_aggregation",
    "Calibration", "calibration_path", "decide", "fit_temperature", "temper",
    "auroc", "bootstrap_ci",
    "tiles_to_geojson", "write_geojson",
    "InferenceError", "read_run",
    "infer_slides", "RunOptions", "Extras",
]

_LAZY = {"infer_slides": "pathology.inference.infer", "RunOptions": "pathology.inference.predict",
         "Extras": "pathology.inference.outputs"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
