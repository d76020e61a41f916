"""``pathology study`` end to end on the tiny study: outputs, cache reuse, resume, an added cell, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch

from pathology.checkpoint import load_checkpoint
from pathology.models import create_model
from pathology.models.runtime import choose_backend, runner_label
from pathology.study.grid import load_study
from pathology.study.run import RESULT_JSON, StudyError, main, read_slides, run_study

N_TEST_SLIDES = 4  # one per (chromatin, architecture) pair


def test_every_cell_is_trained_evaluated_and_timed(tiny_study) -> None:
    configs, slides_csv, out, results = tiny_study
    assert results["status"].tolist() == ["ok", "ok"]
    assert results["seed"].tolist() == [0, 1]
    assert not results["cached"].any()
    # the demo's training config names efficientformer_tiny; the cells are 32 px, two classes
    trained = create_model("efficientformer_tiny", mhsa_blocks={32: 1}, num_classes=2, img_size=32)
    for row in results.itertuples():
        assert 0.0 <= row.tile_balanced_accuracy <= 1.0 and 0.0 <= row.slide_accuracy <= 1.0
        assert row.params == sum(p.numel() for p in trained.parameters())
        assert row.macs > 0 and row.throughput > 0
        stored = json.loads((out / "cells" / row.cell / RESULT_JSON).read_text())
        assert stored["fingerprint"] == row.fingerprint
        assert Path(row.checkpoint).is_file()
        slides = pd.read_csv(out / "cells" / row.cell / "infer" / "slides.csv")
        assert len(slides) == N_TEST_SLIDES
    written = pd.read_csv(out / "results.csv")
    assert written["cell"].tolist() == results["cell"].tolist()
    # the demo slides are 0.5 µm/px 20x scans: 2.5x delivered 4 µm/px, a 32-px tile 128 µm
    assert results["tile_mpp"].tolist() == pytest.approx([4.0, 4.0])
    assert written["field_um"].tolist() == pytest.approx([128.0, 128.0])
    assert (out / "report.md").read_text().count("| chromatin | 2.5x | 4 | 32:1 | gelu | 32 | 128 | 2 |") == 1
    # timed through the backend inference takes by default on this machine's CPU
    assert written["backend"].tolist() == [runner_label(*choose_backend("auto", torch.device("cpu")))] * 2
    assert written["act_layer"].tolist() == ["gelu", "gelu"]


def test_test_tiles_count_equals_the_tile_stores(tiny_study) -> None:
    """Tile metrics cover every tile of the test slides, cut once and shared by both seeds."""
    configs, slides_csv, out, results = tiny_study
    slides = read_slides(slides_csv, ["chromatin"])
    stores = sorted((out / "tiles").glob("*/patches/*.h5"))
    assert len(stores) == len(slides)  # one setting (2.5x, 32 px): one store per slide for both cells
    test_ids = set(slides.loc[slides["split"] == "test", "slide_id"])
    n_test = 0
    for store in stores:
        if store.stem in test_ids:
            with h5py.File(store, "r") as file:
                n_test += len(file["coords"])
    assert results["n_test_tiles"].tolist() == [n_test, n_test]


def test_rerun_reads_every_cell_from_cache(study_copy) -> None:
    configs, slides_csv, out, results = study_copy
    before = {c: (out / "cells" / c / RESULT_JSON).stat().st_mtime_ns for c in results["cell"]}
    again = run_study(load_study(configs, slides_csv), out)
    assert again["cached"].all()
    assert again["tile_balanced_accuracy"].tolist() == pytest.approx(results["tile_balanced_accuracy"].tolist())
    assert {c: (out / "cells" / c / RESULT_JSON).stat().st_mtime_ns for c in results["cell"]} == before


def test_interrupted_study_resumes_and_a_new_cell_runs_alone(study_copy, tmp_path) -> None:
    """Seed 1 lost its result (as if killed mid-cell) and seed 2 is new: only those two run."""
    configs, slides_csv, out, results = study_copy
    seed0, seed1 = results["cell"]
    (out / "cells" / seed1 / RESULT_JSON).unlink()
    kept = (out / "cells" / seed0 / RESULT_JSON).stat().st_mtime_ns
    override = tmp_path / "three_seeds.yaml"
    override.write_text("grid: {seed: [0, 1, 2]}\n")
    resumed = run_study(load_study([*configs, override], slides_csv), out)
    assert resumed["seed"].tolist() == [0, 1, 2]
    assert resumed["cached"].tolist() == [True, False, False]
    assert resumed["status"].tolist() == ["ok", "ok", "ok"]
    assert (out / "cells" / seed0 / RESULT_JSON).stat().st_mtime_ns == kept
    assert "| 3 |" in (out / "report.md").read_text()


def test_an_act_layer_axis_trains_its_activation_and_reads_old_cells_as_gelu(study_copy, tmp_path) -> None:
    """Seed 0's result is stripped of act_layer, as written before the axis existed: it is read back as
    the gelu cell; the hard_swish cell alone is trained, and its checkpoint records the activation."""
    configs, slides_csv, out, results = study_copy
    seed0 = results["cell"].iloc[0]
    stored = json.loads((out / "cells" / seed0 / RESULT_JSON).read_text())
    del stored["act_layer"]
    (out / "cells" / seed0 / RESULT_JSON).write_text(json.dumps(stored))
    override = tmp_path / "acts.yaml"
    override.write_text("grid: {seed: [0], act_layer: [gelu, hard_swish]}\n")
    again = run_study(load_study([*configs, override], slides_csv), out)
    assert again["act_layer"].tolist() == ["gelu", "hard_swish"]
    assert again["cached"].tolist() == [True, False] and again["status"].tolist() == ["ok", "ok"]
    assert again["cell"].tolist() == [seed0, seed0.replace("_32px", "_act-hard_swish_32px")]
    _, spec = load_checkpoint(again["checkpoint"].iloc[1])
    assert spec.act_layer == "hard_swish"
    written = pd.read_csv(out / "results.csv")
    assert written["act_layer"].tolist() == ["gelu", "hard_swish"]
    report = (out / "report.md").read_text()
    assert "| 32:1 | gelu | 32 |" in report and "| 32:1 | hard_swish | 32 |" in report


def test_cli_reports_a_slides_csv_without_split(tiny_study, tmp_path, capsys) -> None:
    configs, slides_csv, out, results = tiny_study
    bad = tmp_path / "no_split.csv"
    pd.read_csv(slides_csv).drop(columns=["split"]).to_csv(bad, index=False)
    with pytest.raises(StudyError, match=r"no_split\.csv: missing column\(s\) \['split'\]"):
        read_slides(bad, ["chromatin"])
    code = main([*(a for c in configs for a in ("--config", str(c))), "--slides", str(bad),
                 "--out", str(tmp_path / "out")])
    assert code == 2  # checked before any cell runs
    assert "no_split.csv: missing column(s) ['split']" in capsys.readouterr().err
    assert not (tmp_path / "out" / "cells").exists()


def test_a_typo_in_a_training_config_stops_the_study_before_any_cell(tmp_path, capsys) -> None:
    """The study's training files are parsed with the first cell's settings before anything runs."""
    (tmp_path / "slides.csv").write_text("slide_id,slide_path,split,chromatin\n")
    train = Path(__file__).resolve().parents[3] / "configs" / "study_train_demo.yaml"
    (tmp_path / "typo.yaml").write_text("model: {lrr: 0.1}\n")
    (tmp_path / "study.yaml").write_text(
        "slides_csv: slides.csv\ntasks: {chromatin: [smooth, coarse]}\n"
        "grid: {resolution: [5x], mhsa_blocks: ['32:1'], tile_size: [64], seed: [0]}\n"
        f"train: {{configs: ['{train}', typo.yaml]}}\n")
    assert main(["--config", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "typo.yaml: unknown key 'model.lrr'; did you mean 'model.lr'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
