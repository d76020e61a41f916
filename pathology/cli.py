"""The ``pathology`` command: one subcommand per stage of the pipeline.

Each subcommand lives in the module that does the work and exposes ``main(argv) -> int``; the
module is imported only when its subcommand runs, so ``pathology --help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "model-info": ("pathology.models.info", "parameters, MACs and measured latency of a model"),
    "export": ("pathology.export", "write a checkpoint's model as an ONNX graph (dynamic batch, spec as metadata)"),
    "train": ("pathology.training.cli", "fine-tune a tile classifier (LightningCLI, YAML config)"),
    "cv": ("pathology.training.cv", "cross-validate over the split's folds, fit the final model, ensemble the folds"),
    "predict-tiles": ("pathology.training.predict_tiles", "per-class probabilities for a set of tile images"),
    "infer": ("pathology.inference.infer", "tile slides, predict tiles, aggregate into slide predictions"),
    "calibrate": ("pathology.inference.calibrate", "pick a decision threshold and temperature on validation slides"),
    "evaluate": ("pathology.inference.evaluate", "slide-level metrics with bootstrap CIs and ROC curves"),
    "study": ("pathology.study.run", "resolution study over magnifications and MHSA placements"),
    "demo": ("pathology.study.demo", "generate demo slides and run the whole pipeline on them"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pathology COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'pathology COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatches to the subcommand's ``main``; returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pathology: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
