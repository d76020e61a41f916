"""``pathology export``: a checkpoint's model as an ONNX graph other tools run and preprocess for.

The graph (:func:`pathology.models.export.export_onnx`) has a dynamic batch, the checkpoint's
image size, and the :class:`~pathology.checkpoint.ModelSpec` as JSON under the
``pathology_spec`` metadata key, so another runtime normalises and sizes tiles as training did.

Example::

    pathology export --checkpoint runs/l1/best.ckpt --format onnx --out l1.onnx
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pathology.checkpoint import CheckpointError, ModelSpec, load_inference_model
from pathology.models.export import ExportError, export_onnx

__all__ = ["FORMATS", "SPEC_METADATA_KEY", "main", "spec_metadata"]

FORMATS = ("onnx",)
SPEC_METADATA_KEY = "pathology_spec"  # ONNX metadata_props key holding the ModelSpec as JSON


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    """The ONNX metadata of a checkpoint's graph: the :class:`ModelSpec` as JSON, for preprocessing."""
    return {SPEC_METADATA_KEY: json.dumps(spec.to_dict())}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathology export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a tile-classifier checkpoint")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--out", type=Path, required=True, help="the file to write")
    return parser


def main(argv: list[str]) -> int:
    """Exports a checkpoint's model at its image size; returns 0, or 1 on a bad checkpoint or failed export."""
    args = _parser().parse_args(argv)
    try:
        model, spec = load_inference_model(args.checkpoint)
        export_onnx(model, args.out, (spec.img_size, spec.img_size), spec_metadata(spec))
    except (CheckpointError, ExportError) as err:
        print(f"pathology export: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({spec.model_name}, {spec.img_size} px, dynamic batch)")
    return 0
