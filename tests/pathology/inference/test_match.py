"""Matching a new slide to what the model saw: physical (the checkpoint's µm/px) or nominal (its "20x")."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from tests.conftest import write_tiff

from pathology.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from pathology.inference.infer import infer_slides
from pathology.inference.infer import main as infer_main
from pathology.inference.match import (
    UpsamplingRequiredError,
    match_for_checkpoint,
    resolution_for_slide,
    store_matches,
)
from pathology.inference.predict import RunOptions
from pathology.models import create_model
from wsi_tiling import InMemorySlide, Resolution, plan_read, read_store_info, tile_slide
from wsi_tiling.synthetic import write_slide

from .conftest import PINK, SLIDE_MPP, tissue_image

# A model trained at "20x" on a 0.25 µm/px, 40x scanner: its tiles were 0.50 µm/px.
SPEC = ModelSpec("efficientformer_tiny", {32: 1}, ("neg", "pos"), 32, 32, Resolution(20, "power"),
                 tile_mpp=0.50, tile_mpp_spread=0.0)


def _slide(mpp: float, power: float, name: str) -> InMemorySlide:
    level0 = np.full((64, 64, 3), 240, np.uint8)
    return InMemorySlide([level0, level0[::4, ::4]], mpp=mpp, objective_power=power, path=name)


def test_physical_match_asks_the_training_mpp_of_another_scanner() -> None:
    hamamatsu = _slide(0.2282, 40, "hamamatsu.ndpi")
    resolution = resolution_for_slide(SPEC, hamamatsu)
    assert resolution == Resolution(0.50, "mpp")
    assert plan_read(resolution, hamamatsu).target_mpp == pytest.approx(0.50, rel=0.01)


def test_nominal_match_asks_the_requested_power_relative_to_the_slide() -> None:
    hamamatsu = _slide(0.2282, 40, "hamamatsu.ndpi")
    resolution = resolution_for_slide(SPEC, hamamatsu, "nominal")
    assert resolution == Resolution(20, "power")
    assert plan_read(resolution, hamamatsu).target_mpp == pytest.approx(2 * 0.2282, rel=0.01)  # 0.456


def test_a_slide_coarser_than_the_model_is_refused_naming_it_and_the_option() -> None:
    coarse = _slide(0.52, 20, "coarse.svs")  # a 20x scan: 0.52 µm/px cannot become 0.50 without interpolating
    with pytest.raises(UpsamplingRequiredError, match=r"coarse\.svs: .*0\.5 µm/px.*0\.52 µm/px.*--allow-upsample"):
        resolution_for_slide(SPEC, coarse)
    assert resolution_for_slide(SPEC, coarse, allow_upsample=True) == Resolution(0.50, "mpp")
    # 0.504 µm/px is within 1 % of 0.50: reading it at scale 0.992 is not upsampling
    assert resolution_for_slide(SPEC, _slide(0.504, 20, "within.svs")) == Resolution(0.50, "mpp")


def test_old_checkpoint_falls_back_to_nominal_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        resolution = resolution_for_slide(replace(SPEC, tile_mpp=None), _slide(0.2282, 40, "old.ndpi"))
    assert resolution == Resolution(20, "power") and "old.ndpi" in caplog.text


def test_a_checkpoint_asked_in_mpp_is_physical_without_tile_mpp(caplog: pytest.LogCaptureFixture) -> None:
    spec = replace(SPEC, resolution=Resolution(0.5, "mpp"), tile_mpp=None)
    with caplog.at_level(logging.WARNING):
        assert match_for_checkpoint(spec, "physical", Path("old.ckpt")) == "physical"
        assert resolution_for_slide(spec, _slide(0.2282, 40, "hamamatsu.ndpi")) == Resolution(0.5, "mpp")
    assert caplog.text == ""
    assert match_for_checkpoint(replace(SPEC, tile_mpp=None), "physical", Path("old.ckpt")) == "nominal"
    assert match_for_checkpoint(SPEC, "nominal", Path("new.ckpt")) == "nominal"


def test_unknown_match_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="physical"):
        resolution_for_slide(SPEC, _slide(0.25, 40, "a.svs"), "magnification")


def test_stores_are_reused_within_one_percent_of_the_wanted_mpp(stripes_slide: Path, tmp_path: Path) -> None:
    info = read_store_info(tile_slide(stripes_slide, tmp_path, Resolution(0.5, "mpp"), 32).h5_path)
    assert store_matches(info, 0.5, 32, stripes_slide)
    assert store_matches(info, 0.504, 32, stripes_slide)  # 0.8 % apart
    assert not store_matches(info, 0.456, 32, stripes_slide)  # the nominal 20x of a 0.2282 µm/px scan
    assert not store_matches(info, 0.5, 64, stripes_slide)
    assert not store_matches(info, 0.5, 32, tmp_path / "other.svs")
    assert not store_matches(info, 0.5, 32, stripes_slide, slide_mpp=0.25)  # made from the metadata, not a user value


# ``pathology infer`` end to end: the two-class model, saved as trained at "20x" on 0.25 µm/px 40x
# scans (its tiles 0.50 µm/px), predicts pink slides of other scanners.
HAMAMATSU_MPP = 0.2282  # 40x, 9 % finer than 0.25
CLOSE_MPP = 0.248  # 40x: "20x" delivers 0.496 µm/px, 0.8 % from 0.50
COARSE_MPP = 0.52  # a 20x scan, coarser than 0.50


@pytest.fixture(scope="module")
def scanners(two_class_set, tmp_path_factory) -> dict[str, Path]:
    """The "20x" checkpoint (and one written before tile_mpp), and pink slides of three scanners."""
    root = tmp_path_factory.mktemp("scanners")
    state, spec = load_checkpoint(two_class_set.checkpoint)
    model = create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=2, img_size=spec.img_size)
    model.load_state_dict(state)
    twenty_x = replace(spec, resolution=Resolution(20, "power"), tile_mpp=0.50, tile_mpp_spread=0.0)
    image = tissue_image(PINK)[::2, ::2]  # 512 px, the tissue box 320 px
    return {"checkpoint": save_checkpoint(root / "20x.ckpt", model, twenty_x),
            "old_checkpoint": save_checkpoint(root / "old.ckpt", model, replace(twenty_x, tile_mpp=None)),
            **{name: write_slide(root / f"{name}.svs", image, mpp=mpp, objective_power=power, downsamples=(1, 4),
                                 compression="zlib")
               for name, mpp, power in (("hamamatsu", HAMAMATSU_MPP, 40), ("close", CLOSE_MPP, 40),
                                        ("coarse", COARSE_MPP, 20))}}


def _infer(scanners, out: Path, *slides: str, options: tuple[str, ...] = (), checkpoint: str = "checkpoint") -> int:
    return infer_main([*(str(scanners[s]) for s in slides), "--checkpoint", str(scanners[checkpoint]),
                       "--out", str(out), "--accelerator", "cpu", "--num-workers", "0", "--aggregation", "mean",
                       *options])


def _read(out: Path, slide: str) -> tuple[pd.Series, dict]:
    """The slide's row of slides.csv and the attributes of its prediction file."""
    row = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide_id").loc[slide]
    with h5py.File(out / "predictions" / f"{slide}.h5") as file:
        return row, dict(file["probs"].attrs)


