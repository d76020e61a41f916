"""Study configs: base YAML plus overrides, expanded into the configured grid."""
from __future__ import annotations

from pathlib import Path

import pytest

from pathology.models.mhsa import MhsaBlocks
from pathology.study.grid import Cell, StudyConfigError, expand_grid, load_study
from pathology.study.run import main
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
    assert first == Cell("chromatin", Resolution(20, "power"), MhsaBlocks({32: 1}), 32, 0)
    assert {c.act_layer for c in study.cells} == {"gelu"}  # the axis left out: the paper's activation
    assert study.cells[-1] == Cell("architecture", Resolution(2.5, "power"), MhsaBlocks({16: 1, 32: 1}), 64, 1)
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


def test_act_layer_axis_multiplies_the_grid_and_names_the_cells(config_dir: Path) -> None:
    """2 activations double the 48 cells; gelu cells keep the names and cache keys they had without the axis."""
    without = load_study([config_dir / "study.yaml"])
    (config_dir / "acts.yaml").write_text("grid: {act_layer: [gelu, hard_swish]}\n")
    study = load_study([config_dir / "study.yaml", config_dir / "acts.yaml"])
    assert len(study.cells) == 96 and len({cell.name for cell in study.cells}) == 96
    assert [c.act_layer for c in study.cells[:4]] == ["gelu"] * 4  # tile sizes and seeds vary fastest
    assert study.cells[4] == Cell("chromatin", Resolution(20, "power"), MhsaBlocks({32: 1}), 32, 0, "hard_swish")
    assert study.cells[4].name == "chromatin_20x_mhsa32-1_act-hard_swish_32px_seed0"
    gelu = [c for c in study.cells if c.act_layer == "gelu"]
    assert [c.name for c in gelu] == [c.name for c in without.cells]
    assert [study.fingerprint(c) for c in gelu] == [without.fingerprint(c) for c in without.cells]
    assert study.cells[4].to_dict()["act_layer"] == "hard_swish"


@pytest.mark.parametrize(("acts", "message"), [
    ("[gelu, hardswish]", "unknown grid.act_layer hardswish (did you mean hard_swish?)"),
    ("softmax", "unknown grid.act_layer softmax (valid names: gelu, gelu_tanh, quick_gelu, relu, relu6, leaky_relu, "
                "hard_swish, silu, mish, elu, selu, celu)"),
])
def test_an_unknown_act_layer_names_the_file_and_the_closest_name(config_dir: Path, acts: str, message: str) -> None:
    (config_dir / "acts.yaml").write_text(f"grid: {{act_layer: {acts}}}\n")
    with pytest.raises(StudyConfigError) as raised:
        load_study([config_dir / "study.yaml", config_dir / "acts.yaml"])
    assert str(raised.value) == f"{config_dir / 'acts.yaml'}: {message}"


def test_mhsa_given_as_a_mapping_and_single_values() -> None:
    grid = {"resolution": "10x", "mhsa_blocks": [{16: 2, 32: 1}, {}], "tile_size": 224, "seed": 3}
    cells = expand_grid(grid, ["t"])
    assert [c.mhsa_blocks for c in cells] == [{16: 2, 32: 1}, {}]
    assert [str(c.mhsa_blocks) for c in cells] == ["16:2,32:1", "none"]
    assert all(isinstance(c.mhsa_blocks, MhsaBlocks) for c in cells)
    assert cells[0].name == "t_10x_mhsa16-2_32-1_224px_seed3"


@pytest.mark.parametrize(("typo", "message"), [
    ("colour: blue\n", "unknown key colour (valid keys: slides_csv, tasks, grid, train, tiling, inference, speed)"),
    ("tilling: {min_tissue: 0.8}\n", "unknown key tilling (did you mean tiling?)"),
    ("grid: {seeds: [0, 1]}\n", "unknown key grid.seeds (did you mean grid.seed?)"),
    ("inference: {aggregation: [max]}\n", "unknown key inference.aggregation (did you mean inference.aggregations?)"),
    ("train: {config: [train.yaml]}\n", "unknown key train.config (did you mean train.configs?)"),
    ("tiling: {min_tisue: 0.8}\n", "unknown key tiling.min_tisue (did you mean tiling.min_tissue?)"),
])
def test_a_typo_anywhere_names_the_file_the_key_and_the_closest_key(config_dir: Path, typo: str, message: str) -> None:
    """Before this check each of these was ignored and the study ran with the defaults."""
    (config_dir / "typo.yaml").write_text(typo)
    with pytest.raises(StudyConfigError) as raised:
        load_study([config_dir / "study.yaml", config_dir / "typo.yaml"])
    assert str(raised.value) == f"{config_dir / 'typo.yaml'}: {message}"


def test_study_cli_refuses_a_typo_before_any_work(config_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (config_dir / "typo.yaml").write_text("train: {config: [train.yaml]}\n")
    code = main(["--config", str(config_dir / "study.yaml"), "--config", str(config_dir / "typo.yaml"),
                 "--out", str(config_dir / "out")])
    assert code == 2
    assert "typo.yaml: unknown key train.config (did you mean train.configs?)" in capsys.readouterr().err
    assert not (config_dir / "out").exists()


def test_defaults_of_optional_sections(config_dir: Path) -> None:
    study = load_study([config_dir / "study.yaml"])
    assert (study.min_tissue, study.aggregations, study.infer_batch_size, study.speed_batch_size) == \
        (0.5, ["mean", "max"], 64, 16)


def test_a_grid_axis_missing_after_merging_is_an_error(config_dir: Path) -> None:
    (config_dir / "partial.yaml").write_text(BASE.replace("  seed: [0, 1]\n", ""))
    with pytest.raises(StudyConfigError, match=r"partial\.yaml: grid lacks \['seed'\]"):
        load_study([config_dir / "partial.yaml"])


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
