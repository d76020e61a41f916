"""A two-class synthetic slide set whose right answers are known, and a model that separates it.

Slides are 512 µm squares at 0.5 µm/px (20x) holding one 320 µm tissue box, tiled at 2 µm/px
into 32-px (64 µm) tiles: the box covers exactly 5 × 5 tiles. Class ``pink`` slides have eosin-pink
tissue, class ``blue`` slides blue tissue of the same saturation (so tissue detection treats them
alike). The ``mixed`` slide is pink with its last tile column blue: 5 of its 25 tiles are blue.

The model is a freshly created EfficientFormer-tiny for 32-px inputs whose two heads are set, in
closed form, to the nearest-class-mean rule on the embeddings of a pure pink and a pure blue tile
(logit ±20), so it calls every pure tile right with probability 1 − 2e-9; no training needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathology.checkpoint import ModelSpec, save_checkpoint
from pathology.data import eval_transform
from pathology.models import create_model
from wsi_tiling import Resolution
from wsi_tiling.synthetic import WHITE, write_slide

SLIDE_MPP = 0.5
SLIDE_PX = 1024  # 512 µm
BOX_PX = (256, 896)  # tissue from 128 to 448 µm on both axes
BLUE_COLUMN_PX = 768  # mixed slide: blue from 384 µm, i.e. the last of 5 tile columns
PINK = (230, 150, 200)
BLUE = (150, 170, 230)  # same HSV saturation as PINK
TILE_PX = 32
MODEL_MPP = 2.0
CLASSES = ("pink", "blue")
LOGIT = 20.0


def tissue_image(left: tuple[int, int, int], right: tuple[int, int, int] | None = None) -> np.ndarray:
    """A level-0 slide image: glass with the tissue box in ``left``, its last column in ``right``."""
    image = np.full((SLIDE_PX, SLIDE_PX, 3), WHITE, np.uint8)
    lo, hi = BOX_PX
    image[lo:hi, lo:hi] = left
    if right is not None:
        image[lo:hi, BLUE_COLUMN_PX:hi] = right
    return image


def _fit_heads(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Sets both heads to the nearest-mean rule between a pure pink and a pure blue tile."""
    transform = eval_transform(spec.img_size, spec.mean, spec.std)
    tiles = torch.stack([transform(image=np.full((TILE_PX, TILE_PX, 3), c, np.uint8))["image"] for c in (PINK, BLUE)])
    model.eval()
    with torch.no_grad():
        pink, blue = model.forward_head(model.forward_features(tiles), pre_logits=True)
        direction = (blue - pink) / (blue - pink).square().sum()
        for head in model.get_classifier():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[1] = 2 * LOGIT * direction
            head.bias[1] = -2 * LOGIT * direction @ (pink + blue) / 2


@dataclass(frozen=True)
class TwoClassSet:
    """The written set and its known answers.

    Attributes:
        root: folder holding everything.
        slides: folder of the six slides (pink_1, pink_2, blue_1, blue_2, mixed, blank).
        slide: every slide by name, plus ``coarse`` (4 µm/px, outside ``slides``).
        labels: CSV slide_id,label of the five slides with tissue (mixed labelled pink).
        checkpoint: the tiny model's checkpoint.
    """

    root: Path
    slides: Path
    slide: dict[str, Path]
    labels: Path
    checkpoint: Path


@pytest.fixture(scope="session")
def two_class_set(tmp_path_factory: pytest.TempPathFactory) -> TwoClassSet:
    """Slides, labels and a checkpoint that separates them, written once per session."""
    root = tmp_path_factory.mktemp("two_class")
    slides = root / "slides"
    slides.mkdir()
    images = {"pink_1": tissue_image(PINK), "pink_2": tissue_image(PINK), "blue_1": tissue_image(BLUE),
              "blue_2": tissue_image(BLUE), "mixed": tissue_image(PINK, BLUE), "blank": tissue_image(WHITE)}
    paths = {name: write_slide(slides / f"{name}.svs", image, mpp=SLIDE_MPP, objective_power=20,
                               downsamples=(1, 4), compression="zlib") for name, image in images.items()}
    # 4 µm/px (2.5x) cannot give the model's 2 µm/px without upsampling.
    paths["coarse"] = write_slide(root / "coarse.svs", tissue_image(PINK)[::8, ::8], mpp=4.0, objective_power=2.5,
                                  downsamples=(1,), compression="zlib")
    labels = root / "labels.csv"
    pd.DataFrame({"slide_id": ["pink_1", "pink_2", "blue_1", "blue_2", "mixed"],
                  "label": ["pink", "pink", "blue", "blue", "pink"]}).to_csv(labels, index=False)
    spec = ModelSpec("efficientformer_tiny", {32: 1}, CLASSES, img_size=TILE_PX, tile_size=TILE_PX,
                     resolution=Resolution(MODEL_MPP, "mpp"))
    model = create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=2, img_size=spec.img_size)
    _fit_heads(model, spec)
    checkpoint = save_checkpoint(root / "model" / "tiny.ckpt", model, spec)
    return TwoClassSet(root, slides, paths, labels, checkpoint)
