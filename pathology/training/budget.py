"""Train for as many whole epochs as a wall-clock budget allows, on a machine whose speed varies.

A plan made from a speed measured once goes wrong on a shared CPU: too few epochs when the
machine frees up, a cut-off schedule when it gets busier. :class:`TimeBudget` re-plans after
every epoch from the epochs' measured time and sets ``max_epochs``; the module's learning-rate
schedule reads the total number of steps from the trainer on every step, so warm-up and cosine
decay follow the new plan and every epoch ends with its validation.
"""
from __future__ import annotations

import logging
from time import monotonic

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["TimeBudget"]

log = logging.getLogger(__name__)
SECONDS_PER_MINUTE = 60.0


class TimeBudget(Callback):
    """Sets ``trainer.fit_loop.max_epochs`` after each epoch to the epochs that fit in ``minutes``."""

    def __init__(self, minutes: float) -> None:
        """Args:
            minutes: wall-clock budget of training and validation, from the start of training.
        """
        self.budget_s = minutes * SECONDS_PER_MINUTE
        self.start, self.epochs_run = 0.0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.epochs_run = monotonic(), 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs_run += 1
        elapsed = monotonic() - self.start
        epoch_s = elapsed / self.epochs_run
        more = int(max(0.0, self.budget_s - elapsed) // epoch_s)
        trainer.fit_loop.max_epochs = trainer.current_epoch + 1 + more
        log.info("%.0f s per epoch; %d more epoch(s) fit in the %.0f s left", epoch_s, more, self.budget_s - elapsed)
