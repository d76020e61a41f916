"""Study configs: base YAML plus overrides, expanded into the configured grid."""
from __future__ import annotations

from pathlib import Path

import pytest

from pathology.study.grid import Cell, StudyConfigError, expand_grid, load_study, mhsa_label
from wsi_tiling import Resolution

BASE = """
slides_csv: slides.csv
tasks: {chromatin: [smooth, coarse], architecture: [nests, cords]}
grid:
  resolution: [20x, 0.5mpp, 2.5x]
  mhsa_blocks: ["32:1", "16:1,32:1"]
  tile_size: [32, 64]
  seed: [0, 1]
train: {configs: [train.yaml], args: ["--trainer.max_epochs=1"]}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "slides.csv").write_text("slide_id,slide_path,split,chromatin,architecture\n")
    (tmp_path / "train.yaml").write_text("trainer: {max_epochs: 2}\n")
    (tmp_path / "study.yaml").write_text(BASE)
    return tmp_path


def test_grid_is_the_product_of_its_axes(config_dir: Path) -> None:
    """2 tasks x 3 resolutions x 2 placements x 2 tile sizes x 2 seeds = 48 cells, all distinct."""
    study = load_study([config_dir / "study.yaml"])
    assert len(study.cells) == 48
    assert len({cell.name for cell in study.cells}) == 48
    first = study.cells[0]
    assert first == Cell("chromatin", Resolution(20, "power"), {32: 1}, 32, 0)
    assert study.cells[-1] == Cell("architecture", Resolution(2.5, "power"), {16: 1, 32: 1}, 64, 1)
    assert {c.resolution for c in study.cells} == {Resolution(20, "power"), Resolution(0.5, "mpp"),
                                                   Resolution(2.5, "power")}
    assert study.train_configs == [config_dir / "train.yaml"]
    assert study.train_args == ["--trainer.max_epochs=1"]


def test_override_file_replaces_only_its_keys(config_dir: Path, tmp_path: Path) -> None:
    """An override of grid.seed keeps the other grid axes: 2 x 3 x 2 x 2 x 3 seeds = 72 cells."""
    override = tmp_path / "sub" / "more_seeds.yaml"
    override.parent.mkdir()
    override.write_text("grid: {seed: [0, 1, 2]}\ntasks: {chromatin: [smooth, coarse]}\n")
    study = load_study([config_dir / "study.yaml", override])
    assert len(study.cells) == 72  # tasks merge key by key: both tasks remain
    assert sorted({c.seed for c in study.cells}) == [0, 1, 2]


def test_mhsa_given_as_a_mapping_and_single_values() -> None:
    grid = {"resolution": "10x", "mhsa_blocks": [{16: 2, 32: 1}, {}], "tile_size": 224, "seed": 3}
    cells = expand_grid(grid, ["t"])
    assert [c.mhsa_blocks for c in cells] == [{16: 2, 32: 1}, {}]
    assert [mhsa_label(c.mhsa_blocks) for c in cells] == ["16:2,32:1", "none"]
    assert cells[0].name == "t_10x_mhsa16-2_32-1_224px_seed3"


def test_unknown_grid_key_names_the_file(config_dir: Path) -> None:
    (config_dir / "typo.yaml").write_text("grid: {seeds: [0]}\n")
    with pytest.raises(StudyConfigError, match=r"typo\.yaml.*unknown \['seeds'\]"):
        load_study([config_dir / "study.yaml", config_dir / "typo.yaml"])


def test_bad_resolution_and_missing_file_name_the_file(config_dir: Path) -> None:
    (config_dir / "bad.yaml").write_text("grid: {resolution: [20 x]}\n")
    with pytest.raises(StudyConfigError, match=r"bad\.yaml.*bad grid value"):
        load_study([config_dir / "study.yaml", config_dir / "bad.yaml"])
    with pytest.raises(StudyConfigError, match=r"nowhere\.csv not found"):
        load_study([config_dir / "study.yaml"], slides_csv=config_dir / "nowhere.csv")


def test_fingerprint_changes_with_training_config(config_dir: Path) -> None:
    """The cache key covers the training files: editing one invalidates every cell."""
    study = load_study([config_dir / "study.yaml"])
    before = study.fingerprint(study.cells[0])
    assert before == study.fingerprint(study.cells[0])
    assert before != study.fingerprint(study.cells[1])
    (config_dir / "train.yaml").write_text("trainer: {max_epochs: 3}\n")
    assert study.fingerprint(study.cells[0]) != before
