"""``pathology.training.fit``: typed values over the configs, loggers inside default_root_dir, config
typos that name their file and the closest key."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from jsonargparse import ArgumentError

from pathology.checkpoint import SPEC_KEY, load_inference_model
from pathology.data import eval_transform, read_image
from pathology.models.mhsa import MhsaBlocks
from pathology.stain import StainReference, fit_stain_reference
from pathology.training.cli import main
from pathology.training.fit import fit

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "configs" / "train_tiny.yaml"


def test_everything_lands_in_default_root_dir_and_values_are_typed(tile_folder: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped config names runs/tiny; --trainer.default_root_dir moves checkpoints and both logs.
    ``model.mhsa_blocks`` given as a value (no string) reaches the checkpoint."""
    work, root = tmp_path / "work", tmp_path / "DIR"
    work.mkdir()
    monkeypatch.chdir(work)
    result = fit(["--config", str(TINY_CONFIG), "--data.source.init_args.root", str(tile_folder),
                  "--trainer.default_root_dir", str(root), "--data.split_csv", str(root / "splits.csv")],
                 values={"model.mhsa_blocks": MhsaBlocks({16: 1, 32: 1}), "model.model_name": "efficientformer_tiny"})
    assert list(work.iterdir()) == []  # nothing under runs/tiny of the working folder
    assert result.best_checkpoint.is_relative_to(root)
    assert (root / "csv" / "version_0" / "metrics.csv").is_file()
    assert (root / "csv" / "version_0" / "config.yaml").is_file()
    assert list((root / "tensorboard").rglob("events.out.tfevents*"))
    spec = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)[SPEC_KEY]
    assert spec["mhsa_blocks"] == {16: 1, 32: 1} and spec["model_name"] == "efficientformer_tiny"
    assert "mhsa_blocks: 16:1,32:1" in (root / "csv" / "version_0" / "config.yaml").read_text()


@pytest.mark.parametrize(("typo", "message"), [
    ("model:\n  lrr: 0.1\n", "unknown key 'model.lrr'; did you mean 'model.lr'?"),
    ("trainer:\n  max_epoch: 1\n", "unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"),
    ("modl:\n  lr: 0.1\n", "unknown key 'modl.lr'; did you mean 'model.lr'?"),
])
def test_a_typo_in_a_config_names_the_file_and_the_closest_key(tile_folder: Path, tmp_path: Path, typo: str,
                                                                message: str) -> None:
    typo_file = tmp_path / "typo.yaml"
    typo_file.write_text(typo)
    with pytest.raises(ArgumentError) as raised:
        fit(["--config", str(TINY_CONFIG), "--config", str(typo_file)])
    assert str(raised.value).startswith(f"{typo_file}: {message}")


