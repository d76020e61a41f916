"""``pathology infer`` end to end on the two-class slide set, where every right answer is known."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from pathology.inference.calibrate import Calibration
from pathology.inference.evaluate import main as evaluate_main
from pathology.inference.infer import infer_slides, main
from pathology.inference.predict import RunOptions
from pathology.models.runtime import choose_backend
from wsi_tiling import Resolution, TileReader, tile_slide

SINGLE = RunOptions(batch_size=16, num_workers=1, accelerator="cpu")
PREDICTED = ["blue_1", "blue_2", "mixed", "pink_1", "pink_2"]
TILES = 25  # the tissue box covers 5 x 5 tiles (see conftest)
MIXED_BLUE = 5 / 25  # one of the mixed slide's 5 tile columns is blue


@pytest.fixture(scope="module")
def run(two_class_set, tmp_path_factory) -> Path:
    """One CLI run over the folder, the coarse slide and a missing slide, with every extra output, at fp32
    (the exact function, so features can be compared with the eager model's)."""
    out = tmp_path_factory.mktemp("run")
    data = two_class_set
    code = main([str(data.slides), str(data.slide["coarse"]), str(data.root / "gone.svs"),
                 "--checkpoint", str(data.checkpoint), "--out", str(out), "--accelerator", "cpu",
                 "--batch-size", "16", "--num-workers", "1", "--aggregation", "mean,max", "--aggregation",
                 "topk:0.1,quantile:0.5,vote", "--heatmaps", "--geojson", "--gallery", "2", "--embeddings",
                 "--precision", "32-true"])
    assert code == 1  # two slides failed; the others finished
    return out


def test_statuses_and_errors_name_the_file(run) -> None:
    table = pd.read_csv(run / "slides.csv").set_index("slide_id")
    assert table.loc[PREDICTED, "status"].eq("ok").all()
    assert table.loc[PREDICTED, "n_tiles"].eq(TILES).all()  # the 5 x 5 tiles of the tissue box
    assert table.loc["blank", "status"] == "no-tissue"
    assert table.loc["coarse", "status"] == "error" and "coarse.svs" in table.loc["coarse", "error"]
    assert table.loc["gone", "status"] == "error" and "gone.svs" in table.loc["gone", "error"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["counts"] == {"ok": 5, "no-tissue": 1, "error": 2}
    assert summary["n_tiles"] == 5 * TILES
    assert (summary["backend"], summary["precision"]) == ("onnxruntime", "32-true")  # fp32's first runtime


def test_slide_scores_match_the_known_composition(run) -> None:
    table = pd.read_csv(run / "slides.csv").set_index("slide_id")
    for slide in ("pink_1", "pink_2"):
        assert table.loc[slide, "predicted_label"] == "pink"
        assert table.loc[slide, "max_blue"] == pytest.approx(0, abs=1e-6)
    for slide in ("blue_1", "blue_2"):
        assert table.loc[slide, "predicted_label"] == "blue"
        assert table.loc[slide, "mean_blue"] == pytest.approx(1, abs=1e-6)
    mixed = table.loc["mixed"]
    # 5 blue tiles of 25: vote and mean 0.2; the top 10 % (3 tiles) and the max are blue; the median pink
    assert mixed["vote_blue"] == pytest.approx(MIXED_BLUE)
    assert mixed["mean_blue"] == pytest.approx(MIXED_BLUE, abs=1e-6)
    assert mixed["topk0.1_blue"] == pytest.approx(1, abs=1e-6)
    assert mixed["max_blue"] == pytest.approx(1, abs=1e-6)
    assert mixed["quantile0.5_blue"] == pytest.approx(0, abs=1e-6)
    assert mixed["predicted_label"] == "pink"  # argmax of the first aggregation, the mean


def test_prediction_h5_lines_up_with_the_tile_store(run) -> None:
    with h5py.File(run / "predictions" / "mixed.h5", "r") as file:
        coords, probs = file["coords"][:], file["probs"][:]
        assert json.loads(file["probs"].attrs["class_names"]) == ["pink", "blue"]
        store = TileReader(file["probs"].attrs["tile_store"])
    np.testing.assert_array_equal(coords, store.coords)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    # blue tiles are exactly those in the last column, x = 384 µm = 768 level-0 px
    np.testing.assert_array_equal(probs[:, 1] > 0.5, coords[:, 0] == 768)


def test_pictures_and_qupath_objects(run) -> None:
    for slide in PREDICTED:
        features = json.loads((run / "geojson" / f"{slide}.geojson").read_text())["features"]
        assert len(features) == TILES
        for name in ("pink", "blue"):
            assert (run / "heatmaps" / f"{slide}_{name}.png").stat().st_size > 0
            assert (run / "gallery" / f"{slide}_{name}.png").stat().st_size > 0
    assert not (run / "heatmaps" / "blank_pink.png").exists()


def test_evaluate_the_run(run, two_class_set, capsys) -> None:
    assert evaluate_main(["--predictions", str(run), "--labels", str(two_class_set.labels),
                          "--bootstrap", "20"]) == 0
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())["methods"]
    assert metrics["mean"]["auroc"] == 1.0  # mixed (0.2) is labelled pink and ranks below both blue slides
    assert metrics["mean"]["confusion_matrix"] == [[3, 0], [0, 2]]


def test_calibrated_threshold_decides_the_label(two_class_set, tmp_path) -> None:
    calibration = Calibration("vote", "blue", threshold=0.1, temperature=1.0, method="youden")
    path = calibration.save(tmp_path / "vote.calibration.json")
    table = infer_slides(two_class_set.checkpoint, [two_class_set.slide["mixed"]], tmp_path / "out",
                         aggregations=["mean"], calibration=path, run=SINGLE).set_index("slide_id")
    # the vote share of blue, 0.2, passes the 0.1 threshold, although the mean's argmax is pink
    assert table.loc["mixed", "calibrated_blue"] == pytest.approx(MIXED_BLUE)
    assert table.loc["mixed", "predicted_label"] == "blue"


def test_reuses_a_store_with_matching_parameters(two_class_set, tmp_path) -> None:
    tiles = tmp_path / "tiles"
    made = tile_slide(two_class_set.slide["pink_1"], tiles, Resolution(2.0, "mpp"), 32, save_tiles=True,
                      min_tissue=0.9)
    before = made.h5_path.stat().st_mtime_ns
    table = infer_slides(two_class_set.checkpoint, [two_class_set.slide["pink_1"]], tmp_path / "out",
                         tiles_dir=tiles, run=SINGLE)
    assert made.h5_path.stat().st_mtime_ns == before
    assert table["n_tiles"].tolist() == [made.n_tiles] and table["predicted_label"].tolist() == ["pink"]


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def _other_architecture(source: Path, path: Path) -> None:
    payload = torch.load(source, weights_only=True)
    payload["pathology_spec"]["model_name"] = "efficientformer_l3"
    torch.save(payload, path)


BAD_CHECKPOINTS = {
    "wrong_arch.ckpt": _other_architecture,
    "evil.ckpt": lambda _, path: path.write_bytes(pickle.dumps({"state_dict": {}, "pathology_spec": _Exploit()},
                                                               protocol=2)),
    "notes.txt": lambda _, path: path.write_text("a text file, not a checkpoint\n"),
    "slides.csv": lambda _, path: path.write_text("slide_path,mpp\na.svs,0.5\n"),
}


@pytest.mark.parametrize("name", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_stops_before_any_slide_with_one_plain_line(name, two_class_set, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / name
    BAD_CHECKPOINTS[name](two_class_set.checkpoint, bad)
    out = tmp_path / "o"
    assert main([str(two_class_set.slide["pink_1"]), "--checkpoint", str(bad), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and lines[0].startswith("pathology infer: ")
    assert "\x1b" not in captured.err and "weights_only" not in captured.err
    assert not out.exists()  # no slide was tiled or predicted
    assert not (tmp_path / "pwned").exists()  # the pickled code never ran


def test_two_processes_give_the_same_predictions(run, two_class_set, tmp_path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "pathology.cli", "infer", str(two_class_set.slides),
               "--checkpoint", str(two_class_set.checkpoint), "--out", str(out), "--accelerator", "cpu",
               "--devices", "2", "--strategy", "ddp", "--batch-size", "8", "--num-workers", "0",
               "--tiles-dir", str(run / "tiles"), "--aggregation", "mean,vote"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=170,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "GLOBAL_RANK" not in result.stderr + result.stdout  # no Lightning banners
    for slide in PREDICTED:
        name = f"{slide}.h5"
        with h5py.File(run / "predictions" / name) as one, h5py.File(out / "predictions" / name) as two:
            np.testing.assert_array_equal(one["coords"][:], two["coords"][:])
            np.testing.assert_allclose(one["probs"][:], two["probs"][:], atol=1e-5)
    single = pd.read_csv(run / "slides.csv").set_index("slide_id").loc[PREDICTED, ["mean_blue", "vote_blue"]]
    double = pd.read_csv(out / "slides.csv").set_index("slide_id").loc[PREDICTED, ["mean_blue", "vote_blue"]]
    pd.testing.assert_frame_equal(single, double, atol=1e-5)


def test_real_slides_missing_resolution_then_given(shared_data, two_class_set, tmp_path) -> None:
    cmu = shared_data / "slides" / "CMU-1-Small-Region.svs"
    tcga = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"  # no µm/px in its metadata
    table = infer_slides(two_class_set.checkpoint, [cmu, tcga], tmp_path / "out", aggregations=["mean"],
                         run=SINGLE).set_index("slide_id")
    assert table.loc["CMU-1-Small-Region", "status"] == "ok"
    assert table.loc["tcga-cr-7395-01a-01-ts1", "status"] == "error"
    assert "tcga-cr-7395-01a-01-ts1.svs" in table.loc["tcga-cr-7395-01a-01-ts1", "error"]
    with h5py.File(tmp_path / "out" / "predictions" / "CMU-1-Small-Region.h5") as file:
        coords, probs = file["coords"][:], file["probs"][:]
        assert file["probs"].attrs["patch_size_level0"] == round(32 * 2.0 / 0.499)  # 64 µm at 0.499 µm/px
    assert len(coords) == table.loc["CMU-1-Small-Region", "n_tiles"] > 0
    assert (coords >= 0).all() and (coords[:, 0] < 2220).all() and (coords[:, 1] < 2967).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    # the fix the error names: give the µm/px, here in a CSV
    listing = tmp_path / "slides.csv"
    pd.DataFrame({"slide_path": [str(tcga)], "mpp": [0.25]}).to_csv(listing, index=False)
    again = infer_slides(two_class_set.checkpoint, [listing], tmp_path / "out2", aggregations=["mean"],
                         run=SINGLE)
    assert again["status"].tolist() == ["ok"] and again["n_tiles"].iloc[0] > 0


def test_lightning_checkpoint_of_the_training_module(two_class_set, tmp_path) -> None:
    import lightning as L

    from pathology.checkpoint import load_inference_model
    from pathology.training.module import TileClassifier

    tiny, _ = load_inference_model(two_class_set.checkpoint)
    module = TileClassifier(["pink", "blue"], tile_size=32, resolution="2.00mpp", model_name="efficientformer_tiny",
                            mhsa_blocks={32: 1}, img_size=32)
    module.model.load_state_dict(tiny.state_dict())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # as ModelCheckpoint writes it during training
    table = infer_slides(tmp_path / "last.ckpt", [two_class_set.slide["mixed"]], tmp_path / "out",
                         aggregations=["vote"], run=SINGLE)
    assert table["vote_blue"].iloc[0] == pytest.approx(MIXED_BLUE)


def test_feature_file_reads_the_way_clam_and_trident_read_it(run, two_class_set) -> None:
    from pathology.checkpoint import load_inference_model
    from pathology.data import eval_transform

    from .conftest import BLUE, PINK, TILE_PX

    path = run / "features" / "mixed.h5"
    with h5py.File(path, "r") as hdf5_file:  # CLAM's Generic_MIL_Dataset, h5 mode
        features = hdf5_file["features"][:]
        coords = hdf5_file["coords"][:]
        patch_size_level0 = hdf5_file["coords"].attrs["patch_size_level0"]  # TRIDENT's tile footprint
        patch_size = hdf5_file["coords"].attrs["patch_size"]
        target_mpp = hdf5_file["coords"].attrs["target_mpp"]
    features = torch.from_numpy(features)
    assert features.dtype == torch.float32 and features.shape == (TILES, 128)  # tiny's last stage width
    assert (patch_size, patch_size_level0, target_mpp) == (32, 128, 2.0)  # 32 px at 2 µm/px over 0.5 µm/px
    with h5py.File(run / "predictions" / "mixed.h5") as file:
        np.testing.assert_array_equal(coords, file["coords"][:])
    # every tile is pure pink or pure blue: its features are the embedding of a plain tile of that colour
    model, spec = load_inference_model(two_class_set.checkpoint)
    transform = eval_transform(spec.img_size, spec.mean, spec.std)
    plain = torch.stack([transform(image=np.full((TILE_PX, TILE_PX, 3), c, np.uint8))["image"] for c in (PINK, BLUE)])
    with torch.no_grad():
        pink, blue = model.forward_head(model.forward_features(plain), pre_logits=True)
    blue_tile = coords[:, 0] == 768  # the mixed slide's last tile column
    np.testing.assert_allclose(features[blue_tile], blue.expand(int(blue_tile.sum()), -1), atol=1e-4)
    np.testing.assert_allclose(features[~blue_tile], pink.expand(int((~blue_tile).sum()), -1), atol=1e-4)


def test_bad_slides_each_get_one_error_row_and_the_rest_finish(two_class_set, text_as_svs, tmp_path,
                                                               capsys) -> None:
    tiles, out = tmp_path / "tiles", tmp_path / "out"
    store = tile_slide(two_class_set.slide["pink_2"], tiles, Resolution(2.0, "mpp"), 32).h5_path
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])  # truncated, as by a crash while copying
    listing = tmp_path / "list.csv"
    listing.write_text(f"slide_path,slide_id\n{two_class_set.slide['pink_1']},\n,empty\n")
    code = main([str(listing), str(text_as_svs), str(two_class_set.slide["coarse"]), str(tmp_path / "gone.svs"),
                 str(two_class_set.slide["pink_2"]), "--checkpoint", str(two_class_set.checkpoint), "--out", str(out),
                 "--tiles-dir", str(tiles), "--accelerator", "cpu", "--batch-size", "32", "--num-workers", "0"])
    assert code == 1
    table = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide_id")
    assert table.loc[["pink_1", "pink_2"], "status"].eq("ok").all()
    assert table.loc["pink_2", "n_tiles"] == TILES and len(TileReader(store)) == TILES  # re-tiled, not trusted
    names = {"list": "list.csv", "notes": "notes.svs", "coarse": "coarse.svs", "gone": "gone.svs"}
    errors = table[table["status"] == "error"]
    assert sorted(errors.index) == sorted(names)
    for slide_id, file_name in names.items():
        assert file_name in errors.loc[slide_id, "error"] and "\n" not in errors.loc[slide_id, "error"]
    assert "line 3: empty slide_path" in errors.loc["list", "error"]
    printed = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line and "slides:" not in line]
    assert sorted(printed) == sorted(f"{i}: error: {errors.loc[i, 'error']}" for i in names)  # besides the bar


def test_shards_split_the_slides_and_an_unsharded_rerun_assembles_them(two_class_set, tmp_path) -> None:
    out = tmp_path / "out"
    slides = [str(two_class_set.slide[s]) for s in ("blue_1", "mixed", "pink_1")]
    common = ["--checkpoint", str(two_class_set.checkpoint), "--out", str(out), "--accelerator", "cpu",
              "--aggregation", "mean", "--num-workers", "0"]
    for index in (0, 1):
        assert main([*slides, *common, "--shard", f"{index}/2"]) == 0
    # every 2nd slide in slide-id order: shard 0 has the 1st and 3rd, shard 1 the 2nd
    shard0 = pd.read_csv(out / "slides_shard0of2.csv")
    shard1 = pd.read_csv(out / "slides_shard1of2.csv")
    assert shard0["slide_id"].tolist() == ["blue_1", "pink_1"] and shard1["slide_id"].tolist() == ["mixed"]
    assert not (out / "slides.csv").exists()
    written = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").glob("*.h5")}
    assert main([*slides, *common]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "predictions").glob("*.h5")} == written  # all skipped
    table = pd.read_csv(out / "slides.csv")
    assert table["slide_id"].tolist() == ["blue_1", "mixed", "pink_1"] and table["status"].eq("ok").all()
    assert table["mean_blue"].tolist() == pytest.approx([1, MIXED_BLUE, 0], abs=1e-6)


def test_tta_is_part_of_the_run_key(two_class_set, tmp_path) -> None:
    """A rerun with another TTA setting redoes the slide; the same setting again skips it."""
    out = tmp_path / "out"
    common = [str(two_class_set.slide["mixed"]), "--checkpoint", str(two_class_set.checkpoint), "--out", str(out),
              "--accelerator", "cpu", "--aggregation", "mean", "--num-workers", "0", "--backend", "torch"]
    prediction = out / "predictions" / "mixed.h5"
    assert main(common) == 0
    plain = prediction.stat().st_mtime_ns
    assert json.loads((out / "summary.json").read_text())["tta"] is False  # the checkpoint's spec: no TTA
    assert main([*common, "--tta"]) == 0
    with_tta = prediction.stat().st_mtime_ns
    assert with_tta != plain and json.loads((out / "summary.json").read_text())["tta"] is True
    assert main([*common, "--tta"]) == 0
    assert prediction.stat().st_mtime_ns == with_tta
    assert pd.read_csv(out / "slides.csv")["mean_blue"].tolist() == pytest.approx([MIXED_BLUE], abs=1e-6)


def test_the_precision_that_ran_is_part_of_the_run_key(two_class_set, tmp_path) -> None:
    """``auto`` is recorded as what it resolved to here; a rerun at another precision redoes the slide,
    the same one again (``auto`` or its resolution spelled out) skips it."""
    out = tmp_path / "out"
    common = [str(two_class_set.slide["mixed"]), "--checkpoint", str(two_class_set.checkpoint), "--out", str(out),
              "--accelerator", "cpu", "--aggregation", "mean", "--num-workers", "0", "--backend", "openvino"]
    prediction = out / "predictions" / "mixed.h5"
    assert main(common) == 0
    resolved = json.loads((out / "summary.json").read_text())["precision"]
    assert (resolved, "openvino") == choose_backend("openvino", torch.device("cpu"))[::-1]
    first = prediction.stat().st_mtime_ns
    assert main([*common, "--precision", resolved]) == 0
    assert prediction.stat().st_mtime_ns == first
    other = "32-true" if resolved == "bf16-mixed" else "bf16-mixed"
    assert main([*common, "--precision", other]) == 0
    assert prediction.stat().st_mtime_ns != first
    assert json.loads((out / "summary.json").read_text())["precision"] == other
