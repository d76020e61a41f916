"""The DataModule and dataset: patient-disjoint splits, class balance, corrupt tiles, spawn-safe workers."""
from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from pathology.data import (CorruptTileError, EmptyTileSetError, ImageFolderSource, TileDataError, TileDataModule,
                            TileDataset, eval_transform)

CLASSES = ["neg", "pos"]


def _folder(root: Path, n_patients: int = 10, neg: int = 8, pos: int = 2) -> Path:
    """``root/<class>/P<p>_<i>.png``: each patient has ``neg`` grey and ``pos`` dark 8 px tiles."""
    for p in range(n_patients):
        for cls, n, value in (("neg", neg, 200), ("pos", pos, 40)):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(root / cls / f"P{p}_{i}.png"), np.full((8, 8, 3), value, np.uint8))
    return root


def _module(root: Path, split_csv: Path, **kwargs) -> TileDataModule:
    return TileDataModule(ImageFolderSource(root), CLASSES, split_csv, tile_size=8, resolution="10x", img_size=32,
                          batch_size=4, **kwargs)


def test_setup_splits_by_patient_and_saves_the_split(tmp_path: Path) -> None:
    dm = _module(_folder(tmp_path / "tiles"), tmp_path / "splits.csv", test_fraction=0.2, val_fraction=0.2)
    dm.setup("fit")
    patients = {name: set(t["patient_id"]) for name, t in dm.tables.items()}
    assert patients["train"].isdisjoint(patients["val"]) and patients["train"].isdisjoint(patients["test"])
    assert patients["val"].isdisjoint(patients["test"])
    assert sum(map(len, patients.values())) == 10 and len(patients["test"]) == 2  # a fifth of 10 patients
    saved = pd.read_csv(tmp_path / "splits.csv", dtype={"patient_id": str})
    assert set(saved["patient_id"]) == {f"P{p}" for p in range(10)}
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def test_balanced_sampling_draws_classes_equally(tmp_path: Path) -> None:
    dm = _module(_folder(tmp_path / "tiles"), tmp_path / "splits.csv", balanced_sampling=True, test_fraction=0.0)
    dm.setup("fit")
    assert dm.class_counts("train")[0] == 4 * dm.class_counts("train")[1]  # 8 : 2 per patient
    torch.manual_seed(0)
    drawn = np.array([dm.tables["train"]["label"][i] for i in dm.train_dataloader().sampler])
    assert abs(drawn.mean() - 0.5) < 0.15  # inverse-frequency weights: about half positives, not a fifth


def test_a_stain_reference_needs_stained_tiles(tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for p in range(5):
            cv2.imwrite(str(root / cls / f"P{p}_0.png"), np.full((8, 8, 3), 240, np.uint8))  # glass
    dm = _module(root, tmp_path / "splits.csv", stain_normalization="macenko")
    with pytest.raises(TileDataError, match=r"^ImageFolderSource: non-test tiles: \d+ tiles have under 2% stained"):
        dm.setup("fit")


def test_empty_and_unlabelled_tile_sets_are_refused(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "P1_a.png"), np.zeros((8, 8, 3), np.uint8))  # no class folders: unlabelled
    with pytest.raises(EmptyTileSetError, match="no labelled tiles"):
        _module(tmp_path, tmp_path / "splits.csv").setup("fit")
    with pytest.raises(EmptyTileSetError, match="empty"):
        TileDataset(pd.DataFrame(columns=["path", "tile_index", "slide_path", "label"]))


def test_corrupt_tile_names_the_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "tiles", n_patients=1)
    (root / "pos" / "P0_9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    dataset = TileDataset(ImageFolderSource(root).table(CLASSES))
    broken = list(dataset.paths).index(str(root / "pos" / "P0_9.png"))
    with pytest.raises(CorruptTileError, match="P0_9.png"):
        dataset[broken]


def test_dataset_pickles_and_loads_in_a_spawned_worker(tmp_path: Path) -> None:
    root = _folder(tmp_path / "tiles", n_patients=1, neg=2, pos=2)
    dataset = TileDataset(ImageFolderSource(root).table(CLASSES), eval_transform(16, (0.0,) * 3, (1.0,) * 3))
    dataset[0]
    assert pickle.loads(pickle.dumps(dataset))._readers == {}
    loader = DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    images, labels = next(iter(loader))
    # neg tiles are 200/255 grey, pos tiles 40/255: the label decides the pixel value.
    expected = torch.where(labels == 1, 40 / 255, 200 / 255)
    torch.testing.assert_close(images.mean(dim=(1, 2, 3)), expected.float(), atol=1e-4, rtol=0)


def test_no_validation_fold_trains_on_every_non_test_patient(tmp_path: Path) -> None:
    """``val_fold=None`` (the final fit after cross-validation): folds 0 … k-1 all train, nothing validates."""
    root, split_csv = _folder(tmp_path / "tiles"), tmp_path / "splits.csv"
    _module(root, split_csv, test_fraction=0.2, n_folds=4).setup("fit")  # makes the split file
    folds = pd.read_csv(split_csv, dtype={"patient_id": str}).set_index("patient_id")["fold"]
    dm = _module(root, split_csv, n_folds=4, val_fold=None)
    dm.setup("fit")
    assert set(dm.tables["train"]["patient_id"]) == set(folds[folds >= 0].index)
    assert set(dm.tables["test"]["patient_id"]) == set(folds[folds == -1].index)
    assert dm.tables["val"].empty and dm.val_dataloader() == []
    assert len(dm.tables["train"]) == 10 * len(folds[folds >= 0])  # 8 + 2 tiles per patient
