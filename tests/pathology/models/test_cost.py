"""pathology/models/cost.py: parameters and MACs against the paper's figures, speed through the runner."""
from __future__ import annotations

from pathlib import Path

from pathology.models import create_model
from pathology.models.cost import count_macs, measure

# Li et al. 2022 (arXiv 2206.01191), table 1: EfficientFormer-L1 at 224 px, 1000 classes
PAPER_L1_PARAMS_M = 12.3
PAPER_L1_GMACS = 1.3
PAPER_ROUNDING = 0.05


def test_l1_size_matches_the_paper() -> None:
    model = create_model("efficientformer_l1")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - PAPER_L1_PARAMS_M) < PAPER_ROUNDING
    assert abs(count_macs(model, (224, 224)) / 1e9 - PAPER_L1_GMACS) < PAPER_ROUNDING
    assert model.training  # counting leaves the model's mode alone


def test_measure_counts_the_eager_model_and_times_the_runner() -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=64)
    info = measure(model, (64, 64), backend="torch", batch_size=2, repeats=1)
    assert info.macs == count_macs(model, (64, 64))
    assert info.params == sum(p.numel() for p in model.parameters())
    assert info.latency_ms > 0 and info.throughput > 0 and info.batch_size == 2
    assert info.backend == "torch"


def test_measure_through_onnxruntime_exports_into_the_given_folder(tmp_path: Path) -> None:
    """The study passes the checkpoint's folder, so inference's exported graph is the one timed."""
    model = create_model("efficientformer_tiny", mhsa_blocks={32: 1}, num_classes=2, img_size=64)
    info = measure(model, (64, 64), backend="onnxruntime", batch_size=2, repeats=1, cache_dir=tmp_path)
    assert info.backend == "onnxruntime" and info.throughput > 0
    assert len(list(tmp_path.glob("*.onnx"))) == 1


def test_attention_at_16_adds_its_matmul_macs() -> None:
    size = (64, 64)
    base = count_macs(create_model("efficientformer_l1", img_size=size), size)
    more = count_macs(create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, img_size=size), size)
    # one MHSA block at /16 on 224 channels, 4 x 4 = 16 tokens, timm's Attention (8 heads, key 32, value 128):
    tokens, dim, qk, v, hidden = 16, 224, 8 * 32, 8 * 128, 4 * 224
    expected = tokens * dim * (2 * qk + v) + tokens * v * dim + tokens * tokens * (qk + v) + 2 * tokens * dim * hidden
    assert more - base == expected