def test_cli_prints_the_file_of_a_typo(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo.yaml").write_text("data:\n  batchsize: 4\n")
    assert main(["--config", str(TINY_CONFIG), "--config=typo.yaml"]) == 2
    assert "typo.yaml: unknown key 'data.batchsize'; did you mean 'data.batch_size'?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_bad_value_names_the_config_files(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"train_tiny\.yaml: .*mhsa_blocks"):
        fit(["--config", str(TINY_CONFIG), "--model.mhsa_blocks", "64:1"])


def test_ema_and_mixup_options_train_and_their_checkpoint_loads_safely(tile_folder: Path, tmp_path: Path) -> None:
    """The range-checked options reach the checkpoint's hyper-parameters as plain floats (weights_only loads)."""
    result = fit(["--config", str(TINY_CONFIG), "--data.source.init_args.root", str(tile_folder),
                  "--trainer.default_root_dir", str(tmp_path), "--data.split_csv", str(tmp_path / "splits.csv"),
                  "--model.model_name", "efficientformer_tiny", "--model.ema_decay", "0.9",
                  "--model.mixup_alpha", "0.2", "--model.cutmix_alpha", "1.0", "--model.mixup_prob", "0.5"])
    hparams = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert (hparams["ema_decay"], hparams["mixup_alpha"], hparams["cutmix_alpha"], hparams["mixup_prob"]) == (
        0.9, 0.2, 1.0, 0.5)
    assert "test/auroc" in result.metrics


def _stains(reference: StainReference) -> np.ndarray:
    return np.concatenate([np.ravel(reference.stain_matrix), reference.max_concentrations])


def test_the_stain_reference_is_fitted_on_the_non_test_tiles_and_saved(tile_folder: Path, tmp_path: Path) -> None:
    """Fewer non-test tiles than the fitting sample: all of them, and no test tile, make the reference."""
    result = fit(["--config", str(TINY_CONFIG), "--data.source.init_args.root", str(tile_folder),
                  "--trainer.default_root_dir", str(tmp_path), "--data.split_csv", str(tmp_path / "splits.csv"),
                  "--model.model_name", "efficientformer_tiny", "--data.stain_normalization", "macenko"])
    _, spec = load_inference_model(result.best_checkpoint)
    non_test = pd.concat([result.tables["train"], result.tables["val"]])["path"]
    expected = fit_stain_reference([read_image(p) for p in non_test])
    np.testing.assert_allclose(_stains(spec.stain_reference), _stains(expected), rtol=1e-9)
    with_test = fit_stain_reference([read_image(p) for p in [*non_test, *result.tables["test"]["path"]]])
    assert np.abs(_stains(spec.stain_reference) - _stains(with_test)).max() > 1e-6


@pytest.mark.parametrize(("key", "value"), [("ema_decay", "1.0"), ("mixup_alpha", "-0.1"), ("mixup_prob", "1.5")])
def test_out_of_range_ema_and_mixup_options_fail_at_parse_time(key: str, value: str) -> None:
    with pytest.raises(ArgumentError, match=key):
        fit(["--config", str(TINY_CONFIG), f"--model.{key}", value])
def _tta_probs_by_hand(checkpoint: Path, paths: list[Path]) -> np.ndarray:
    """(N, 2) softmax of the checkpoint's model averaged over the 8 dihedral views of each tile."""
    model, spec = load_inference_model(checkpoint)
    transform = eval_transform(spec.img_size, spec.mean, spec.std)
    images = torch.stack([transform(image=read_image(str(p)))["image"] for p in paths])
    rotations = [torch.rot90(images, k, (2, 3)) for k in range(4)]
    with torch.no_grad():
        return torch.stack([model(v).softmax(dim=1) for v in rotations + [torch.flip(r, (3,)) for r in rotations]]
                           ).mean(dim=0).numpy()


def _youden_by_hand(is_positive: np.ndarray, score: np.ndarray) -> float:
    """The highest of the scores maximising sensitivity + specificity - 1 when used as the threshold."""
    def youden(t: float) -> float:
        return (score[is_positive] >= t).mean() - (score[~is_positive] >= t).mean()
    candidates = np.unique(score)[::-1]
    return float(candidates[np.argmax([youden(t) for t in candidates])])


def test_threshold_is_chosen_on_validation_patients_and_used_for_the_test_metrics(tile_folder: Path,
                                                                                   tmp_path: Path) -> None:
    root = tmp_path / "run"
    result = fit(["--config", str(TINY_CONFIG), "--data.source.init_args.root", str(tile_folder),
                  "--trainer.default_root_dir", str(root), "--data.split_csv", str(root / "splits.csv")],
                 values={"model.model_name": "efficientformer_tiny", "model.tta": True,
                         "model.decision_rule": "youden"})
    _, spec = load_inference_model(result.best_checkpoint)
    assert spec.tta is True and spec.decision_threshold == result.metrics["val/decision_threshold"]
    folds = pd.read_csv(root / "splits.csv")
    tiles = sorted(tile_folder.rglob("*.png"))

    def split(fold: int) -> tuple[np.ndarray, np.ndarray]:
        patients = set(folds.loc[folds["fold"] == fold, "patient_id"])
        paths = [p for p in tiles if p.stem.split("_")[0] in patients]
        is_positive = np.array([p.parent.name == "pos" for p in paths])
        return is_positive, _tta_probs_by_hand(result.best_checkpoint, paths)[:, 1]

    val_positive, val_score = split(0)
    assert spec.decision_threshold == pytest.approx(_youden_by_hand(val_positive, val_score), abs=1e-5)
    test_positive, test_score = split(-1)
    assert _youden_by_hand(test_positive, test_score) != pytest.approx(spec.decision_threshold, abs=1e-5)  # not test's
    predicted = test_score >= spec.decision_threshold
    balanced = (predicted[test_positive].mean() + (~predicted[~test_positive]).mean()) / 2
    assert result.metrics["test/balanced_accuracy"] == pytest.approx(balanced)
