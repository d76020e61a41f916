"""``atomic_path``: a finished file appears whole, with a plainly created file's permissions."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pathology.atomic import atomic_path


def test_a_finished_file_has_the_permissions_of_a_plainly_created_one(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # open() applies the process umask to 0666
    with atomic_path(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("x")
    assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
