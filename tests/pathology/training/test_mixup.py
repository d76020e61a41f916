"""Mixup and CutMix batches and targets by hand for a fixed lambda, odd batches left unmixed, and the
class-weighted soft cross-entropy against PyTorch's for one-hot targets."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pathology.training import TileClassifier
from pathology.training.mixup import create_mixup, mix, soft_cross_entropy

PX = 4


def _two_tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """Tile 0 all zeros (class 0), tile 1 all ones (class 1), 1 channel of PX x PX."""
    return torch.stack([torch.zeros(1, PX, PX), torch.ones(1, PX, PX)]), torch.tensor([0, 1])


def test_mixup_blends_each_tile_with_the_reversed_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(np.random, "beta", lambda a, b, size=None: 0.3)  # lambda = 0.3
    images, targets = mix(create_mixup(1.0, 0.0, 1.0, num_classes=2), *_two_tiles())
    assert torch.allclose(images[0], torch.full((1, PX, PX), 0.7))  # 0.3 * 0 + 0.7 * 1
    assert torch.allclose(images[1], torch.full((1, PX, PX), 0.3))
    assert torch.allclose(targets, torch.tensor([[0.3, 0.7], [0.7, 0.3]]))


def test_cutmix_pastes_a_box_and_mixes_labels_by_area(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(np.random, "beta", lambda a, b, size=None: 0.75)  # keep 3/4: a 2 x 2 box of 4 x 4
    monkeypatch.setattr(np.random, "randint", lambda low, high, size=None: 2)  # box centre (2, 2): rows, cols 1..2
    images, targets = mix(create_mixup(0.0, 1.0, 1.0, num_classes=2), *_two_tiles())
    box = torch.zeros(1, PX, PX)
    box[:, 1:3, 1:3] = 1
    assert torch.equal(images[0], box) and torch.equal(images[1], 1 - box)
    assert torch.allclose(targets, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


@pytest.mark.parametrize(("n_tiles", "prob"), [(3, 1.0), (2, 0.0)])
def test_odd_or_unchosen_batches_stay_unmixed(n_tiles: int, prob: float) -> None:
    images, labels = torch.rand(n_tiles, 3, PX, PX), torch.arange(n_tiles) % 2
    mixed, targets = mix(create_mixup(1.0, 1.0, prob, num_classes=2), images.clone(), labels)
    assert torch.equal(mixed, images)
    assert torch.equal(targets, F.one_hot(labels, 2).float())


def test_no_alpha_no_mixup() -> None:
    assert create_mixup(0.0, 0.0, 1.0, num_classes=2) is None


@pytest.mark.parametrize("weight", [None, [1.0, 3.0, 0.5]])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_cross_entropy_of_one_hot_targets_is_pytorchs(weight: list[float] | None, smoothing: float) -> None:
    logits, labels = torch.randn(7, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1, 0, 2])
    weight = None if weight is None else torch.tensor(weight)
    ours = soft_cross_entropy(logits, F.one_hot(labels, 3).float(), weight, smoothing)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, labels, weight=weight,
                                                        label_smoothing=smoothing).item(), rel=1e-6)


def test_soft_cross_entropy_of_a_mixed_target_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3)]])  # p = (1/4, 3/4)
    target, weight, smoothing = torch.tensor([[0.25, 0.75]]), torch.tensor([1.0, 3.0]), 0.2
    # smoothed target: 0.8 * (0.25, 0.75) + 0.1 = (0.3, 0.7); normalised by the mixed class weight 0.25 + 2.25
    expected = (0.3 * 1 * math.log(4) + 0.7 * 3 * math.log(4 / 3)) / 2.5
    assert soft_cross_entropy(logits, target, weight, smoothing).item() == pytest.approx(expected, rel=1e-6)


def test_training_with_mixup_and_cutmix_takes_an_odd_last_batch() -> None:
    images = torch.randn(7, 3, 32, 32)  # batches of 4 and 3 (BatchNorm on 1 x 1 maps needs 2 tiles)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 0, 1, 1, 0, 1])), batch_size=4)
    model = TileClassifier(["neg", "pos"], tile_size=32, resolution="10x", img_size=32,
                           model_name="efficientformer_tiny", mixup_alpha=0.4, cutmix_alpha=1.0,
                           class_weights=[1.0, 2.0], label_smoothing=0.1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
