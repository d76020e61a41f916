"""Fit a tile classifier from YAML configs and typed values, with LightningCLI semantics.

The library side of ``pathology train`` (whose CLI only prints) and of the study, which passes each
cell's settings as values (an :class:`~pathology.models.mhsa.MhsaBlocks`, a list of class names),
never as command-line strings to be parsed again. Configs map 1:1 to
:class:`~pathology.training.module.TileClassifier` (``model:``), :class:`~pathology.data.TileDataModule`
(``data:``) and the Lightning ``trainer:``; a key that does not exist fails at parse time with the
config file that holds it and the closest valid key. Unless a config names its own loggers, a run logs
to CSV and TensorBoard under ``trainer.default_root_dir``, so that one folder holds everything it wrote.
"""
from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from jsonargparse import ArgumentError, Namespace
from jsonargparse.typing import register_type
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pathology.checkpoint import rewrite_spec
from pathology.data import TileDataError, TileDataModule
from pathology.inference.results import InferenceError
from pathology.io import CheckpointError
from pathology.models.mhsa import MhsaBlocks
from pathology.training.metrics import youden_tile_threshold
from pathology.training.module import TileClassifier

__all__ = ["FitResult", "TrainCLI", "check_config", "choose_threshold", "fit"]

# In YAML and on the command line ``model.mhsa_blocks`` is "16:2,32:1" or a mapping; configs save it as a string.
register_type(MhsaBlocks, serializer=str, deserializer=MhsaBlocks.parse)

_UNKNOWN_KEY = (re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
                re.compile(r"Option '(?P<key>[\w.]+)' is not accepted"))
CONFIG_FLAG = "--config"
THRESHOLD_KEY = "val/decision_threshold"


@dataclass(frozen=True)
class FitResult:
    """What a training run produced.

    Attributes:
        best_checkpoint: the best checkpoint by the ModelCheckpoint monitor (else the last one).
        metrics: final logged values, ``train/…``, ``val/…`` and (with a test split) ``test/…``;
            with ``model.decision_rule: youden``, ``val/decision_threshold`` too.
        tables: the tile table of each split (``train``, ``val``, ``test``), as the data module made them.
    """

    best_checkpoint: Path
    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


class TrainCLI(LightningCLI):
    """LightningCLI with the data → model links (classes, tile size, resolution), ``--ckpt_path``,
    typed values applied over the arguments, errors that name the config file, and default loggers
    inside ``trainer.default_root_dir``."""

    def __init__(self, *args: Any, values: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Args:
            values: dotted keys (``"model.mhsa_blocks"``) and typed values, applied after ``args``.
            args, kwargs: as :class:`LightningCLI`.
        """
        self._values = dict(values or {})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume training from (weights, optimiser, epoch)")
        parser.link_arguments("data.class_names", "model.class_names")
        parser.link_arguments("data.tile_size", "model.tile_size")
        parser.link_arguments("data.resolution", "model.resolution")
        parser.link_arguments("model.img_size", "data.img_size")
        parser.link_arguments("model.normalization", "data.normalization", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parses ``args`` then the typed values over them; an unknown key names its config file."""
        try:
            config = parser.parse_args(args, _skip_validation=bool(self._values))
            if self._values:
                config = parser.parse_object(_nested(self._values), namespace=config)
        except ArgumentError as err:
            raise ArgumentError(None, _explain_error(err, args, parser)) from err
        self.config = config

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer; a config without loggers of its own logs to CSV and TensorBoard in default_root_dir."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            root = trainer_config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tensorboard")]
        return super().instantiate_trainer(**kwargs)


