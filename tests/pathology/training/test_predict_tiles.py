"""``pathology predict-tiles`` on a tile CSV shaped like the shared data's manifests (path column ``file``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathology.checkpoint import ModelSpec, load_inference_model, rewrite_spec, save_checkpoint
from pathology.data import eval_transform, read_image
from pathology.models import create_model
from pathology.stain import fit_stain_reference
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
                 "--image-root", str(shared_data), "--out", str(out), "--num-workers", "0",
                 "--precision", "32-true"]) == 0
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


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained two-class checkpoint for the 32-px tiles of ``tile_folder``."""
    torch.manual_seed(0)
    spec = ModelSpec("efficientformer_tiny", {32: 1}, ("neg", "pos"), img_size=32, tile_size=32,
                     resolution=Resolution(1.0, "mpp"))
    model = create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=2, img_size=32)
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt", model, spec)


def _predict(checkpoint: Path, tiles: Path, out: Path, *options: str) -> pd.DataFrame:
    assert main(["--checkpoint", str(checkpoint), "--tiles", str(tiles), "--out", str(out), "--num-workers", "0",
                 "--backend", "torch", *options]) == 0
    return pd.read_csv(out)


def test_a_stored_threshold_decides_the_predictions(tiny_checkpoint, tile_folder, tmp_path, capsys) -> None:
    checkpoint = tmp_path / "thr.ckpt"
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    argmax = _predict(checkpoint, tile_folder, tmp_path / "argmax.csv")
    p_pos = argmax["prob_pos"].to_numpy()
    assert (argmax["pred"] == np.where(p_pos > 0.5, "pos", "neg")).all()
    # a threshold inside the tiles' probabilities: the tiles between it and 0.5 change side
    threshold = float(np.quantile(p_pos, 0.25 if np.median(p_pos) > 0.5 else 0.75))
    expected = np.where(p_pos >= threshold, "pos", "neg")
    assert (expected != argmax["pred"]).any()
    rewrite_spec(checkpoint, decision_threshold=threshold)
    capsys.readouterr()
    stored = _predict(checkpoint, tile_folder, tmp_path / "stored.csv")
    assert stored["pred"].tolist() == expected.tolist()
    out = capsys.readouterr().out
    assert f"pos iff its probability >= {threshold:.4f} (the checkpoint's" in out
    labels = (stored["label"] == "pos").to_numpy()
    recall_pos, recall_neg = (expected == "pos")[labels].mean(), (expected == "neg")[~labels].mean()
    assert f"balanced_accuracy: {(recall_pos + recall_neg) / 2:.4f}" in out
    forced = _predict(checkpoint, tile_folder, tmp_path / "forced.csv", "--threshold", "argmax")
    assert forced["pred"].tolist() == argmax["pred"].tolist()
    assert "decision rule: argmax (--threshold argmax)" in capsys.readouterr().out
    override = _predict(checkpoint, tile_folder, tmp_path / "override.csv", "--threshold", "0")
    assert (override["pred"] == "pos").all()


def test_a_bad_threshold_is_refused(tiny_checkpoint, tile_folder, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tiny_checkpoint), "--tiles", str(tile_folder), "--out", str(tmp_path / "p.csv"),
              "--threshold", "1.5"])
    assert "neither a probability in [0, 1] nor 'argmax'" in capsys.readouterr().err


def test_tta_flag_and_the_spec_default(tiny_checkpoint, tile_folder, tmp_path) -> None:
    columns = ["prob_neg", "prob_pos"]
    plain = _predict(tiny_checkpoint, tile_folder, tmp_path / "plain.csv")[columns].to_numpy()
    tta = _predict(tiny_checkpoint, tile_folder, tmp_path / "tta.csv", "--tta")[columns].to_numpy()
    model, spec = load_inference_model(tiny_checkpoint)
    transform = eval_transform(spec.img_size, spec.mean, spec.std)
    paths = pd.read_csv(tmp_path / "tta.csv")["path"]
    images = torch.stack([transform(image=read_image(p))["image"] for p in paths])
    views = [torch.rot90(images, k, (2, 3)) for k in range(4)]
    with torch.no_grad():
        expected = torch.stack([model(v).softmax(dim=1) for v in views + [torch.flip(v, (3,)) for v in views]])
    np.testing.assert_allclose(tta, expected.mean(dim=0).numpy(), atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-4
    checkpoint = tmp_path / "spec_tta.ckpt"
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    rewrite_spec(checkpoint, tta=True)
    np.testing.assert_allclose(_predict(checkpoint, tile_folder, tmp_path / "d.csv")[columns], tta, atol=1e-6)
    np.testing.assert_allclose(_predict(checkpoint, tile_folder, tmp_path / "n.csv", "--no-tta")[columns], plain,
                               atol=1e-6)


def test_a_threshold_for_three_classes_is_one_line_naming_the_checkpoint(tile_folder, tmp_path, capsys) -> None:
    spec = ModelSpec("efficientformer_tiny", {32: 1}, ("a", "b", "c"), img_size=32, tile_size=32,
                     resolution=Resolution(1.0, "mpp"))
    model = create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=3, img_size=32)
    checkpoint = save_checkpoint(tmp_path / "three.ckpt", model, spec)
    assert main(["--checkpoint", str(checkpoint), "--tiles", str(tile_folder), "--out", str(tmp_path / "p.csv"),
                 "--threshold", "0.5"]) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "three.ckpt" in message and "two-class" in message
    assert not (tmp_path / "p.csv").exists()


def test_a_stain_reference_in_the_spec_normalises_the_tiles_as_training_did(tiny_checkpoint, tile_folder,
                                                                            tmp_path) -> None:
    columns = ["prob_neg", "prob_pos"]
    plain = _predict(tiny_checkpoint, tile_folder, tmp_path / "plain.csv")
    checkpoint = tmp_path / "stain.ckpt"
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    paths = sorted(tile_folder.rglob("*.png"))
    rewrite_spec(checkpoint, stain_reference=fit_stain_reference([read_image(p) for p in paths[::3]]))
    stained = _predict(checkpoint, tile_folder, tmp_path / "stained.csv")
    model, spec = load_inference_model(checkpoint)
    transform = eval_transform(spec.img_size, spec.mean, spec.std, spec.stain_reference)
    images = torch.stack([transform(image=read_image(p))["image"] for p in stained["path"]])
    with torch.no_grad():
        expected = model(images).softmax(dim=1).numpy()
    np.testing.assert_allclose(stained[columns].to_numpy(), expected, atol=1e-5)
    assert np.abs(stained[columns].to_numpy() - plain[columns].to_numpy()).max() > 1e-4
