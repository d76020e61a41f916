"""pathology/models/latency.py: every block is timed, the shares partition the call, JSON round trip."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathology.cli import main as pathology_main
from pathology.models import create_model
from pathology.models.cost import count_macs
from pathology.models.latency import measure_latency

SIZE = (64, 64)
# efficientformer_tiny, pooling blocks (1, 1, 2, 1), MHSA {16: 1, 32: 1}: stem, 1 pool block at /4, then per
# stage a downsample and its blocks (the MHSA block after the pooling ones), then the head
EXPECTED_BLOCKS = [
    ("stem", "stem"), ("stages.0.blocks.0", "pool"),
    ("stages.1.downsample", "downsample"), ("stages.1.blocks.0", "pool"),
    ("stages.2.downsample", "downsample"), ("stages.2.blocks.0", "pool"), ("stages.2.blocks.1", "pool"),
    ("stages.2.blocks.2", "mhsa"),
    ("stages.3.downsample", "downsample"), ("stages.3.blocks.0", "pool"), ("stages.3.blocks.1", "mhsa"),
    ("head", "head"),
]


def test_every_block_timed_and_shares_sum_to_one() -> None:
    model = create_model("efficientformer_tiny", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=SIZE,
                         act_layer="hard_swish")
    report = measure_latency(model, SIZE, backend="torch", repeats=2)
    assert [(b.name, b.kind) for b in report.blocks] == EXPECTED_BLOCKS
    assert [b.stride for b in report.blocks if b.kind == "mhsa"] == [16, 32]
    assert sum(b.eager_share for b in report.blocks) == pytest.approx(1, abs=1e-9)
    assert sum(b.optimised_share for b in report.blocks) == pytest.approx(1, abs=1e-9)
    assert all(b.eager_ms > 0 and b.optimised_ms > 0 for b in report.blocks)
    assert sum(b.macs for b in report.blocks) == count_macs(model, SIZE)
    assert sum(b.params for b in report.blocks) == sum(p.numel() for p in model.parameters())
    # the MLP activation and the stem's two ReLUs, each a part of the whole
    assert set(report.activations) == {"hard_swish", "relu"}
    assert all(0 < share < 1 for _, share, _, _ in report.activations.values())
    assert report.backend == "torch" and report.backend_ms > 0
    assert model.training  # left as it was


def test_command_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "latency" / "tiny.json"
    argv = ["model-info", "efficientformer_tiny", "--mhsa-blocks", "16:1,32:1", "--img-size", "64", "--batch-size",
            "2", "--repeats", "1", "--latency", "--backend", "torch", "--json", str(out)]
    assert pathology_main(argv) == 0
    assert "stages.2.blocks.2" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [b["name"] for b in data["blocks"]] == [name for name, _ in EXPECTED_BLOCKS]
    assert data["backend"] == "torch" and data["img_size"] == list(SIZE)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.json"]  # written atomically
