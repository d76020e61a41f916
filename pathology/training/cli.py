"""``pathology train``: fit a tile classifier from a YAML config, with LightningCLI semantics.

``pathology train --config configs/train_idc.yaml --trainer.max_epochs 3`` parses the config into
:class:`~pathology.training.module.TileClassifier` (``model:``),
:class:`~pathology.data.TileDataModule` (``data:``) and the Lightning ``trainer:``; a key that does
not exist fails at parse time, naming the config file and the closest valid key. ``--print_config``
shows the resolved config, ``--ckpt_path`` resumes, and every run saves its resolved ``config.yaml``
next to its logs. After fitting, with ``model.decision_rule: youden``, a decision threshold is chosen on
the validation patients and stored in the best checkpoint; then that checkpoint is evaluated on the
held-out test patients (when the split has any). The work is :func:`pathology.training.fit.fit`;
this module only reports.
"""
from __future__ import annotations

import sys

from jsonargparse import ArgumentError

from pathology.data import TileDataError
from pathology.io import CheckpointError
from pathology.training.fit import fit
from pathology.training.module import NonFiniteLossError

__all__ = ["main"]

HEADLINE_METRICS = {"balanced_accuracy", "f1", "auroc", "loss", "decision_threshold"}


def main(argv: list[str]) -> int:
    """Entry point of ``pathology train``; prints the best checkpoint and the headline metrics."""
    try:
        result = fit(argv)
    except SystemExit as stop:  # --help and --print_config exit from the parser
        return int(stop.code or 0)
    except (ArgumentError, TileDataError, NonFiniteLossError, CheckpointError) as err:
        print(f"pathology train: {err}", file=sys.stderr)
        return 2 if isinstance(err, ArgumentError) else 1
    print(f"best checkpoint: {result.best_checkpoint}")
    for key in sorted(k for k in result.metrics if k.split("/")[-1] in HEADLINE_METRICS):
        print(f"{key}: {result.metrics[key]:.4f}")
    return 0
