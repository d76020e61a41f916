"""pathology/models/info.py: ``pathology model-info`` prints size and speed, refuses bad arguments."""
from __future__ import annotations

import pytest

from pathology.cli import main as pathology_main


def test_command_prints_size_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model-info", "efficientformer_l1", "--mhsa-blocks", "16:2,32:1", "--img-size", "64",
            "--batch-size", "2", "--repeats", "1", "--num-classes", "2", "--backend", "torch"]
    assert pathology_main(argv) == 0
    out = capsys.readouterr().out
    assert "mhsa_blocks=16:2,32:1" in out and "64x64" in out and "img/s" in out
    assert "(batch 1, torch," in out


@pytest.mark.parametrize("argv", [["--mhsa-blocks", "16:x"], ["--img-size", "200"], ["--mhsa-blocks", "64:1"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert pathology_main(["model-info", "efficientformer_l1", *argv]) == 2
    assert "pathology model-info:" in capsys.readouterr().err
