"""``pathology cv``: one model per fold with a summary, finished folds skipped on a rerun, the final fit
on train + val patients only, out-of-fold probabilities, and the fold ensemble as one checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathology.checkpoint import load_inference_model
from pathology.data import eval_transform, read_image
from pathology.inference.predict import RunOptions
from pathology.models.ensemble import Ensemble
from pathology.training.cv import cross_validate, final_epochs, main
from pathology.training.predict_tiles import main as predict_tiles_main
from tests.pathology.training.conftest import N_PATIENTS, TILES_PER_CLASS

REPO = Path(__file__).resolve().parents[3]
TINY_CONFIG = REPO / "configs" / "train_tiny.yaml"
N_FOLDS = 3
TEST_PATIENTS = 2  # test_fraction 0.25 of 8 patients
TILES_PER_PATIENT = 2 * TILES_PER_CLASS  # one batch of each class


@pytest.fixture(scope="module")
def cv_run(tile_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """One CV run of 3 folds (1 epoch each), the final fit and the ensemble, on the tiny tiles, with a
    decision threshold chosen on validation patients."""
    root = tmp_path_factory.mktemp("cv")
    args = ["--config", str(TINY_CONFIG), "--data.source.init_args.root", str(tile_folder),
            "--data.split_csv", str(root / "splits.csv"), "--data.n_folds", str(N_FOLDS),
            "--model.model_name", "efficientformer_tiny", "--model.mhsa_blocks", "32:1",
            "--model.decision_rule", "youden"]
    assert main(["--out", str(root / "out"), "--backend", "torch", "--precision", "32-true", *args]) == 0
    return args, root


def test_epoch_rule_is_the_rounded_up_median_of_epochs_to_the_best() -> None:
    assert final_epochs([0, 1, 5]) == 2  # median of 1, 2, 6
    assert final_epochs([0, 3]) == 3  # median of 1 and 4 is 2.5
    assert final_epochs([9, 9, 9, 9]) == 10


def test_one_model_per_fold_and_a_summary(cv_run) -> None:
    _, root = cv_run
    out = root / "out"
    summary = pd.read_csv(out / "cv_summary.csv")
    assert summary["fold"].tolist() == list(range(N_FOLDS))
    assert summary["best_epoch"].tolist() == [0] * N_FOLDS  # one epoch each
    assert all(Path(p).is_file() and Path(p).is_relative_to(out / f"fold_{k}")
               for k, p in zip(summary["fold"], summary["checkpoint"]))
    assert summary[["val_balanced_accuracy", "val_f1", "val_auroc"]].apply(lambda c: c.between(0, 1)).all().all()
    json_summary = pd.read_json(out / "cv_summary.json", typ="series")
    assert json_summary["final_epochs"] == 1
    assert json_summary["mean"]["val_auroc"] == pytest.approx(summary["val_auroc"].mean())
    assert json_summary["sd"]["val_auroc"] == pytest.approx(summary["val_auroc"].std(ddof=1))
    assert set(json_summary["test"]) == {f"{m}/{k}" for m in ("final", "ensemble")
                                         for k in ("balanced_accuracy", "f1", "auroc")}


def test_out_of_fold_predictions_cover_every_non_test_tile_once(cv_run) -> None:
    _, root = cv_run
    oof = pd.read_csv(root / "out" / "oof_predictions.csv", dtype={"patient_id": str})
    folds = pd.read_csv(root / "splits.csv", dtype={"patient_id": str}).set_index("patient_id")["fold"]
    assert len(oof) == (N_PATIENTS - TEST_PATIENTS) * TILES_PER_PATIENT and oof["path"].is_unique
    assert (oof["fold"] == oof["patient_id"].map(folds)).all()  # each tile predicted by the model that never saw it
    assert np.allclose(oof["prob_neg"] + oof["prob_pos"], 1.0, atol=1e-5)


def test_the_final_fit_trains_on_train_and_val_patients_only(cv_run) -> None:
    _, root = cv_run
    final = pd.read_json(root / "out" / "final" / "result.json", typ="series")
    assert final["train_tiles"] == (N_PATIENTS - TEST_PATIENTS) * TILES_PER_PATIENT
    assert final["epochs"] == 1 and Path(final["checkpoint"]).is_file()
    assert not list((root / "out" / "final").rglob("best-*.ckpt"))  # nothing validated, the last epoch kept
    test = pd.read_csv(root / "out" / "final" / "test_predictions.csv", dtype={"patient_id": str})
    folds = pd.read_csv(root / "splits.csv", dtype={"patient_id": str}).set_index("patient_id")["fold"]
    assert (test["patient_id"].map(folds) == -1).all() and test["patient_id"].nunique() == TEST_PATIENTS


def _youden_j(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Sensitivity + specificity - 1 of calling ``scores >= threshold`` positive."""
    called = scores >= threshold
    return called[labels == 1].mean() - called[labels == 0].mean()


