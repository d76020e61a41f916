"""Patient-grouped, label-stratified splits, saved to a CSV and reused.

Tiles of one patient are strongly correlated, so every split groups by patient: a patient's tiles
are all in train, all in val or all in test. A split file has one row per patient and a ``fold``
column: ``-1`` is the held-out test set, ``0 … k-1`` are the folds of cross-validation; the
validation set of a run is one fold (``val_fold``), training is the other folds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pathology.atomic import atomic_path
from pathology.data.errors import SplitError
from pathology.data.sources import read_table

__all__ = ["TEST_FOLD", "make_folds", "load_or_make_folds", "assign_splits", "check_splits"]

TEST_FOLD = -1
SPLITS = ("train", "val", "test")


def _first_fold(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Boolean mask of the first fold of a stratified group k-fold."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    return mask


def make_folds(table: pd.DataFrame, *, test_fraction: float = 0.2, val_fraction: float = 0.2,
               n_folds: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Assigns each patient to the test set or to one of k folds, stratified by tile label.

    Args:
        table: tile table with ``label`` and ``patient_id`` (unlabelled rows are ignored).
        test_fraction: share of patients held out for testing (0 for none).
        val_fraction: share of patients for validation when ``n_folds`` is None.
        n_folds: number of cross-validation folds; None gives ``round((1 - test) / val)`` folds
            of which fold 0 is the validation set.
        seed: shuffling seed.

    Returns:
        One row per patient: ``patient_id`` (str), ``fold`` (int, ``TEST_FOLD`` for test).

    Raises:
        SplitError: fewer patients than splits, or neither ``n_folds`` nor a positive
            ``val_fraction`` to size the folds with.
    """
    if n_folds is None and val_fraction <= 0:
        raise SplitError(f"val_fraction={val_fraction} leaves no validation patients: give a fraction "
                         "above 0, or n_folds for cross-validation")
    labelled = table[table["label"] >= 0]
    labels, groups = labelled["label"].to_numpy(), labelled["patient_id"].astype(str).to_numpy()
    n_patients = len(np.unique(groups))
    folds = pd.Series(0, index=np.unique(groups), dtype=np.int64)
    if test_fraction > 0:
        test = _first_fold(labels, groups, max(2, round(1 / test_fraction)), seed)
        folds[np.unique(groups[test])] = TEST_FOLD
        labels, groups = labels[~test], groups[~test]
    k = n_folds or max(2, round((1 - test_fraction) / val_fraction))
    if len(np.unique(groups)) < k:
        raise SplitError(f"{n_patients} patients cannot fill {k} folds plus a test set")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[np.unique(groups[held])] = fold
    return pd.DataFrame({"patient_id": folds.index, "fold": folds.to_numpy()})


def load_or_make_folds(path: str | Path, table: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """Reuses the split file at ``path`` when it exists, else makes one (:func:`make_folds`) and saves it.

    Raises:
        SplitError: the file misses patients of ``table`` (made for other data) or lists a
            patient twice.
    """
    path = Path(path)
    if not path.is_file():
        folds = make_folds(table, **kwargs)
        with atomic_path(path) as tmp:  # unique per process: DDP ranks may make the same file at once
            folds.to_csv(tmp, index=False)
        return folds
    folds = read_table(path, ["patient_id", "fold"])
    folds["fold"] = folds["fold"].astype(int)
    twice = sorted(folds.loc[folds["patient_id"].duplicated(), "patient_id"])
    if twice:
        raise SplitError(f"{path}: patients {twice[:5]} are listed more than once")
    unknown = sorted(set(table["patient_id"].astype(str)) - set(folds["patient_id"]))
    if unknown:
        raise SplitError(f"{path}: no fold for patients {unknown[:5]} (a split file made for other data?)")
    return folds


def assign_splits(table: pd.DataFrame, folds: pd.DataFrame, val_fold: int | None = 0) -> pd.Series:
    """Returns each tile's split, ``train``, ``val`` or ``test``, from its patient's fold (no ``val``
    when ``val_fold`` is None)."""
    fold = table["patient_id"].astype(str).map(dict(zip(folds["patient_id"], folds["fold"])))
    split = np.where(fold == TEST_FOLD, "test", np.where(fold == val_fold, "val", "train"))
    return pd.Series(split, index=table.index, name="split")


def check_splits(table: pd.DataFrame, split: pd.Series, where: str | Path) -> None:
    """Checks no patient is in two splits and every non-empty split holds at least two classes.

    Raises:
        SplitError: naming ``where`` (the split file) and the offending patients or split.
    """
    per_patient = pd.DataFrame({"patient": table["patient_id"], "split": split}).groupby("patient")["split"]
    leaked = per_patient.nunique()
    leaked = sorted(leaked[leaked > 1].index)
    if leaked:
        raise SplitError(f"{where}: patients {leaked[:5]} are in more than one split")
    for name in SPLITS:
        classes = np.unique(table.loc[(split == name) & (table["label"] >= 0), "label"])
        if 0 < len(classes) < 2:
            raise SplitError(f"{where}: the {name} split holds only class {classes[0]}; "
                             "metrics need two classes (use more patients or another seed)")