def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model.img_size": 64}`` -> ``{"model": {"img_size": 64}}``."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _config_files(args: list[str]) -> list[Path]:
    """The ``--config`` files of ``args``, in order."""
    files = []
    for arg, nxt in zip(args, [*args[1:], ""]):
        if arg == CONFIG_FLAG:
            files.append(Path(nxt))
        elif arg.startswith(CONFIG_FLAG + "="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def _yaml_keys(data: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a nested mapping (``class_path``/``init_args`` levels dropped)."""
    if not isinstance(data, dict):
        return set()
    keys = set()
    for key, value in data.items():
        if key == "class_path":
            continue
        dotted = prefix if key == "init_args" else f"{prefix}.{key}".lstrip(".")
        keys |= {dotted} - {prefix}
        keys |= _yaml_keys(value, dotted)
    return keys


def _explain_error(err: ArgumentError, args: Any, parser: LightningArgumentParser) -> str:
    """The parser's message, prefixed with the config file holding an unknown key and suffixed with the
    closest valid key; other errors are prefixed with every config file given."""
    message = str(err).strip()
    files = _config_files(list(args)) if isinstance(args, list) else []
    match = next((m for pattern in _UNKNOWN_KEY if (m := pattern.search(message))), None)
    if match is None:
        return f"{', '.join(map(str, files))}: {message}" if files else message
    group = match.groupdict().get("group")
    key = f"{group}.{match['key']}" if group else match["key"]
    holders = [f for f in files if f.is_file() and any(k == key or k.endswith("." + key)
                                                         for k in _yaml_keys(yaml.safe_load(f.read_text())))]
    where = str(holders[-1]) if holders else "command line"
    valid = [k for k in parser.get_defaults().keys() if not group or k.startswith(group + ".")]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}: unknown key {key!r}{hint} ({message.splitlines()[-1].strip()})"


def _checkpoint_callback(trainer: Trainer) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


def _best_checkpoint(trainer: Trainer) -> Path:
    callback = _checkpoint_callback(trainer)
    if callback is None or not (callback.best_model_path or callback.last_model_path):
        raise CheckpointError(f"{trainer.default_root_dir}: the run wrote no checkpoint (add a ModelCheckpoint)")
    return Path(callback.best_model_path or callback.last_model_path).resolve()


def _keep_last_epoch(trainer: Trainer) -> None:
    """With no validation there is nothing to monitor: a checkpoint callback that monitors a metric is
    replaced by one in the same folder that keeps the last epoch."""
    for i, callback in enumerate(trainer.callbacks):
        if isinstance(callback, ModelCheckpoint) and callback.monitor is not None:
            trainer.callbacks[i] = ModelCheckpoint(dirpath=callback.dirpath)


class _ParseOnlyCLI(TrainCLI):
    """Stops after parsing: nothing is built and nothing is written."""

    def instantiate_classes(self) -> None:
        """Builds nothing."""


def _cli(cli_class: type[TrainCLI], args: list[str], values: Mapping[str, Any] | None) -> TrainCLI:
    with warnings.catch_warnings():  # args are ours on purpose; sys.argv holds the dispatcher's own
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cli_class(TileClassifier, TileDataModule, args=args, values=values, run=False, subclass_mode_data=False,
                         save_config_kwargs={"overwrite": True},
                         parser_kwargs={"exit_on_error": False, "prog": "pathology train"})


def check_config(args: list[str], values: Mapping[str, Any] | None = None) -> Namespace:
    """Parses as :func:`fit` does and stops, so that a study refuses a bad training config before any work.

    Returns:
        The parsed config (``config.data.split_csv``, ``config.trainer.max_epochs``, ...).

    Raises:
        jsonargparse.ArgumentError: unknown key (naming its config file) or bad value.
    """
    return _cli(_ParseOnlyCLI, args, values).config


def choose_threshold(trainer: Trainer, model: TileClassifier, datamodule: TileDataModule, best: Path) -> float:
    """The best checkpoint predicts the validation split (with its TTA setting); Youden's threshold on
    class 1's probability there is written into the checkpoint's spec. Test patients play no part.

    Raises:
        TileDataError: no validation split, or one lacking tiles of one of the two classes.
    """
    model.last_predictions = None
    trainer.validate(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)
    if model.last_predictions is None:
        raise TileDataError(f"{best}: no decision threshold chosen (the checkpoint predicts by argmax): "
                            "there are no validation tiles")
    labels, probs = model.last_predictions
    try:
        threshold = youden_tile_threshold(labels, probs)
    except InferenceError as err:
        raise TileDataError(f"{best}: no decision threshold chosen (the checkpoint predicts by argmax): "
                            f"the validation tiles must hold both classes ({err})") from err
    if trainer.is_global_zero:
        rewrite_spec(best, decision_threshold=threshold)
    trainer.strategy.barrier()
    return threshold


def fit(args: list[str], values: Mapping[str, Any] | None = None) -> FitResult:
    """Trains as ``pathology train ARGS`` does, then tests the best checkpoint on the test split.

    With ``data.val_fold`` None there is no validation: the last epoch's checkpoint is the result.
    With ``model.decision_rule: youden`` the decision threshold is first chosen on the validation
    split (:func:`choose_threshold`), so the test metrics are at that threshold.

    Args:
        args: ``pathology train`` arguments (``--config FILE``, ``--trainer.max_epochs 3``, ...).
        values: typed settings over ``args``, by dotted key, e.g. ``{"model.mhsa_blocks": MhsaBlocks({32: 1})}``.

    Raises:
        jsonargparse.ArgumentError: unknown key or bad value in the configs, arguments or values.
        TileDataError: bad tiles, labels or splits (or a validation split of one class with
            ``decision_rule: youden``); NonFiniteLossError: the loss diverged.
        CheckpointError: the run wrote no checkpoint.
    """
    cli = _cli(TrainCLI, args, values)
    trainer, datamodule = cli.trainer, cli.datamodule
    if datamodule.val_fold is None:
        _keep_last_epoch(trainer)
    trainer.fit(cli.model, datamodule=datamodule, ckpt_path=cli.config.get("ckpt_path"))
    best = _best_checkpoint(trainer)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cli.model.hparams.decision_rule == "youden":
        metrics[THRESHOLD_KEY] = choose_threshold(trainer, cli.model, datamodule, best)
    if len(datamodule.tables.get("test", ())):
        for results in trainer.test(cli.model, datamodule=datamodule, ckpt_path=str(best), verbose=False):
            metrics |= {k: float(v) for k, v in results.items()}
    return FitResult(best, metrics, datamodule.tables)
