"""Slide discovery from files, folders and CSV lists, and the shard split."""
from __future__ import annotations

from pathlib import Path

import pytest

from wsi_tiling.inputs import collect_slides, parse_shard, shard


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_folder_lists_slides_and_dicom_subfolders(tmp_path: Path) -> None:
    _touch(tmp_path / "b.svs", tmp_path / "a.NDPI", tmp_path / "notes.txt", tmp_path / "dicom_case" / "l0.dcm")
    jobs, problems = collect_slides([tmp_path])
    assert [job.slide_id for job in jobs] == ["a", "b", "dicom_case"]
    assert problems == []


def test_csv_rows_with_ids_and_mpp_relative_to_the_csv(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("slide_path,slide_id,mpp\nslides/x.svs,case1,0.5\nslides/y.svs,,\n")
    jobs, _ = collect_slides([tmp_path / "list.csv"])
    assert [(j.slide_path, j.slide_id, j.mpp) for j in jobs] == [
        (tmp_path / "slides" / "x.svs", "case1", 0.5), (tmp_path / "slides" / "y.svs", "y", None)]


@pytest.mark.parametrize(("content", "message"), [
    ("path\nx.svs\n", "no 'slide_path' column"),
    ("slide_path,mpp\nx.svs,-1\n", "line 2: mpp must be a positive number"),
])
def test_bad_csv_is_a_problem_naming_it(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.csv").write_text(content)
    jobs, problems = collect_slides([tmp_path / "bad.csv"])
    assert jobs == [] and message in problems[0].message and "bad.csv" in problems[0].message


def test_csv_row_with_an_empty_path_is_a_problem_and_the_other_rows_are_kept(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("slide_path,slide_id\nx.svs,\n ,blank\ny.svs,\n")
    jobs, problems = collect_slides([tmp_path / "list.csv"])
    assert [job.slide_path for job in jobs] == [tmp_path / "x.svs", tmp_path / "y.svs"]
    assert [p.message for p in problems] == [f"{tmp_path / 'list.csv'}: line 3: empty slide_path"]


def test_missing_path_empty_folder_and_duplicate_ids_are_problems(tmp_path: Path) -> None:
    _touch(tmp_path / "one" / "s.svs", tmp_path / "two" / "s.tiff")
    (tmp_path / "empty").mkdir()
    jobs, problems = collect_slides([tmp_path / "one", tmp_path / "two", tmp_path / "empty", tmp_path / "gone.svs"])
    assert [job.slide_path for job in jobs] == [tmp_path / "one" / "s.svs"]
    messages = [problem.message for problem in problems]
    assert "s.tiff" in messages[0] and "already used" in messages[0]
    assert "empty" in messages[1] and "no slides" in messages[1]
    assert "gone.svs" in messages[2] and "no such file" in messages[2]


def test_shards_partition_the_batch(tmp_path: Path) -> None:
    _touch(*(tmp_path / f"slide_{i:02d}.svs" for i in range(11)))
    jobs, _ = collect_slides([tmp_path])
    parts = [shard(list(reversed(jobs)), i, 3) for i in range(3)]  # input order must not matter
    ids = [job.slide_id for part in parts for job in part]
    assert sorted(ids) == sorted(job.slide_id for job in jobs) and len(ids) == len(set(ids)) == 11
    assert [len(part) for part in parts] == [4, 4, 3]


@pytest.mark.parametrize("text", ["3/3", "-1/2", "a/b", "2"])
def test_bad_shard_spec_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="shard"):
        parse_shard(text)
