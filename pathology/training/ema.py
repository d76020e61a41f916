"""An exponential moving average (EMA) of a classifier's weights, and where a checkpoint keeps each copy.

Training steps the raw weights; their EMA (timm's ``ModelEmaV3``) is what validation, testing and the
saved checkpoint use. A checkpoint keeps the EMA weights under ``model.*``, the keys
:func:`pathology.checkpoint.load_checkpoint` reads, so ``predict-tiles``, ``infer`` and ``export`` use
them unchanged, and the raw weights under ``raw_model.*``, which resuming training restores.
"""
from __future__ import annotations

import logging

import torch
from timm.utils import ModelEmaV3
from torch import nn

from pathology.checkpoint import STATE_PREFIX

__all__ = ["RAW_PREFIX", "WARMUP_POWER", "create_ema", "state_from_checkpoint", "state_for_checkpoint"]

RAW_PREFIX = "raw_model."
# Warm-up decay 1 - (1 + step)^-3/4: about 0.9 after 20 steps, 0.99 after 460, 0.999 after 10 000 (capped at the
# configured decay). Crowson's value for runs shorter than a million steps, so early weights fade fast.
WARMUP_POWER = 3 / 4

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


def create_ema(model: nn.Module, decay: float, warmup: bool) -> ModelEmaV3:
    """A copy of ``model`` that :meth:`ModelEmaV3.update` moves towards it after each optimiser step.

    Its parameters take no gradients, so neither an optimiser nor DDP's gradient sync sees them.

    Args:
        decay: weight of the average at each update (e.g. 0.999), in (0, 1).
        warmup: start the decay low and raise it as ``1 - (1 + step)^-3/4`` up to ``decay``.
    """
    ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=WARMUP_POWER)
    ema.requires_grad_(False)
    ema.module.train()  # as the model: Lightning switches both to eval for validation, and warns of eval-mode parts
    return ema


def _moved(state: State, old: str, new: str) -> State:
    """The entries of ``state`` whose keys start with ``old``, with ``new`` in its place."""
    return {new + key[len(old):]: value for key, value in state.items() if key.startswith(old)}


def _others(state: State, *prefixes: str) -> State:
    return {key: value for key, value in state.items() if not key.startswith(prefixes)}


def state_for_checkpoint(state: State, ema_prefix: str) -> State:
    """A LightningModule's ``state_dict`` as a checkpoint keeps it: EMA weights (found under
    ``ema_prefix``) under ``model.*``, raw weights under ``raw_model.*``, other entries as they are."""
    return (_others(state, STATE_PREFIX, ema_prefix) | _moved(state, STATE_PREFIX, RAW_PREFIX)
            | _moved(state, ema_prefix, STATE_PREFIX))


def state_from_checkpoint(state: State, ema_prefix: str | None) -> State:
    """The ``state_dict`` to load into a LightningModule, from a checkpoint with or without EMA weights.

    Args:
        state: a checkpoint's ``state_dict``.
        ema_prefix: where the module keeps its EMA copy (``"ema.module."``); None when it has none.

    Returns:
        The raw weights under ``model.*`` and the EMA weights under ``ema_prefix``. A checkpoint written
        without EMA gives its ``model.*`` to both; a module without EMA gets the raw weights only.
    """
    if not any(key.startswith(RAW_PREFIX) for key in state):
        if ema_prefix is None:
            return state
        log.warning("checkpoint has no EMA weights (written without model.ema_decay); the average starts from "
                    "its weights")
        return state | _moved(state, STATE_PREFIX, ema_prefix)
    raw = _others(state, STATE_PREFIX, RAW_PREFIX) | _moved(state, RAW_PREFIX, STATE_PREFIX)
    return raw if ema_prefix is None else raw | _moved(state, STATE_PREFIX, ema_prefix)
