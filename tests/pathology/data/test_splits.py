"""Patient-grouped stratified splits: no patient in two splits, saved once and reused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pathology.data import TEST_FOLD, SplitError, assign_splits, check_splits, load_or_make_folds, make_folds


def _table(n_patients: int = 20, tiles_per_patient: int = 10) -> pd.DataFrame:
    """Patients 0..n-1; even patients have only class 0 tiles, odd ones 30 % class 1."""
    rows = []
    for p in range(n_patients):
        labels = [0] * tiles_per_patient if p % 2 == 0 else [1] * 3 + [0] * (tiles_per_patient - 3)
        rows += [{"path": f"p{p}_{i}.png", "tile_index": -1, "slide_path": "", "label": label,
                  "patient_id": f"p{p}", "slide_id": f"s{p}"} for i, label in enumerate(labels)]
    return pd.DataFrame(rows)


def test_folds_group_by_patient_and_hold_out_a_fifth() -> None:
    table = _table()
    folds = make_folds(table, test_fraction=0.2, val_fraction=0.2, seed=1)
    assert sorted(folds["patient_id"]) == sorted(table["patient_id"].unique())  # one row per patient
    # 20 patients, test 1/5 -> 4 patients; the other 16 in round(0.8 / 0.2) = 4 folds of 4.
    assert (folds["fold"] == TEST_FOLD).sum() == 4
    assert sorted(folds.loc[folds["fold"] >= 0, "fold"].value_counts()) == [4, 4, 4, 4]
    split = assign_splits(table, folds, val_fold=0)
    check_splits(table, split, "splits.csv")
    for name in ("train", "val", "test"):  # stratified: both classes in every split
        assert set(table.loc[split == name, "label"]) == {0, 1}


def test_k_folds_cover_every_non_test_patient_once() -> None:
    folds = make_folds(_table(), test_fraction=0.0, n_folds=5, seed=0)
    assert sorted(folds["fold"].value_counts()) == [4] * 5


def test_no_validation_fraction_is_a_split_error_not_a_division_by_zero() -> None:
    with pytest.raises(SplitError, match="val_fraction=0"):
        make_folds(_table(), test_fraction=0.2, val_fraction=0.0)


def test_split_file_is_reused_not_redrawn(tmp_path: Path) -> None:
    table, path = _table(), tmp_path / "splits.csv"
    first = load_or_make_folds(path, table, seed=0)
    again = load_or_make_folds(path, table, seed=123)  # another seed must not redraw a saved split
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)


def test_split_file_for_other_patients_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old_splits.csv"
    pd.DataFrame({"patient_id": ["p0", "p1"], "fold": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(SplitError, match="old_splits.csv"):
        load_or_make_folds(path, _table())


def test_patient_listed_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.csv"
    patients = [f"p{p}" for p in range(20)] + ["p3"]
    pd.DataFrame({"patient_id": patients, "fold": [0] * 20 + [1]}).to_csv(path, index=False)
    with pytest.raises(SplitError, match="twice.csv.*p3"):
        load_or_make_folds(path, _table())


def test_patient_in_two_splits_is_caught() -> None:
    table = pd.DataFrame({"patient_id": ["p1", "p1", "p2", "p3", "p3"], "label": [0, 1, 0, 1, 0]})
    split = pd.Series(["train", "train", "val", "val", "test"])  # p3 is in val and in test
    with pytest.raises(SplitError, match="leak.csv.*p3"):
        check_splits(table, split, "leak.csv")


def test_split_with_one_class_is_refused() -> None:
    table = _table(4, 4)  # p0, p2: four class-0 tiles; p1, p3: three class-1 and one class-0 tile
    split = pd.Series(np.repeat(["val", "train", "val", "train"], 4))  # val = p0 + p2: class 0 only
    with pytest.raises(SplitError, match="one_class.csv.*val split"):
        check_splits(table, split, "one_class.csv")
