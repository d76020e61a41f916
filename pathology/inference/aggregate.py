"""Slide scores from tile probabilities: pure functions on (N, C) arrays.

Every function takes the probabilities of one slide's N tiles for C classes (rows sum to 1) and
returns one score per class. Which summary suits a task depends on how much of the slide carries
the label: ``mean`` for diffuse findings, ``max`` or a top-k mean for small foci, a quantile as a
middle ground, ``vote`` for the share of tiles each class wins.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Aggregation",
    "DEFAULT_AGGREGATIONS",
    "aggregate",
    "aggregate_all",
    "majority_vote",
    "max_probability",
    "mean_probability",
    "parse_aggregation",
    "quantile_probability",
    "top_k_mean",
]

DEFAULT_AGGREGATIONS = ("mean", "max", "topk:0.1", "quantile:0.9", "vote")


def _check(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"tile probabilities must be a non-empty (N, C) array, got shape {probs.shape}")
    return probs


def mean_probability(probs: np.ndarray) -> np.ndarray:
    """Mean over tiles of each class's probability. Returns (C,)."""
    return _check(probs).mean(axis=0)


def max_probability(probs: np.ndarray) -> np.ndarray:
    """Highest tile probability of each class. Returns (C,)."""
    return _check(probs).max(axis=0)


def top_k_mean(probs: np.ndarray, k: int | float) -> np.ndarray:
    """Mean of each class's k highest tile probabilities, class by class.

    Args:
        probs: (N, C) tile probabilities.
        k: a number of tiles (int ≥ 1), or a fraction of the slide's tiles (float in (0, 1]),
            rounded up so that at least one tile counts. Clipped to N.

    Returns:
        (C,) scores.
    """
    probs = _check(probs)
    n = probs.shape[0]
    if isinstance(k, float):
        if not 0 < k <= 1:
            raise ValueError(f"top-k fraction must be in (0, 1], got {k}")
        k = math.ceil(k * n)
    if k < 1:
        raise ValueError(f"top-k count must be at least 1, got {k}")
    k = min(k, n)
    return np.sort(probs, axis=0)[n - k :].mean(axis=0)


def quantile_probability(probs: np.ndarray, q: float) -> np.ndarray:
    """The q-quantile (linear interpolation) of each class's tile probabilities. Returns (C,)."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    return np.quantile(_check(probs), q, axis=0)


def majority_vote(probs: np.ndarray) -> np.ndarray:
    """Fraction of tiles whose most probable class is each class (ties go to the lower index).

    Returns:
        (C,) fractions summing to 1.
    """
    probs = _check(probs)
    winners = probs.argmax(axis=1)
    return np.bincount(winners, minlength=probs.shape[1]) / probs.shape[0]


@dataclass(frozen=True)
class Aggregation:
    """One aggregation method and its parameter, e.g. ``topk:0.1`` or ``quantile:0.9``.

    ``key`` is the form used in column names (``topk0.1``); ``str()`` gives the command-line form.
    """

    method: str
    param: float | int | None = None

    @property
    def key(self) -> str:
        return self.method if self.param is None else f"{self.method}{self.param}"

    def __str__(self) -> str:
        return self.method if self.param is None else f"{self.method}:{self.param}"


_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "mean": mean_probability,
    "max": max_probability,
    "topk": top_k_mean,
    "quantile": quantile_probability,
    "vote": majority_vote,
}
_NEEDS_PARAM = {"topk", "quantile"}


def parse_aggregation(text: str) -> Aggregation:
    """Parses ``mean``, ``max``, ``vote``, ``topk:K`` (``5`` tiles or ``0.1`` of them), ``quantile:Q``.

    Raises:
        ValueError: unknown method, missing or malformed parameter.
    """
    method, _, param = text.strip().partition(":")
    if method not in _FUNCTIONS:
        raise ValueError(f"unknown aggregation {text!r}; choose from {', '.join(_FUNCTIONS)}")
    if (method in _NEEDS_PARAM) != bool(param):
        form = f"{method}:VALUE" if method in _NEEDS_PARAM else method
        raise ValueError(f"aggregation {text!r} must be written {form}")
    if not param:
        return Aggregation(method)
    try:
        value: int | float = float(param) if method == "quantile" or "." in param else int(param)
    except ValueError as error:
        raise ValueError(f"aggregation {text!r}: {param!r} is not a number") from error
    aggregation = Aggregation(method, value)
    aggregate(np.full((1, 1), 0.5), aggregation)  # validates the parameter's range
    return aggregation


def aggregate(probs: np.ndarray, aggregation: Aggregation | str) -> np.ndarray:
    """Applies one aggregation to (N, C) tile probabilities. Returns (C,) slide scores."""
    if isinstance(aggregation, str):
        aggregation = parse_aggregation(aggregation)
    function = _FUNCTIONS[aggregation.method]
    if aggregation.param is None:
        return function(probs)
    return function(probs, aggregation.param)


def aggregate_all(probs: np.ndarray, aggregations: Sequence[Aggregation]) -> dict[str, np.ndarray]:
    """Every aggregation of one slide, keyed by :attr:`Aggregation.key`."""
    return {a.key: aggregate(probs, a) for a in aggregations}
