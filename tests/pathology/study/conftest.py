"""A tiny real study, run once per session: 12 demo slides of 256 µm, two seeds of two training steps.

``tiny_study`` is shared and must stay as its run left it: a test that writes into a study folder
(reruns, resumes, the notebook's figures) takes ``study_copy``, its own copy, so tests pass in any order.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from pathology.study.demo_data import make_demo_slides
from pathology.study.grid import load_study
from pathology.study.run import run_study

REPO = Path(__file__).resolve().parents[3]
TINY_TRAIN = """
trainer: {max_epochs: 1, limit_train_batches: 2}
data: {batch_size: 4}
"""
TINY_STUDY = """
slides_csv: data/slides.csv
tasks: {chromatin: [smooth, coarse]}
grid: {resolution: [2.5x], mhsa_blocks: ["32:1"], tile_size: [32], seed: [0, 1]}
train: {configs: ["{repo}/configs/study_train_demo.yaml", tiny_train.yaml]}
inference: {aggregations: [mean], batch_size: 16}
speed: {batch_size: 2}
"""


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """One intra-op thread: on a CPU shared with other jobs, OpenMP threads spin-waiting on each
    other made a training step 5-60x slower than one thread (measured on the 2-core CI machine)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, Path, pd.DataFrame]:
    """(config files, slides CSV, study folder, results of the first run)."""
    root = tmp_path_factory.mktemp("study")
    slides_csv = make_demo_slides(root / "data", per_group=(1, 1, 1), size_um=(256.0, 256.0), nest_um=30.0)
    (root / "tiny_train.yaml").write_text(TINY_TRAIN)
    (root / "tiny.yaml").write_text(TINY_STUDY.replace("{repo}", str(REPO)))
    configs = [root / "tiny.yaml"]
    results = run_study(load_study(configs, slides_csv), root / "out")
    return configs, slides_csv, root / "out", results


@pytest.fixture
def study_copy(tiny_study: tuple[list[Path], Path, Path, pd.DataFrame],
               tmp_path: Path) -> tuple[list[Path], Path, Path, pd.DataFrame]:
    """``tiny_study`` with its study folder copied to ``tmp_path``: this test's to change."""
    configs, slides_csv, out, results = tiny_study
    copy = shutil.copytree(out, tmp_path / "study_out")
    return configs, slides_csv, copy, results