def test_infer_reads_another_scanner_at_the_training_mpp_and_nominal_at_its_20x(scanners, tmp_path) -> None:
    out = tmp_path / "out"
    assert _infer(scanners, out, "hamamatsu") == 0
    row, attrs = _read(out, "hamamatsu")
    assert row["read_mpp"] == pytest.approx(0.50, rel=0.01) and attrs["target_mpp"] == pytest.approx(0.50, rel=0.01)
    assert row["slide_mpp"] == pytest.approx(HAMAMATSU_MPP) and row["predicted_label"] == "pink"
    assert attrs["patch_size_level0"] == round(32 * 0.50 / HAMAMATSU_MPP)  # 70: 16 µm at 0.2282 µm/px
    assert attrs["match"] == "physical" and json.loads((out / "summary.json").read_text())["match"] == "physical"
    written = (out / "predictions" / "hamamatsu.h5").stat().st_mtime_ns
    assert _infer(scanners, out, "hamamatsu") == 0
    assert (out / "predictions" / "hamamatsu.h5").stat().st_mtime_ns == written  # skipped
    assert _infer(scanners, out, "hamamatsu", options=("--match", "nominal")) == 0  # redone
    row, attrs = _read(out, "hamamatsu")
    assert row["read_mpp"] == pytest.approx(2 * HAMAMATSU_MPP, rel=0.01)  # 0.456: 20x of a 40x scan
    assert attrs["target_mpp"] == pytest.approx(0.4564, rel=0.01) and attrs["patch_size_level0"] == 2 * 32
    assert attrs["match"] == "nominal" and json.loads((out / "summary.json").read_text())["match"] == "nominal"