def test_final_and_ensemble_hold_the_threshold_best_on_out_of_fold_probabilities(cv_run) -> None:
    """Their threshold maximises Youden's J over every non-test tile, each predicted by the fold model
    that never trained on it (brute force over the observed scores); test tiles play no part."""
    _, root = cv_run
    oof = pd.read_csv(root / "out" / "oof_predictions.csv")
    labels, scores = (oof["label"] == "pos").to_numpy().astype(int), oof["prob_pos"].to_numpy()
    best_j = max(_youden_j(labels, scores, t) for t in np.unique(scores))
    final = pd.read_json(root / "out" / "final" / "result.json", typ="series")
    threshold = load_inference_model(root / "out" / "ensemble.ckpt")[1].decision_threshold
    assert load_inference_model(final["checkpoint"])[1].decision_threshold == threshold
    assert final["decision_threshold"] == pytest.approx(threshold, abs=1e-12)  # pandas parses JSON floats loosely
    assert _youden_j(labels, scores, threshold) == pytest.approx(best_j)


def test_a_rerun_skips_finished_folds(cv_run) -> None:
    args, root = cv_run
    out = root / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")}
    result = cross_validate(args, out, options=RunOptions(backend="torch"))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")} == before  # nothing trained or rewritten
    assert not list(out.glob("fold_*/csv/version_1"))
    assert [f.fold for f in result.folds] == list(range(N_FOLDS))


def test_the_ensemble_is_the_mean_of_the_fold_models(cv_run, tile_folder: Path) -> None:
    _, root = cv_run
    ensemble, spec = load_inference_model(root / "out" / "ensemble.ckpt")
    assert isinstance(ensemble, Ensemble) and spec.ensemble_size == N_FOLDS
    members = [load_inference_model(p)[0] for p in pd.read_csv(root / "out" / "cv_summary.csv")["checkpoint"]]
    transform = eval_transform(spec.img_size, spec.mean, spec.std)
    tiles = sorted(tile_folder.rglob("*.png"))[::10]
    images = torch.stack([transform(image=read_image(str(p)))["image"] for p in tiles])
    with torch.no_grad():
        expected = sum(m(images).softmax(dim=1) for m in members) / N_FOLDS
        torch.testing.assert_close(ensemble(images).softmax(dim=1), expected, atol=1e-6, rtol=0)


def test_predict_tiles_loads_the_ensemble(cv_run, tile_folder: Path, tmp_path: Path) -> None:
    _, root = cv_run
    out = tmp_path / "pred.csv"
    assert predict_tiles_main(["--checkpoint", str(root / "out" / "ensemble.ckpt"), "--tiles", str(tile_folder),
                               "--out", str(out), "--backend", "torch", "--num-workers", "0"]) == 0
    assert len(pd.read_csv(out)) == N_PATIENTS * TILES_PER_PATIENT


def test_a_split_file_with_one_fold_is_refused(cv_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args, root = cv_run
    one_fold = tmp_path / "one_fold.csv"
    folds = pd.read_csv(root / "splits.csv")
    folds.assign(fold=np.where(folds["fold"] == -1, -1, 0)).to_csv(one_fold, index=False)
    assert main(["--out", str(tmp_path / "out"), *args, "--data.split_csv", str(one_fold)]) == 1
    assert f"{one_fold}: cross-validation needs folds 0 … k-1 with k >= 2, found [0]" in capsys.readouterr().err
