"""Aggregations checked on tile probabilities small enough to compute by hand."""
from __future__ import annotations

import numpy as np
import pytest

from pathology.inference.aggregate import (
    Aggregation,
    aggregate,
    aggregate_all,
    majority_vote,
    max_probability,
    mean_probability,
    parse_aggregation,
    quantile_probability,
    top_k_mean,
)

# Five tiles, two classes (rows sum to 1). Class-1 column: 0.1, 0.9, 0.2, 0.8, 0.5.
PROBS = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.2, 0.8], [0.5, 0.5]])


def test_mean() -> None:
    # class 1: (0.1 + 0.9 + 0.2 + 0.8 + 0.5) / 5 = 2.5 / 5
    np.testing.assert_allclose(mean_probability(PROBS), [0.5, 0.5])


def test_max() -> None:
    np.testing.assert_allclose(max_probability(PROBS), [0.9, 0.9])


def test_top_k_count_and_fraction() -> None:
    # class 0 sorted: 0.9, 0.8, 0.5, 0.2, 0.1 -> top-2 mean 0.85; class 1: 0.9, 0.8 -> 0.85
    np.testing.assert_allclose(top_k_mean(PROBS, 2), [0.85, 0.85])
    # 0.5 of 5 tiles rounds up to 3: class 0 (0.9 + 0.8 + 0.5) / 3, class 1 the same
    np.testing.assert_allclose(top_k_mean(PROBS, 0.5), [2.2 / 3, 2.2 / 3])
    # k larger than the slide: every tile counts, i.e. the mean
    np.testing.assert_allclose(top_k_mean(PROBS, 50), [0.5, 0.5])


def test_quantile_interpolates() -> None:
    # class 1 sorted: 0.1, 0.2, 0.5, 0.8, 0.9; q = 0.9 -> position 3.6 -> 0.8 + 0.6 * 0.1
    np.testing.assert_allclose(quantile_probability(PROBS, 0.9)[1], 0.86)
    np.testing.assert_allclose(quantile_probability(PROBS, 0.5), [0.5, 0.5])


def test_majority_vote_ties_go_to_lower_class() -> None:
    # winners: 0, 1, 0, 1, and the 0.5/0.5 tie goes to class 0 -> 3/5, 2/5
    np.testing.assert_allclose(majority_vote(PROBS), [0.6, 0.4])


def test_three_classes() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    np.testing.assert_allclose(majority_vote(probs), [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(max_probability(probs), [0.7, 0.5, 0.6])
    np.testing.assert_allclose(top_k_mean(probs, 1), [0.7, 0.5, 0.6])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mean", Aggregation("mean")),
        ("topk:5", Aggregation("topk", 5)),
        ("topk:0.1", Aggregation("topk", 0.1)),
        ("quantile:0.9", Aggregation("quantile", 0.9)),
        ("quantile:1", Aggregation("quantile", 1.0)),
        ("vote", Aggregation("vote")),
    ],
)
def test_parse(text: str, expected: Aggregation) -> None:
    assert parse_aggregation(text) == expected


def test_keys_and_strings() -> None:
    assert parse_aggregation("topk:0.1").key == "topk0.1"
    assert str(parse_aggregation("quantile:0.9")) == "quantile:0.9"
    scores = aggregate_all(PROBS, [parse_aggregation("max"), parse_aggregation("topk:2")])
    assert list(scores) == ["max", "topk2"]
    np.testing.assert_allclose(aggregate(PROBS, "topk:2"), scores["topk2"])


@pytest.mark.parametrize("text", ["median", "topk", "mean:3", "topk:0", "topk:1.5", "quantile:2", "topk:x"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="aggregation|top-k|quantile"):
        parse_aggregation(text)


def test_empty_slide_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        mean_probability(np.zeros((0, 2)))
