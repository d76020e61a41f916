"""GeoJSON tiles checked against the GeoJSON schema (RFC 7946) and QuPath's object properties."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from pathology.inference.geojson import write_geojson

POSITION = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
RING = {"type": "array", "items": POSITION, "minItems": 4}
SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {"type": "array", "items": {
            "type": "object",
            "required": ["type", "geometry", "properties"],
            "properties": {
                "type": {"const": "Feature"},
                "geometry": {"type": "object", "required": ["type", "coordinates"], "properties": {
                    "type": {"const": "Polygon"}, "coordinates": {"type": "array", "items": RING, "minItems": 1}}},
                "properties": {"type": "object", "required": ["objectType", "classification", "measurements"],
                               "properties": {
                                   "objectType": {"enum": ["tile", "detection", "annotation"]},
                                   "classification": {"type": "object", "required": ["name", "color"], "properties": {
                                       "name": {"type": "string"},
                                       "color": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 255},
                                                 "minItems": 3, "maxItems": 3}}},
                                   "measurements": {"type": "object",
                                                    "additionalProperties": {"type": "number"}}}},
            },
        }},
    },
}


def test_geojson_schema_and_geometry(tmp_path) -> None:
    xy = np.array([[0, 0], [512, 256]])
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    path = write_geojson(tmp_path / "slide.geojson", xy, 512, probs, ["normal", "tumour"])
    collection = json.loads(path.read_text())
    jsonschema.validate(collection, SCHEMA)
    first, second = collection["features"]
    # The second tile spans x 512..1024, y 256..768 and closes on its first corner.
    ring = second["geometry"]["coordinates"][0]
    assert ring == [[512, 256], [1024, 256], [1024, 768], [512, 768], [512, 256]]
    assert first["properties"]["classification"]["name"] == "normal"
    assert second["properties"]["classification"]["name"] == "tumour"
    measurements = second["properties"]["measurements"]
    assert measurements == {"prob normal": pytest.approx(0.3), "prob tumour": pytest.approx(0.7)}
    assert first["properties"]["classification"]["color"] != second["properties"]["classification"]["color"]


def test_geojson_rejects_mismatched_lengths(tmp_path) -> None:
    with pytest.raises(ValueError):
        write_geojson(tmp_path / "x.geojson", np.zeros((2, 2)), 10, np.ones((3, 2)) / 2, ["a", "b"])
    assert not (tmp_path / "x.geojson").exists()
