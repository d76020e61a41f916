"""pathology/models/ensemble.py: the ensemble's softmax is the members' mean probability, its embedding
their mean embedding, through every backend; members that do not fit together are refused."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pathology.models import create_model, optimize_for_inference
from pathology.models.ensemble import Ensemble

ATOL = 1e-4  # float32 rounding of another operator order (the runners' promise)
IMG, N_CLASSES, N_MEMBERS = 64, 3, 3


def _member(img_size: int = IMG, num_classes: int = N_CLASSES) -> nn.Module:
    return create_model("efficientformer_tiny", mhsa_blocks={32: 1}, num_classes=num_classes, img_size=img_size)


@pytest.fixture(scope="module")
def members(randomize: Callable[..., nn.Module]) -> list[nn.Module]:
    """Members with every weight random (and different), so each one changes the mean."""
    return [randomize(_member(), seed).eval() for seed in range(N_MEMBERS)]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


def _by_hand(members: list[nn.Module], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax and mean pooled embedding, one member at a time."""
    with torch.no_grad():
        probs = sum(m(images).softmax(dim=1) for m in members) / len(members)
        embeddings = sum(m.forward_head(m.forward_features(images), pre_logits=True) for m in members) / len(members)
    return probs, embeddings


def test_softmax_is_the_mean_probability_and_embedding_the_mean(members, images) -> None:
    ensemble = Ensemble(members).eval()
    probs, embeddings = _by_hand(members, images)
    with torch.no_grad():
        logits = ensemble(images)
        pooled = ensemble.forward_head(ensemble.forward_features(images), pre_logits=True)
    assert not torch.allclose(members[0](images).softmax(dim=1), probs, atol=1e-3)  # members really differ
    torch.testing.assert_close(logits.softmax(dim=1), probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits.exp().sum(dim=1), torch.ones(len(images)), atol=1e-6, rtol=0)  # log-probs
    torch.testing.assert_close(pooled, embeddings, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_every_runner_runs_the_ensemble(members, images, backend: str, tmp_path: Path) -> None:
    """What predict-tiles and infer use: fused torch, and the exported ONNX graph."""
    runner = optimize_for_inference(Ensemble(members).eval(), backend=backend, cache_dir=tmp_path)
    probs, embeddings = _by_hand(members, images)
    logits, pooled = runner.logits_and_embeddings(images)
    torch.testing.assert_close(logits.softmax(dim=1), probs, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, embeddings, atol=ATOL, rtol=0)


@pytest.mark.parametrize("other", [{"img_size": 32}, {"num_classes": 2}])
def test_members_that_do_not_fit_together_are_refused(members, other: dict) -> None:
    with pytest.raises(ValueError, match="differ in input size or number of classes"):
        Ensemble([members[0], _member(**other)])
