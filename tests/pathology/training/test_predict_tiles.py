"""``pathology predict-tiles`` on a tile CSV shaped like the shared data's manifests (path column ``file``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathology.checkpoint import ModelSpec, load_inference_model, save_checkpoint
from pathology.data import eval_transform, read_image
from pathology.models import create_model
from pathology.training.predict_tiles import main
from wsi_tiling import Resolution

CLASSES = ("non_idc", "idc")  # the IDC manifest's label values
TILE_PX = 50  # as stored
IMG_PX = 64  # model input (tiles are resized to it)
ROWS = 6  # 3 tiles of each class


@pytest.fixture(scope="module")
def idc_setup(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A few rows of the real IDC manifest (paths relative to the data root) and an untrained checkpoint."""
    root = tmp_path_factory.mktemp("idc")
    manifest = pd.read_csv(shared_data / "tiles" / "idc_breast" / "manifest.csv")
    rows = pd.concat([manifest[manifest["label"] == c].head(ROWS // 2) for c in CLASSES])
    listing = root / "manifest.csv"
    rows.to_csv(listing, index=False)
    spec = ModelSpec("efficientformer_tiny", {32: 1}, CLASSES, img_size=IMG_PX, tile_size=TILE_PX,
                     resolution=Resolution(1.0, "mpp"))
    model = create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=2, img_size=IMG_PX)
    return listing, save_checkpoint(root / "tiny.ckpt", model, spec)


def test_path_column_option_reads_a_manifest_with_file_paths(idc_setup, shared_data, tmp_path, capsys) -> None:
    listing, checkpoint = idc_setup
    out = tmp_path / "pred.csv"
    assert main(["--checkpoint", str(checkpoint), "--tiles", str(listing), "--path-column", "file",
                 "--image-root", str(shared_data), "--out", str(out), "--num-workers", "0"]) == 0
    pred = pd.read_csv(out)
    files = pd.read_csv(listing)["file"]
    assert pred["path"].tolist() == [str(shared_data / f) for f in files]
    assert pred["label"].tolist() == pd.read_csv(listing)["label"].tolist()
    assert "balanced_accuracy:" in capsys.readouterr().out
    # the shared prediction path (optimised model) computes what the plain model computes
    model, spec = load_inference_model(checkpoint)
    transform = eval_transform(spec.img_size, spec.mean, spec.std)
    images = torch.stack([transform(image=read_image(str(shared_data / f)))["image"] for f in files])
    with torch.no_grad():
        expected = model(images).softmax(dim=1).numpy()
    np.testing.assert_allclose(pred[["prob_non_idc", "prob_idc"]].to_numpy(), expected, atol=1e-5)


def test_manifest_without_a_path_column_names_the_file_and_its_columns(idc_setup, tmp_path, capsys) -> None:
    listing, checkpoint = idc_setup
    assert main(["--checkpoint", str(checkpoint), "--tiles", str(listing), "--out", str(tmp_path / "p.csv")]) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "manifest.csv" in message and "'path'" in message and "'file'" in message
    assert not (tmp_path / "p.csv").exists()
