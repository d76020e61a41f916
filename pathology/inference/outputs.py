"""Per-slide files of an inference run: the tile-prediction h5, heatmaps, GeoJSON and galleries."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pathology.checkpoint import ModelSpec
from pathology.inference.geojson import write_geojson
from pathology.inference.heatmap import save_gallery, save_heatmap, tile_value_map
from pathology.atomic import atomic_path
from wsi_tiling import SlideReader, TileReader, read_thumbnail
from wsi_tiling.inputs import SlideJob

__all__ = ["Extras", "FEATURES_DIR", "write_extras", "write_features", "write_slide_predictions"]

FEATURES_DIR = "features"

HEATMAP_MAX_SIDE_PX = 1024  # longest edge of the thumbnail the heatmaps are drawn on


@dataclass(frozen=True)
class Extras:
    """What to write besides ``slides.csv`` and the tile probabilities.

    Attributes:
        embeddings: ``features/<slide_id>.h5``, the (N, D) tile embeddings
            (``forward_head(pre_logits=True)``) in the layout CLAM's and TRIDENT's loaders read.
        heatmaps: ``heatmaps/<slide_id>_<class>.png``, the class probability over the thumbnail.
        geojson: ``geojson/<slide_id>.geojson``, tiles with probabilities for QuPath.
        gallery_k: if > 0, ``gallery/<slide_id>_<class>.png`` with the k most probable tiles.
    """

    embeddings: bool = False
    heatmaps: bool = False
    geojson: bool = False
    gallery_k: int = 0


def write_slide_predictions(path: Path, reader: TileReader, probs: np.ndarray, spec: ModelSpec, match: str) -> Path:
    """Writes ``coords`` (N×2 level-0 px) and ``probs`` (N×C float32), atomically.

    Attributes of ``probs`` record the classes (JSON list), the model and its requested
    resolution, the match mode, the tile store and what it delivered (``target_mpp``: the µm/px
    the slide was read at; ``slide_mpp``; ``patch_size_level0``: a tile's level-0 footprint), so
    the file stands on its own.
    """
    info = reader.info
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as file:
        file.create_dataset("coords", data=reader.coords.astype(np.int64))
        dataset = file.create_dataset("probs", data=probs.astype(np.float32))
        dataset.attrs["class_names"] = json.dumps(list(spec.class_names))
        dataset.attrs["model_name"] = spec.model_name
        dataset.attrs["resolution"] = str(spec.resolution)
        dataset.attrs["match"] = match
        dataset.attrs["tile_store"] = str(reader.h5_path)
        dataset.attrs["slide_path"] = str(reader.slide_path)
        dataset.attrs.update({"patch_size": info.tile_size, "patch_size_level0": info.patch_size_level0,
                              "target_mpp": info.target_mpp, "slide_mpp": info.slide_mpp,
                              "read_level": info.read_level, "resize_factor": info.resize_factor,
                              **{key: reader.attrs[key] for key in ("level0_width", "level0_height")}})
    return path


def write_features(path: Path, reader: TileReader, embeddings: np.ndarray, spec: ModelSpec) -> Path:
    """Writes a slide's feature file for slide-level models, atomically.

    The layout CLAM's and TRIDENT's feature loaders read as is: ``features`` (N×D float32) and
    ``coords`` (N×2 int64, level-0 x, y of each tile's top-left corner), ``coords`` carrying
    every attribute of the tile store (CLAM's ``patch_size``/``patch_level``, TRIDENT's
    ``patch_size_level0``/``target_magnification``, and the µm/px asked for and delivered).
    """
    with h5py.File(reader.h5_path, "r") as store:
        store_attrs = dict(store["coords"].attrs.items())
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as file:
        features = file.create_dataset("features", data=embeddings.astype(np.float32))
        coords = file.create_dataset("coords", data=reader.coords.astype(np.int64))
        coords.attrs.update(store_attrs)
        features.attrs["model_name"] = spec.model_name
        features.attrs["resolution"] = str(spec.resolution)
        features.attrs["source"] = "forward_head(pre_logits=True)"
    return path


def write_extras(out_dir: Path, job: SlideJob, reader: TileReader, probs: np.ndarray, spec: ModelSpec,
                 extras: Extras) -> list[Path]:
    """Writes the pictures and QuPath objects ``extras`` asks for, for one slide.

    Returns:
        The files written.

    Raises:
        WsiTilingError: the slide cannot be read for its thumbnail or gallery tiles.
    """
    tile_level0 = float(reader.info.patch_size_level0)
    written = []
    if extras.geojson:
        written.append(write_geojson(out_dir / "geojson" / f"{job.slide_id}.geojson", reader.coords, tile_level0,
                                     probs, spec.class_names))
    if extras.heatmaps:
        with SlideReader(job.slide_path) as slide:
            thumbnail, _ = read_thumbnail(slide, HEATMAP_MAX_SIDE_PX, slide_mpp=job.mpp)
            size_level0 = slide.dimensions
        for c, name in enumerate(spec.class_names):
            value_map = tile_value_map(reader.coords, tile_level0, probs[:, c], size_level0, thumbnail.shape[1::-1])
            written.append(out_dir / "heatmaps" / f"{job.slide_id}_{name}.png")
            save_heatmap(written[-1], thumbnail, value_map, f"{job.slide_id}: {name}")
    if extras.gallery_k > 0:
        for c, name in enumerate(spec.class_names):
            best = np.argsort(-probs[:, c], kind="stable")[: extras.gallery_k]
            written.append(out_dir / "gallery" / f"{job.slide_id}_{name}.png")
            save_gallery(written[-1], [reader[int(i)] for i in best], probs[best, c].tolist(),
                         f"{job.slide_id}: top {len(best)} {name} tiles")
    return written
