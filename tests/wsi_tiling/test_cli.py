"""The wsi-tile command: batches with bad inputs, usage errors, process pool, crash and resume."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from wsi_tiling import tiler as tiler_module
from wsi_tiling.cli import _pooled, main
from wsi_tiling.inputs import SlideJob

KILL_TIMEOUT_S = 60


def _manifest(out: Path, name: str = "manifest.csv") -> dict[tuple[str, str], dict[str, str]]:
    with (out / name).open() as file:
        return {(row["slide_id"], row["setting"]): row for row in csv.DictReader(file)}


def test_bad_slides_are_recorded_and_the_rest_finish(tmp_path: Path, stripes_slide: Path, blank_slide: Path,
                                                      text_as_svs: Path, truncated_slide: Path, no_mpp_slide: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    inputs = [stripes_slide, blank_slide, text_as_svs, truncated_slide, no_mpp_slide, tmp_path / "gone.svs",
              tmp_path / "empty"]
    code = main([*map(str, inputs), "--out", str(tmp_path / "out"), "--magnification", "10", "80",
                 "--tile-size", "64", "--save-tiles", "--workers", "1"])
    assert code == 1
    rows = _manifest(tmp_path / "out")
    status = {key: row["status"] for key, row in rows.items()}
    assert status[("stripes", "10x_64px_0px_overlap")] == "ok"
    assert status[("blank", "10x_64px_0px_overlap")] == "no-tissue"
    expected_errors = {("stripes", "80x_64px_0px_overlap"): "stripes.svs",
                       ("blank", "80x_64px_0px_overlap"): "blank.svs",
                       ("notes", "10x_64px_0px_overlap"): "notes.svs",
                       ("truncated", "10x_64px_0px_overlap"): "truncated.svs",
                       ("no_mpp", "10x_64px_0px_overlap"): "no_mpp.svs",
                       ("gone.svs", "10x_64px_0px_overlap"): "gone.svs", ("empty", "10x_64px_0px_overlap"): "empty"}
    for key, name in expected_errors.items():
        assert status[key] == "error" and name in rows[key]["error"]
    assert "--slide-mpp" in rows[("no_mpp", "10x_64px_0px_overlap")]["error"]
    assert int(rows[("stripes", "10x_64px_0px_overlap")]["n_tiles"]) > 0
    # One picture per slide for the run, with a panel per setting that made a store (80x failed):
    # the 4 µm/px thumbnail, 4096 / 16 = 256 px wide, under its title.
    thumbnails = tmp_path / "out" / "thumbnails"
    assert sorted(p.name for p in thumbnails.iterdir()) == ["blank.png", "stripes.png"]
    picture = cv2.imread(str(thumbnails / "stripes.png"))
    assert picture.shape[1] == 4096 // 16 and 3072 // 16 < picture.shape[0] < 2 * 3072 // 16
    assert (picture == (0, 160, 0)).all(axis=2).any()  # the tissue outline (BGR of (0, 160, 0))
    assert not list((tmp_path / "out").glob("*/thumbnails"))  # no second copy in the setting folders
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wsi-tile: error")]
    assert len(errors) == len(set(errors)) == 7  # one line per distinct message, not one per setting
    assert all(any(name in line for name in expected_errors.values()) for line in errors)
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_csv_mpp_column_rescues_a_slide_without_metadata(tmp_path: Path, no_mpp_slide: Path) -> None:
    listing = tmp_path / "slides.csv"
    listing.write_text(f"slide_path,slide_id,mpp\n{no_mpp_slide},case_1,0.25\n")
    assert main([str(listing), "--out", str(tmp_path / "out"), "--mpp", "1.0", "--tile-size", "64",
                 "--workers", "1"]) == 0
    row = _manifest(tmp_path / "out")[("case_1", "1.00mpp_64px_0px_overlap")]
    assert (row["status"], row["mpp_source"], float(row["target_mpp"])) == ("ok", "user", 1.0)


@pytest.mark.parametrize("arguments", [["--tile-size", "0"], ["--tile-size", "64", "--overlap", "-1"],
                                       ["--tile-size", "64", "--overlap", "64"]])
def test_bad_tile_size_or_overlap_is_a_usage_error(tmp_path: Path, stripes_slide: Path, arguments: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(stripes_slide), "--out", str(tmp_path), "--magnification", "10", *arguments])
    assert exit_info.value.code == 2
    assert ("--tile-size" in capsys.readouterr().err) or "--overlap" in arguments


def test_unwritable_output_folder_names_it(tmp_path: Path, stripes_slide: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main([str(stripes_slide), "--out", str(blocker / "out"), "--magnification", "10", "--tile-size", "64"])
    assert code == 2 and "a_file" in capsys.readouterr().err


def test_process_pool_and_shards(tmp_path: Path, stripes_slide: Path, blank_slide: Path) -> None:
    args = [str(stripes_slide), str(blank_slide), "--out", str(tmp_path), "--magnification", "10",
            "--tile-size", "64", "--workers", "2"]
    assert main([*args, "--shard", "0/2"]) == 0 and main([*args, "--shard", "1/2"]) == 0
    first, second = _manifest(tmp_path, "manifest_shard0of2.csv"), _manifest(tmp_path, "manifest_shard1of2.csv")
    assert [key[0] for key in first] == ["blank"] and [key[0] for key in second] == ["stripes"]
    assert main(args) == 0
    assert {row["status"] for row in _manifest(tmp_path).values()} == {"ok", "no-tissue"}


def test_resume_redraws_the_picture_only_when_a_store_was_made(tmp_path: Path, stripes_slide: Path) -> None:
    args = [str(stripes_slide), "--out", str(tmp_path), "--tile-size", "64", "--workers", "1", "--resume"]
    picture = tmp_path / "thumbnails" / "stripes.png"
    assert main([*args, "--magnification", "10"]) == 0
    one_panel = cv2.imread(str(picture)).shape
    picture.write_bytes(b"kept")
    assert main([*args, "--magnification", "10"]) == 0 and picture.read_bytes() == b"kept"  # all skipped
    assert main([*args, "--magnification", "10", "5"]) == 0  # 5x is new: both panels drawn
    two_panels = cv2.imread(str(picture)).shape
    assert two_panels[1] == one_panel[1] and two_panels[0] > 2 * 3072 // 16


def _stores(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    stores = {}
    for path in sorted(out.rglob("*.h5")):
        with h5py.File(path) as file:
            stores[path.stem] = (file["coords"][:], file["tiles"][:])
    return stores


def test_killed_run_leaves_nothing_resume_would_trust(tmp_path: Path, stripes_slide: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(6):
        (slides / f"s{i}.svs").symlink_to(stripes_slide)
    settings = ["--magnification", "20", "--tile-size", "128", "--save-tiles", "--workers", "1"]
    command = [str(slides), "--out", str(tmp_path / "run"), *settings]
    process = subprocess.Popen([sys.executable, "-m", "wsi_tiling.cli", *command],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not list((tmp_path / "run").rglob("*.h5")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = _stores(tmp_path / "run")
    assert not (tmp_path / "run" / "manifest.csv").exists()  # only a .partial with the rows done so far
    for coords, tiles in finished.values():  # whatever exists under the final name is complete
        assert len(coords) == len(tiles) > 0 and tiles[-1].any()
    assert main([*command, "--resume"]) == 0
    rows = _manifest(tmp_path / "run")
    assert sum(row["status"] == "skipped" for row in rows.values()) == len(finished) < 6
    assert main([str(slides), "--out", str(tmp_path / "clean"), *settings]) == 0
    resumed, clean = _stores(tmp_path / "run"), _stores(tmp_path / "clean")
    assert resumed.keys() == clean.keys() == {f"s{i}" for i in range(6)}
    for name in clean:
        assert (resumed[name][0] == clean[name][0]).all() and (resumed[name][1] == clean[name][1]).all()


class _DiesOn:
    """A worker task that kills its own process for one slide, as a decoder crash would."""

    def __init__(self, slide_id: str) -> None:
        self.slide_id = slide_id

    def __call__(self, job: SlideJob) -> list[dict[str, str]]:
        if job.slide_id == self.slide_id:
            os._exit(1)
        return [{"slide_id": job.slide_id, "setting": "10x", "status": "ok"}]


def test_a_dead_worker_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    jobs = [SlideJob(tmp_path / f"{name}.svs", name) for name in ("a", "b", "c")]
    rows = [row for batch in _pooled(jobs, _DiesOn("b"), 2, ["10x"]) for row in batch]
    status = {row["slide_id"]: row["status"] for row in rows}
    assert status == {"a": "ok", "b": "error", "c": "ok"}
    assert "b.svs" in next(row["error"] for row in rows if row["slide_id"] == "b")


def test_tcga_slide_without_mpp_needs_slide_mpp(tmp_path: Path, shared_data: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    tcga = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    args = [str(tcga), "--out", str(tmp_path), "--magnification", "10", "--tile-size", "128", "--workers", "1"]
    assert main(args) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and tcga.name in error[0] and "--slide-mpp" in error[0]
    assert main([*args, "--slide-mpp", "0.25"]) == 0
    row = _manifest(tmp_path)[("tcga-cr-7395-01a-01-ts1", "10x_128px_0px_overlap")]
    # 0.25 µm/px given -> 40x derived -> 10x is a downsample of 4, read from the 2.0005x level
    assert (row["status"], row["mpp_source"], row["read_level"]) == ("ok", "user", "1")
    assert float(row["target_mpp"]) == pytest.approx(1.0)


def test_an_attribute_error_in_a_reader_costs_the_slide_not_the_batch(
        tmp_path: Path, stripes_slide: Path, blank_slide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tiler_module.plan_read

    def renamed_api(resolution, slide, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a library changed under us
        if slide.path.name == "blank.svs":
            raise AttributeError("module 'openslide.lowlevel' has no attribute 'read_region'")
        return real(resolution, slide, **kwargs)

    monkeypatch.setattr(tiler_module, "plan_read", renamed_api)
    out = tmp_path / "out"
    assert main([str(stripes_slide), str(blank_slide), "--out", str(out), "--magnification", "10",
                 "--tile-size", "64", "--workers", "1", "--no-thumbnails"]) == 1
    rows = _manifest(out)
    assert rows[("stripes", "10x_64px_0px_overlap")]["status"] == "ok"
    blank = rows[("blank", "10x_64px_0px_overlap")]
    assert blank["status"] == "error" and "blank.svs" in blank["error"] and "AttributeError" in blank["error"]
