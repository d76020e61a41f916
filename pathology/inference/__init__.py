"""Slide-level inference: tile predictions, aggregation into slide scores, calibration, evaluation."""
from pathology.inference.aggregate import DEFAULT_AGGREGATIONS, Aggregation, aggregate, aggregate_all, parse_aggregation

__all__ = ["Aggregation", "DEFAULT_AGGREGATIONS", "aggregate", "aggregate_all", "parse_aggregation"]
