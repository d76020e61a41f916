"""pathology/models/info.py: ``pathology model-info`` sizes against the paper's figures."""
from __future__ import annotations

import pytest

from pathology.cli import main as pathology_main
from pathology.models import create_model
from pathology.models.info import count_macs, measure

# Li et al. 2022 (arXiv 2206.01191), table 1: EfficientFormer-L1 at 224 px, 1000 classes
PAPER_L1_PARAMS_M = 12.3
PAPER_L1_GMACS = 1.3
PAPER_ROUNDING = 0.05


def test_l1_size_matches_the_paper() -> None:
    model = create_model("efficientformer_l1")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - PAPER_L1_PARAMS_M) < PAPER_ROUNDING
    assert abs(count_macs(model, (224, 224)) / 1e9 - PAPER_L1_GMACS) < PAPER_ROUNDING
    assert model.training  # counting leaves the model's mode alone


def test_measure_counts_the_same_macs_as_the_eager_model() -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=64)
    info = measure(model, (64, 64), batch_size=2, repeats=1)
    assert info.macs == count_macs(model, (64, 64))  # the optimised form does the same multiplications
    assert info.params == sum(p.numel() for p in model.parameters())
    assert info.latency_ms > 0 and info.throughput > 0 and info.batch_size == 2


def test_attention_at_16_adds_its_matmul_macs() -> None:
    size = (64, 64)
    base = count_macs(create_model("efficientformer_l1", img_size=size), size)
    more = count_macs(create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, img_size=size), size)
    # one MHSA block at /16 on 224 channels, 4 x 4 = 16 tokens, timm's Attention (8 heads, key 32, value 128):
    tokens, dim, qk, v, hidden = 16, 224, 8 * 32, 8 * 128, 4 * 224
    expected = tokens * dim * (2 * qk + v) + tokens * v * dim + tokens * tokens * (qk + v) + 2 * tokens * dim * hidden
    assert more - base == expected


def test_command_prints_size_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model-info", "efficientformer_l1", "--mhsa-blocks", "16:2,32:1", "--img-size", "64",
            "--batch-size", "2", "--repeats", "1", "--num-classes", "2"]
    assert pathology_main(argv) == 0
    out = capsys.readouterr().out
    assert "mhsa_blocks=16:2,32:1" in out and "64x64" in out and "img/s" in out


@pytest.mark.parametrize("argv", [["--mhsa-blocks", "16:x"], ["--img-size", "200"], ["--mhsa-blocks", "64:1"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert pathology_main(["model-info", "efficientformer_l1", *argv]) == 2
    assert "pathology model-info:" in capsys.readouterr().err

