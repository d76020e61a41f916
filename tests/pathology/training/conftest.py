"""Shared by the training tests: a tiny folder of labelled tiles."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

CLASS_COLOURS = {"neg": (230, 150, 200), "pos": (70, 30, 120)}  # eosin pink, haematoxylin purple (RGB)
N_PATIENTS, TILES_PER_CLASS, TILE_PX = 8, 6, 32


@pytest.fixture(scope="session")
def tile_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiles/<class>/P<p>_<i>.png``: 8 patients with 6 noisy tiles of each class, 32 px."""
    root = tmp_path_factory.mktemp("tiny_tiles") / "tiles"
    rng = np.random.default_rng(0)
    for name, rgb in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for p in range(N_PATIENTS):
            for i in range(TILES_PER_CLASS):
                tile = np.clip(np.array(rgb) + rng.normal(0, 25, (TILE_PX, TILE_PX, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / name / f"P{p}_{i}.png"), tile[..., ::-1])
    return root
