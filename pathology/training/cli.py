"""``pathology train``: fit a tile classifier from a YAML config, with LightningCLI semantics.

``pathology train --config configs/train_idc.yaml --trainer.max_epochs 3`` parses the config into
:class:`~pathology.training.module.TileClassifier` (``model:``),
:class:`~pathology.data.TileDataModule` (``data:``) and the Lightning ``trainer:``; a key that does
not exist fails at parse time. ``--print_config`` shows the resolved config, ``--ckpt_path`` resumes,
and every run saves its resolved ``config.yaml`` next to its logs. After fitting, the best checkpoint
is evaluated on the held-out test patients (when the split has any).
"""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from pathology.checkpoint import CheckpointError
from pathology.data import TileDataError, TileDataModule
from pathology.training.module import NonFiniteLossError, TileClassifier

__all__ = ["FitResult", "TrainCLI", "fit", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """What a training run produced.

    Attributes:
        best_checkpoint: the best checkpoint by the ModelCheckpoint monitor (else the last one).
        metrics: final logged values, ``train/…``, ``val/…`` and (with a test split) ``test/…``.
    """

    best_checkpoint: Path
    metrics: dict[str, float]


class TrainCLI(LightningCLI):
    """LightningCLI with the data → model links (classes, tile size, resolution) and ``--ckpt_path``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume training from (weights, optimiser, epoch)")
        parser.link_arguments("data.class_names", "model.class_names")
        parser.link_arguments("data.tile_size", "model.tile_size")
        parser.link_arguments("data.resolution", "model.resolution")
        parser.link_arguments("model.img_size", "data.img_size")
        parser.link_arguments("model.normalization", "data.normalization", apply_on="instantiate")


def _checkpoint_callback(trainer) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


def _best_checkpoint(trainer) -> Path:
    callback = _checkpoint_callback(trainer)
    if callback is None or not (callback.best_model_path or callback.last_model_path):
        raise CheckpointError(f"{trainer.default_root_dir}: the run wrote no checkpoint (add a ModelCheckpoint)")
    return Path(callback.best_model_path or callback.last_model_path).resolve()


def fit(args: list[str]) -> FitResult:
    """Trains as ``pathology train ARGS`` does, then tests the best checkpoint on the test split.

    Raises:
        jsonargparse.ArgumentError: unknown key or bad value in the config or arguments.
        TileDataError: bad tiles, labels or splits; NonFiniteLossError: the loss diverged.
    """
    with warnings.catch_warnings():  # args are ours on purpose; sys.argv holds the dispatcher's own
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = TrainCLI(TileClassifier, TileDataModule, args=args, run=False, subclass_mode_data=False,
                       save_config_kwargs={"overwrite": True},
                       parser_kwargs={"exit_on_error": False, "prog": "pathology train"})
    trainer, datamodule = cli.trainer, cli.datamodule
    trainer.fit(cli.model, datamodule=datamodule, ckpt_path=cli.config.get("ckpt_path"))
    best = _best_checkpoint(trainer)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if len(datamodule.tables.get("test", ())):
        for results in trainer.test(cli.model, datamodule=datamodule, ckpt_path=str(best), verbose=False):
            metrics |= {k: float(v) for k, v in results.items()}
    return FitResult(best, metrics)


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
    for key in sorted(k for k in result.metrics if k.split("/")[-1] in {"balanced_accuracy", "f1", "auroc", "loss"}):
        print(f"{key}: {result.metrics[key]:.4f}")
    return 0
