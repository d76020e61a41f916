"""The LightningModule's numerics: metrics, schedule, backbone learning rate, and the NaN guard."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tests.conftest import SCANNER_TILE_PX, STRIPES_PERIOD_UM, write_tiff
from torch.utils.data import DataLoader, TensorDataset

from pathology.checkpoint import SPEC_KEY, ModelSpec, load_checkpoint, rewrite_spec, save_checkpoint
from pathology.data import H5Source, TileDataModule, TilingMismatchError
from pathology.training import NonFiniteLossError, TileClassifier, TimeBudget, classification_metrics, warmup_cosine
from wsi_tiling import Resolution, read_store_info, tile_slide
from wsi_tiling.synthetic import StripesPainter

IMG_PX = 32


def _classifier(**kwargs) -> TileClassifier:
    return TileClassifier(["neg", "pos"], **{"tile_size": IMG_PX, "resolution": "10x", "img_size": IMG_PX, **kwargs})


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


def _fit_one_step(h5_dir: Path, labels: dict[str, str], resolution: str, tmp_path: Path) -> ModelSpec:
    """One training step on the stores of the slides ``labels`` names; the spec of the checkpoint saved."""
    slide_ids = list(labels)
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": slide_ids, "patient_id": slide_ids, "label": list(labels.values())}).to_csv(csv)
    splits = tmp_path / "splits.csv"
    pd.DataFrame({"patient_id": slide_ids, "fold": 1}).to_csv(splits, index=False)  # all training (val is fold 0)
    data = TileDataModule(H5Source(h5_dir, csv), ["neg", "pos"], splits, SCANNER_TILE_PX, resolution,
                          img_size=IMG_PX, batch_size=4)
    model = TileClassifier(["neg", "pos"], tile_size=SCANNER_TILE_PX, resolution=resolution, img_size=IMG_PX,
                           model_name="efficientformer_tiny")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    return load_checkpoint(tmp_path / "model.ckpt")[1]


def test_mixed_scanner_stores_train_and_the_checkpoint_records_their_mpp(scanner_stores: Path, tmp_path: Path) -> None:
    # 1.0, 0.99, 1.0, 0.99 µm/px at "10x"
    labels = {"aperio_a": "neg", "close_a": "pos", "aperio_b": "pos", "close_b": "neg"}
    spec = _fit_one_step(scanner_stores, labels, "10x", tmp_path)
    assert spec.resolution == Resolution(10, "power")
    assert spec.tile_mpp == pytest.approx(0.995) and spec.tile_mpp_spread == pytest.approx(0.01 / 0.995)


def test_stores_of_ome_tiff_and_plain_tiff_slides_train(tmp_path: Path) -> None:
    mpp = 0.5  # level 0; tiled at 1.0 µm/px, 64-px tiles
    painter = StripesPainter(mpp, STRIPES_PERIOD_UM, ((0.0, 0.0, 600.0, 600.0),))
    image = painter(0, 0, 1280, 1280, 1)
    slides = {"ome": write_tiff(tmp_path / "ome.ome.tif", [image, image[::4, ::4]], tiled=True, ome=True,
                                metadata={"PhysicalSizeX": mpp, "PhysicalSizeY": mpp}),
              "plain": write_tiff(tmp_path / "plain.tif", [image], tiled=False, ome=False,
                                  resolution=(1e4 / mpp, 1e4 / mpp, "CENTIMETER"))}
    stores = [tile_slide(path, tmp_path / "tiles", Resolution(1.0, "mpp"), SCANNER_TILE_PX).h5_path
              for path in slides.values()]
    assert [read_store_info(path).reader for path in stores] == ["tifffile", "tifffile"]
    spec = _fit_one_step(stores[0].parent, {"ome": "neg", "plain": "pos"}, "1.00mpp", tmp_path)
    assert spec.tile_mpp == pytest.approx(1.0) and spec.tile_mpp_spread == pytest.approx(0.0)


def test_stores_beyond_the_mpp_tolerance_stop_training_naming_the_slide(scanner_stores: Path, tmp_path: Path) -> None:
    slide_ids = ["aperio_a", "aperio_b", "hamamatsu"]  # 1.0, 1.0, 0.9128 µm/px at "10x"
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": slide_ids, "patient_id": slide_ids, "label": ["neg", "pos", "pos"]}).to_csv(csv)
    data = TileDataModule(H5Source(scanner_stores, csv), ["neg", "pos"], tmp_path / "splits.csv", SCANNER_TILE_PX,
                          "10x", img_size=IMG_PX)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    with pytest.raises(TilingMismatchError, match=r"hamamatsu.*--mpp"):
        trainer.fit(_classifier(model_name="efficientformer_tiny", tile_size=SCANNER_TILE_PX), datamodule=data)


def test_checkpoint_without_tile_mpp_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = save_checkpoint(tmp_path / "old.ckpt", _classifier().model, _classifier().spec)
    payload = torch.load(path, weights_only=True)
    for key in ("tile_mpp", "tile_mpp_spread"):  # as written before the fields existed
        del payload[SPEC_KEY][key]
    torch.save(payload, path)
    with caplog.at_level(logging.WARNING):
        _, spec = load_checkpoint(path)
    assert spec.tile_mpp is None and spec.tile_mpp_spread is None
    assert "old.ckpt" in caplog.text and "µm/px" in caplog.text


def test_tta_validation_scores_the_mean_of_the_eight_views(tmp_path: Path) -> None:
    """With ``tta`` the epoch's probabilities are the views' mean softmax (written out here with
    transposes and flips) and the loss is their negative log-likelihood; the spec records it."""
    torch.manual_seed(0)
    model = _classifier(model_name="efficientformer_tiny", tta=True).eval()
    images = torch.rand(4, 3, IMG_PX, IMG_PX)
    images[:, :, :6] += 2.0  # a bright top band: the views differ
    labels = torch.tensor([0, 1, 0, 1])
    views = [torch.flip(base, dims) if dims else base for base in (images, images.transpose(2, 3))
             for dims in [(), (3,), (2,), (2, 3)]]
    with torch.no_grad():
        expected = torch.stack([model(v).softmax(dim=1) for v in views]).mean(dim=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    [results] = trainer.validate(model, DataLoader(TensorDataset(images, labels), batch_size=2), verbose=False)
    got_labels, got_probs = model.last_predictions
    np.testing.assert_array_equal(got_labels, labels.numpy())
    np.testing.assert_allclose(got_probs, expected.numpy(), atol=1e-6)
    assert results["val/loss"] == pytest.approx(-expected[torch.arange(4), labels].log().mean().item(), rel=1e-5)
    assert model.spec.tta is True and _classifier().spec.tta is False


def test_a_decision_rule_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="decision_rule 'youden' needs two classes"):
        TileClassifier(["a", "b", "c"], tile_size=IMG_PX, resolution="10x", img_size=IMG_PX, decision_rule="youden")


def test_resumed_training_drops_the_threshold_chosen_for_the_old_weights(tmp_path: Path) -> None:
    images = torch.rand(4, 3, IMG_PX, IMG_PX)
    loader = DataLoader(TensorDataset(images, torch.tensor([0, 1, 0, 1])), batch_size=2)

    def trainer(epochs: int) -> L.Trainer:
        return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])

    trainer(1).fit(_classifier(model_name="efficientformer_tiny"), train_dataloaders=loader)
    rewrite_spec(tmp_path / "last.ckpt", decision_threshold=0.3)
    resumed = tmp_path / "resumed.ckpt"
    resumed.write_bytes((tmp_path / "last.ckpt").read_bytes())
    trainer(2).fit(_classifier(model_name="efficientformer_tiny"), train_dataloaders=loader, ckpt_path=resumed)
    assert load_checkpoint(tmp_path / "last.ckpt")[1].decision_threshold is None