def test_a_slide_needing_upsampling_is_an_error_row_unless_allowed(scanners, tmp_path, capsys) -> None:
    assert _infer(scanners, tmp_path / "refused", "coarse", "hamamatsu") == 1
    table = pd.read_csv(tmp_path / "refused" / "slides.csv", keep_default_na=False).set_index("slide_id")
    assert table.loc["hamamatsu", "status"] == "ok"
    assert table.loc["coarse", "status"] == "error"
    assert re.search(r"coarse\.svs: .*0\.52 µm/px.*--allow-upsample", table.loc["coarse", "error"])
    assert "coarse.svs" in capsys.readouterr().err
    assert _infer(scanners, tmp_path / "allowed", "coarse", options=("--allow-upsample",)) == 0
    row, attrs = _read(tmp_path / "allowed", "coarse")
    assert row["read_mpp"] == pytest.approx(0.50, rel=0.01) and attrs["patch_size_level0"] == round(32 * 0.50 / 0.52)


def test_stores_are_reused_only_when_they_delivered_the_mpp_within_one_percent(scanners, tmp_path) -> None:
    tiles = tmp_path / "tiles"  # stores tiled at "20x", as for training
    made = {name: tile_slide(scanners[name], tiles, Resolution(20, "power"), 32).h5_path
            for name in ("close", "hamamatsu")}
    before = {name: path.stat().st_mtime_ns for name, path in made.items()}
    assert _infer(scanners, tmp_path / "out", "close", "hamamatsu", options=("--tiles-dir", str(tiles))) == 0
    assert {name: path.stat().st_mtime_ns for name, path in made.items()} == before
    close, _ = _read(tmp_path / "out", "close")
    assert close["read_mpp"] == pytest.approx(2 * CLOSE_MPP)  # 0.496: its "20x" store was reused
    hamamatsu, attrs = _read(tmp_path / "out", "hamamatsu")
    assert hamamatsu["read_mpp"] == pytest.approx(0.50, rel=0.01)  # 0.456 is 9 % off: tiled again at 0.50
    assert Path(attrs["tile_store"]).parent.parent.name == "0.50mpp_32px_0px_overlap"


def test_an_old_checkpoint_is_matched_nominally_with_one_warning_naming_it(scanners, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert _infer(scanners, tmp_path / "out", "close", "hamamatsu", checkpoint="old_checkpoint") == 0
    assert [r.getMessage() for r in caplog.records].count(
        f"{scanners['old_checkpoint']}: the checkpoint does not record its tiles' µm/px; every slide is tiled at "
        "the requested 20x relative to its own objective (--match nominal)") == 1
    row, _ = _read(tmp_path / "out", "hamamatsu")
    assert row["read_mpp"] == pytest.approx(2 * HAMAMATSU_MPP)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["match"] == "nominal"


@pytest.mark.parametrize("name", ["pink.ome.tif", "pink.tif"])
def test_ome_tiff_and_plain_tiff_slides_through_infer(name, two_class_set, tmp_path) -> None:
    # 0.5 µm/px: a tiled OME-TIFF pyramid with it in the OME-XML; a stripped plain TIFF (which OpenSlide
    # does not open) with it as pixels per centimetre
    image, ome = tissue_image(PINK), name.endswith(".ome.tif")
    size = {"PhysicalSizeX": SLIDE_MPP, "PhysicalSizeY": SLIDE_MPP}
    slide = write_tiff(tmp_path / name, [image, image[::4, ::4]], tiled=ome, ome=ome, metadata=size,
                       resolution=(1e4 / SLIDE_MPP, 1e4 / SLIDE_MPP, "CENTIMETER"))
    table = infer_slides(two_class_set.checkpoint, [slide], tmp_path / "out", aggregations=["mean"],
                         run=RunOptions(num_workers=0, accelerator="cpu", progress_bar=False))
    assert table["status"].tolist() == ["ok"] and table["n_tiles"].tolist() == [25]  # the 5 x 5 tissue box
    assert table["predicted_label"].tolist() == ["pink"] and table["read_mpp"].tolist() == [pytest.approx(2.0)]
    with h5py.File(tmp_path / "out" / "predictions" / "pink.h5") as file:
        assert read_store_info(file["probs"].attrs["tile_store"]).reader == "tifffile"
