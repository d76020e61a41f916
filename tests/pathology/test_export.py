"""pathology/export.py: ``pathology export`` writes a graph ONNX Runtime runs as the eager model."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from pathology.checkpoint import ModelSpec, save_checkpoint
from pathology.cli import main as pathology_main
from pathology.models import create_model
from wsi_tiling import Resolution

ATOL = 1e-4
CLASSES = ("benign", "tumour", "other")


@pytest.mark.slow  # an export takes seconds
@pytest.mark.parametrize("mhsa", [{32: 1}, {16: 2, 32: 1}], ids=["mhsa32", "mhsa16+32"])
@pytest.mark.parametrize("img_size", [224, 256])
def test_onnx_runtime_equals_eager(img_size: int, mhsa: dict[int, int], tmp_path: Path) -> None:
    spec = ModelSpec("efficientformer_tiny", mhsa, CLASSES, img_size, 2 * img_size, Resolution(0.5, "mpp"),
                     act_layer="hard_swish")
    torch.manual_seed(0)  # LayerScale 1: every block changes the output (timm's 1e-5 makes blocks near-identities)
    model = create_model(spec.model_name, mhsa_blocks=mhsa, num_classes=len(CLASSES), img_size=img_size,
                         act_layer=spec.act_layer, layer_scale_init_value=1.0).eval()
    checkpoint = save_checkpoint(tmp_path / "model.ckpt", model, spec)
    out = tmp_path / "exported" / "model.onnx"
    assert pathology_main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temporary file left
    graph = onnx.load(out)
    assert ModelSpec.from_dict(json.loads({p.key: p.value for p in graph.metadata_props}["pathology_spec"])) == spec
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # batch 3 (the batch is dynamic); per-image brightness offsets, so the pooled logits differ between images
    images = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    images += torch.tensor([-2.0, 0.0, 2.0]).reshape(3, 1, 1, 1)
    logits, embeddings = session.run(["logits", "embeddings"], {"images": images.numpy()})
    with torch.inference_mode():
        features = model.forward_features(images)
        expected = model.forward_head(features)
        expected_embeddings = model.forward_head(features, pre_logits=True)
    assert (expected - expected.mean(dim=0)).abs().max() > 100 * ATOL  # the images' logits differ
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.from_numpy(embeddings), expected_embeddings, rtol=0, atol=ATOL)


def test_bad_checkpoint_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "model.onnx"
    assert pathology_main(["export", "--checkpoint", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pathology export: ") and "notes.ckpt" in err
    assert not out.exists()
