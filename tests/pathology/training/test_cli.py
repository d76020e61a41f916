"""``pathology train`` end to end on a tiny tile set: loss falls, metrics and checkpoints are written,
training resumes, the checkpoint feeds ``predict-tiles``, and bad input fails with a clear message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathology.checkpoint import SPEC_KEY, load_inference_model
from pathology.training import predict_tiles
from pathology.training.cli import main
from pathology.training.fit import FitResult, fit
from tests.pathology.training.conftest import N_PATIENTS, TILES_PER_CLASS

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "configs" / "train_tiny.yaml"


def tiny_args(tile_folder: Path, *extra: str) -> list[str]:
    """``pathology train`` arguments for the tiny config; it writes under ``runs/tiny`` of the working folder."""
    return ["--config", str(TINY_CONFIG), "--data.source.init_args.root", str(tile_folder), *extra]


STEPS_PER_EPOCH = 4  # limit_train_batches of the tiny config


@pytest.fixture(scope="module")
def trained(tile_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FitResult]:
    """Two epochs (8 steps) of the tiny config; returns (working folder, result)."""
    work = tmp_path_factory.mktemp("train")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return work, fit(tiny_args(tile_folder, "--trainer.max_epochs", "2"))
    finally:
        os.chdir(cwd)


def test_loss_falls_and_metrics_are_logged(trained: tuple[Path, FitResult]) -> None:
    work, result = trained
    metrics = pd.read_csv(work / "runs/tiny/csv/version_0/metrics.csv")
    steps = metrics["train/loss_step"].dropna().to_numpy()
    assert len(steps) == 2 * STEPS_PER_EPOCH
    assert steps[-2:].mean() < 0.5 * steps[:2].mean()
    for key in ("val/balanced_accuracy", "val/f1", "val/auroc", "val/cm_1_1", "test/auroc"):
        assert metrics[key].notna().any(), key
    assert result.metrics["test/balanced_accuracy"] > 0.5  # better than chance on held-out patients
    assert list((work / "runs/tiny/tensorboard").rglob("events.out.tfevents*"))
    assert (work / "runs/tiny/csv/version_0/config.yaml").is_file()  # the resolved config of the run


def test_checkpoint_carries_what_inference_needs(trained: tuple[Path, FitResult]) -> None:
    _, result = trained
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    spec = ckpt[SPEC_KEY]
    assert spec["class_names"] == ["neg", "pos"] and spec["tile_size"] == 32 and spec["img_size"] == 32
    assert spec["resolution"] == {"value": 10.0, "unit": "power"} and spec["model_name"] == "efficientformer_l1"
    assert (result.best_checkpoint.parent / "last.ckpt").is_file()
    model, loaded = load_inference_model(result.best_checkpoint)
    assert loaded.mean == (0.485, 0.456, 0.406) and not model.training


def test_resume_continues_from_last_checkpoint(trained: tuple[Path, FitResult], tile_folder: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    work, result = trained
    monkeypatch.chdir(work)
    last = result.best_checkpoint.parent / "last.ckpt"
    fit(tiny_args(tile_folder, "--trainer.max_epochs", "3", "--ckpt_path", str(last)))
    resumed = sorted((work / "runs/tiny/csv").glob("version_*/checkpoints/last.ckpt"))[-1]
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == 3 * STEPS_PER_EPOCH


def test_predict_tiles_writes_probabilities_and_metrics(trained: tuple[Path, FitResult], tile_folder: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred.csv"
    assert predict_tiles.main(["--checkpoint", str(trained[1].best_checkpoint), "--tiles", str(tile_folder),
                               "--out", str(out)]) == 0
    pred = pd.read_csv(out)
    assert len(pred) == 2 * N_PATIENTS * TILES_PER_CLASS
    np.testing.assert_allclose(pred["prob_neg"] + pred["prob_pos"], 1.0, atol=1e-5)
    assert set(pred["label"]) == {"neg", "pos"} and (pred["label"] == pred["pred"]).mean() > 0.5
    assert "balanced_accuracy:" in capsys.readouterr().out


def test_unknown_config_key_fails_at_parse_time(tile_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(tiny_args(tile_folder, "--model.learning_rate", "0.1")) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_print_config_shows_linked_values(tile_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(tiny_args(tile_folder, "--print_config")) == 0
    printed = capsys.readouterr().out
    assert "class_names:" in printed and "img_size: 32" in printed


def test_corrupt_tile_stops_training_naming_it(tile_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "tiles"
    for cls in ("neg", "pos"):
        (broken / cls).mkdir(parents=True)
        for png in (tile_folder / cls).glob("*.png"):
            (broken / cls / png.name).write_bytes(png.read_bytes()[: 30 if png.name == "P0_0.png" else None])
    monkeypatch.chdir(tmp_path)
    assert main(tiny_args(broken, "--trainer.limit_train_batches", "1.0")) == 1
    assert "P0_0.png" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_ddp_on_two_cpu_processes(tile_folder: Path, tmp_path: Path) -> None:
    args = tiny_args(tile_folder, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     "--trainer.limit_train_batches", "2", "--data.test_fraction", "0")
    run = subprocess.run([sys.executable, "-m", "pathology.cli", "train", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    last = tmp_path / "runs/tiny/csv/version_0/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and SPEC_KEY in ckpt


def test_predict_unlabelled_real_tiles_has_no_label_column(trained: tuple[Path, FitResult], shared_data: Path,
                                                          tmp_path: Path) -> None:
    # Kather's class folders (01_TUMOR, ...) are not this checkpoint's classes: labels are unknown.
    out = tmp_path / "kather.csv"
    assert predict_tiles.main(["--checkpoint", str(trained[1].best_checkpoint),
                               "--tiles", str(shared_data / "tiles/kather2016_samples"), "--out", str(out)]) == 0
    pred = pd.read_csv(out)
    assert len(pred) == 24 and "label" not in pred.columns  # 3 tiles of each of 8 classes
    assert set(pred["pred"]) <= {"neg", "pos"}


def test_predict_missing_checkpoint_names_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert predict_tiles.main(["--checkpoint", str(tmp_path / "gone.ckpt"), "--tiles", str(tmp_path),
                               "--out", str(tmp_path / "p.csv")]) == 1
    assert "gone.ckpt" in capsys.readouterr().err
