"""Resuming ``pathology infer``: after a crash the same command finishes the run without touching
finished slides, and a changed checkpoint or setting redoes the slides."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from pathology.checkpoint import load_checkpoint
from pathology.inference import infer
from pathology.inference.infer import infer_slides
from pathology.inference.outputs import Extras
from pathology.inference.predict import Predictor, RunOptions
from pathology.inference.records import run_key, weights_hash

RUN = RunOptions(batch_size=16, num_workers=0, accelerator="cpu", progress_bar=False)
KILL_TIMEOUT_S = 300  # for the killed run's first finished slide (imports included)
COPIES = 8  # slide ids per slide file in the killed cohort: the kill lands with most slides to go
SLIDES = ("blue_1", "mixed", "pink_1")  # predicted in this order (slide-id order)
EXTRAS = Extras(embeddings=True, geojson=True)


class Crash(Exception):
    """Stands in for the process dying."""


def _run(data, out: Path, **kwargs) -> pd.DataFrame:
    kwargs = {"aggregations": ["mean", "vote"], "run": RUN, "extras": EXTRAS} | kwargs
    return infer_slides(kwargs.pop("checkpoint", data.checkpoint), [data.slide[s] for s in SLIDES], out, **kwargs)


def _slide_files(out: Path, slide: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime ns) of every output file of a slide."""
    paths = [out / "predictions" / f"{slide}.h5", out / "features" / f"{slide}.h5",
             out / "geojson" / f"{slide}.geojson", out / "records" / f"{slide}.json"]
    return {p.name + p.parent.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def reference(two_class_set, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    _run(two_class_set, out)
    return out


def _fail_on_call(monkeypatch, owner, name: str, call: int, error: type[BaseException] = Crash) -> None:
    """Makes ``owner.name`` raise ``error`` on its ``call``-th call (1-based)."""
    original, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


# Where the process dies, and the slides finished by then: predicting the 2nd slide's first batch
# (25 tiles are 2 batches of 16); after the 2nd slide's files, before its record; tiling the 3rd
# slide (in the producer thread, while the 2nd is predicted: the 2nd still finishes).
CRASHES = {"predict": ((Predictor, "predict", 3), ["blue_1"]), "record": ((infer, "write_record", 2), ["blue_1"]),
           "tiling": ((infer, "tile_for_model", 3), ["blue_1", "mixed"])}


@pytest.mark.parametrize("where", sorted(CRASHES))
def test_rerun_after_a_crash_finishes_without_touching_finished_slides(where, two_class_set, reference, tmp_path,
                                                                       monkeypatch) -> None:
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        crash, done = CRASHES[where]
        _fail_on_call(patch, *crash)
        with pytest.raises(Crash):
            _run(two_class_set, out)
    finished = {s: _slide_files(out, s) for s in done}
    assert sorted(p.stem for p in (out / "records").glob("*.json")) == done
    assert not list(out.rglob(".*.tmp*"))  # no half-written file left, under any name
    table = _run(two_class_set, out)
    assert {s: _slide_files(out, s) for s in done} == finished  # never rewritten
    assert table["status"].tolist() == ["ok"] * 3
    got, expected = (pd.read_csv(run / "slides.csv").drop(columns="seconds") for run in (out, reference))
    pd.testing.assert_frame_equal(got, expected, atol=1e-6)
    for slide in SLIDES:
        for folder, key in (("predictions", "probs"), ("features", "features")):
            with h5py.File(out / folder / f"{slide}.h5") as got, h5py.File(reference / folder / f"{slide}.h5") as want:
                np.testing.assert_allclose(got[key][:], want[key][:], atol=1e-6)
                np.testing.assert_array_equal(got["coords"][:], want["coords"][:])


def test_same_command_skips_and_a_changed_setting_or_checkpoint_redoes(two_class_set, tmp_path) -> None:
    out = tmp_path / "out"
    _run(two_class_set, out)
    first = {s: _slide_files(out, s) for s in SLIDES}
    _run(two_class_set, out)
    assert {s: _slide_files(out, s) for s in SLIDES} == first  # everything skipped
    table = _run(two_class_set, out, aggregations=["mean", "max"])  # another setting: every slide redone
    second = {s: _slide_files(out, s) for s in SLIDES}
    assert all(second[s][name] != first[s][name] for s in SLIDES for name in first[s])
    assert "max_blue" in table.columns and "vote_blue" not in table.columns
    payload = torch.load(two_class_set.checkpoint, weights_only=True)
    payload["state_dict"]["model.head.bias"] = payload["state_dict"]["model.head.bias"] + 1e-3
    changed = tmp_path / "changed.ckpt"
    torch.save(payload, changed)
    _run(two_class_set, out, checkpoint=changed, aggregations=["mean", "max"])
    third = {s: _slide_files(out, s) for s in SLIDES}
    assert all(third[s][name] != second[s][name] for s in SLIDES for name in second[s])


def test_run_key_follows_weights_spec_settings_and_slide(two_class_set, tmp_path) -> None:
    state, spec = load_checkpoint(two_class_set.checkpoint)
    spec_dict = spec.to_dict()
    base = weights_hash(state, spec_dict)
    assert weights_hash(dict(reversed(state.items())), spec_dict) == base  # key order does not matter
    nudged = {k: v + 1e-6 if k == "head.bias" else v for k, v in state.items()}
    assert weights_hash(nudged, spec_dict) != base
    assert weights_hash(state, spec_dict | {"img_size": 64}) != base
    slide = two_class_set.slide["pink_1"]
    key = run_key(base, {"min_tissue": 0.5}, slide, None)
    assert run_key(base, {"min_tissue": 0.5}, slide, None) == key
    assert run_key(base, {"min_tissue": 0.4}, slide, None) != key
    assert run_key(base, {"min_tissue": 0.5}, slide, 0.25) != key
    copy = tmp_path / slide.name
    copy.write_bytes(slide.read_bytes() + b"\0")  # same name, other content
    assert run_key(base, {"min_tissue": 0.5}, copy, None) != key



def test_ctrl_c_still_writes_the_tables_with_unfinished_slides_pending(two_class_set, tmp_path,
                                                                       monkeypatch) -> None:
    out = tmp_path / "out"
    _fail_on_call(monkeypatch, infer, "write_record", 2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(two_class_set, out)
    table = pd.read_csv(out / "slides.csv")
    assert table["status"].tolist() == ["ok", "pending", "pending"]
    assert table["mean_blue"].iloc[0] == pytest.approx(1, abs=1e-6)  # blue_1 finished


def _cohort(data, path: Path) -> Path:
    """A CSV naming each of :data:`SLIDES` under :data:`COPIES` slide ids."""
    ids = [(f"c{copy}_{slide}", data.slide[slide]) for copy in range(COPIES) for slide in SLIDES]
    pd.DataFrame({"slide_id": [i for i, _ in ids], "slide_path": [str(p) for _, p in ids]}).to_csv(path, index=False)
    return path


def _finished(out: Path) -> dict[str, dict[str, tuple[int, int]]]:
    return {p.stem: _slide_files(out, p.stem) for p in (out / "records").glob("*.json")}


def test_kill_9_then_the_same_command_gives_the_uninterrupted_result(two_class_set, tmp_path) -> None:
    listing = _cohort(two_class_set, tmp_path / "cohort.csv")
    args = ["--checkpoint", str(two_class_set.checkpoint), "--aggregation", "mean,vote", "--embeddings", "--geojson",
            "--batch-size", "16", "--num-workers", "0", "--accelerator", "cpu"]
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pathology.cli", "infer", str(listing), "--out", str(out), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not list(out.glob("records/*.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = _finished(out)
    assert 0 < len(finished) < COPIES * len(SLIDES)
    assert not (out / "slides.csv").exists()
    for slide in finished:  # a finished slide's files are complete
        with h5py.File(out / "predictions" / f"{slide}.h5") as file:
            assert file["probs"].shape == (25, 2)
    assert infer.main([str(listing), "--out", str(out), *args]) == 0
    assert {s: files for s, files in _finished(out).items() if s in finished} == finished  # never rewritten
    assert infer.main([str(listing), "--out", str(tmp_path / "clean"), *args]) == 0
    got, expected = (pd.read_csv(run / "slides.csv").drop(columns="seconds") for run in (out, tmp_path / "clean"))
    assert (got["status"] == "ok").all() and len(got) == COPIES * len(SLIDES)
    pd.testing.assert_frame_equal(got, expected, atol=1e-6)
    for slide in got["slide_id"]:
        with h5py.File(out / "features" / f"{slide}.h5") as a, h5py.File(tmp_path / "clean" / "features" / f"{slide}.h5") as b:
            np.testing.assert_allclose(a["features"][:], b["features"][:], atol=1e-6)
            np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
