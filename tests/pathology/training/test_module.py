"""The LightningModule's numerics: metrics, schedule, backbone learning rate, and the NaN guard."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from pathology.training import NonFiniteLossError, TileClassifier, TimeBudget, classification_metrics, warmup_cosine

IMG_PX = 32


def _classifier(**kwargs) -> TileClassifier:
    return TileClassifier(["neg", "pos"], tile_size=IMG_PX, resolution="10x", img_size=IMG_PX, **kwargs)


def test_binary_metrics_by_hand() -> None:
    labels = np.array([0, 0, 1, 1])
    p_pos = np.array([0.1, 0.8, 0.7, 0.9])  # argmax predictions: 0, 1, 1, 1
    m = classification_metrics(labels, np.stack([1 - p_pos, p_pos], axis=1))
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # precision 2/3, recall 1
    assert m["auroc"] == pytest.approx(3 / 4)  # of the 4 (positive, negative) pairs, 0.7 < 0.8 is misordered
    assert (m["cm_0_0"], m["cm_0_1"], m["cm_1_0"], m["cm_1_1"]) == (1, 1, 0, 2)


def test_multiclass_metrics_by_hand() -> None:
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 2]] * 0.7 + 0.1  # argmax predictions: 0, 1, 1, 2
    m = classification_metrics(labels, probs)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # class 1: P 1/2, R 1; class 2: P 1, R 1/2


def test_one_class_epoch_has_undefined_auroc() -> None:
    assert np.isnan(classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))["auroc"])


def test_warmup_then_cosine_by_hand() -> None:
    factors = [warmup_cosine(step, warmup_steps=4, total_steps=12) for step in (0, 3, 4, 8, 12)]
    assert factors == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0])


def test_backbone_learning_rate_scale_and_freezing() -> None:
    groups = _classifier(lr=1e-3, backbone_lr_scale=0.1)._param_groups()
    assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-4, 1e-3])
    frozen = _classifier(backbone_lr_scale=0.0)
    trained = {id(p) for g in frozen._param_groups() for p in g["params"]}
    head = {id(p) for n, p in frozen.model.named_parameters() if n.startswith("head")}
    assert trained == head
    assert all(not p.requires_grad for n, p in frozen.model.named_parameters() if not n.startswith("head"))


@pytest.mark.parametrize("value", [1e-5, 1.0])
def test_layer_scale_init_value_reaches_every_block(value: float) -> None:
    """Every pooling and MHSA block's two LayerScales start at the configured value."""
    model = _classifier(model_name="efficientformer_tiny", mhsa_blocks={16: 1, 32: 1},
                        layer_scale_init_value=value).model
    gammas = {name: p for name, p in model.named_parameters() if name.endswith("gamma")}
    n_blocks = sum(len(stage.blocks) for stage in model.stages)
    assert len(gammas) == 2 * n_blocks
    assert all(torch.all(p == value) for p in gammas.values())


def test_nan_loss_stops_without_touching_the_checkpoint(tmp_path: Path) -> None:
    previous = tmp_path / "last.ckpt"
    previous.write_bytes(b"the last good checkpoint")
    images = torch.full((4, 3, IMG_PX, IMG_PX), float("nan"))
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 0, 1])), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        trainer.fit(_classifier(), train_dataloaders=loader)
    assert previous.read_bytes() == b"the last good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.parametrize("planned_epochs", [1, 10])
def test_time_budget_replans_epochs_and_the_schedule_follows(planned_epochs: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock: training starts at 0 s and every epoch takes 10 s, so a 35 s budget fits 3 epochs,
    # whether the first plan was too short (1) or too long (10).
    ticks = iter(range(0, 1000, 10))
    monkeypatch.setattr("pathology.training.budget.monotonic", lambda: next(ticks))
    images = torch.randn(4, 3, IMG_PX, IMG_PX)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 0, 1])), batch_size=2)  # 2 steps per epoch
    trainer = L.Trainer(accelerator="cpu", max_epochs=planned_epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[TimeBudget(minutes=35 / 60)])
    trainer.fit(_classifier(warmup_fraction=0.0), train_dataloaders=loader)
    assert trainer.current_epoch == 3 and trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ended at step 6
