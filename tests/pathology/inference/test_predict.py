"""``pathology.inference.predict``: the Predictor's test-time augmentation, on every installed backend."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pathology.inference.predict import Predictor
from pathology.models import create_model, optimize_for_inference
from pathology.models.export import LogitsAndEmbeddings

IMG_PX = 32
BACKENDS = [b for b in ("torch", "onnxruntime", "openvino") if b == "torch" or importlib.util.find_spec(b)]


def _by_hand(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views written out: rotations by 0, 90, 180, 270° and their mirror images."""
    rotations = [x, torch.rot90(x, 1, (2, 3)), torch.rot90(x, 2, (2, 3)), torch.rot90(x, 3, (2, 3))]
    return rotations + [torch.flip(r, (3,)) for r in rotations]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tta_averages_probabilities_and_embeddings_over_the_views(backend: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("efficientformer_tiny", num_classes=2, img_size=IMG_PX).eval()
    x = torch.rand(3, 3, IMG_PX, IMG_PX)
    x[:, :, :, :10] -= 1.5  # a dark band on the left: the views differ
    with torch.no_grad():
        outputs = [LogitsAndEmbeddings(model)(view) for view in _by_hand(x)]
    expected_probs = torch.stack([logits.softmax(dim=1) for logits, _ in outputs]).mean(dim=0).numpy()
    expected_embeddings = torch.stack([emb for _, emb in outputs]).mean(dim=0).numpy()
    runner = optimize_for_inference(model, backend=backend, precision="32-true", cache_dir=tmp_path)
    probs, embeddings = Predictor(runner, embeddings=True, tta=True).predict(x)
    plain, _ = Predictor(runner).predict(x)
    np.testing.assert_allclose(probs, expected_probs, atol=1e-4)
    np.testing.assert_allclose(embeddings, expected_embeddings, atol=1e-3, rtol=1e-3)
    assert np.abs(probs - plain).max() > 1e-3
