"""EMA weights: updated once per optimiser step, used for validation and testing, saved under ``model.*``
for inference, raw weights restored on resume, and checkpoints without EMA still loading."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from pathology.checkpoint import load_checkpoint, load_inference_model
from pathology.training import TileClassifier
from pathology.training.ema import RAW_PREFIX, state_for_checkpoint, state_from_checkpoint

IMG_PX = 32
DECAY = 0.5  # large steps, so that the average differs visibly from the last weights
BATCH, ACCUMULATE = 2, 2  # 4 batches of 2 tiles per epoch: 2 optimiser steps
NEW_HPARAMS = ("ema_decay", "ema_warmup", "mixup_alpha", "cutmix_alpha", "mixup_prob")


def _classifier(**kwargs) -> TileClassifier:
    return TileClassifier(["neg", "pos"], tile_size=IMG_PX, resolution="10x", img_size=IMG_PX,
                          model_name="efficientformer_tiny", lr=0.01, warmup_fraction=0.0, **kwargs)


def _loader(n: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMG_PX, IMG_PX, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(n) % 2), batch_size=BATCH)


def _floats(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The floating-point entries under ``prefix``, without it (integer counters are copied, not averaged)."""
    return {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix) and v.is_floating_point()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[key], b[key]) for key in a)


class _RawWeightsPerStep(Callback):
    """The raw weights when training starts and right after each optimiser step (before the next batch's
    forward pass moves the BatchNorm statistics)."""

    def __init__(self) -> None:
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: L.Trainer, module: TileClassifier) -> None:
        self.at_step[trainer.global_step] = _floats(module.model.state_dict())

    def on_train_batch_end(self, trainer: L.Trainer, module: TileClassifier, *args) -> None:
        if trainer.global_step not in self.at_step:
            self.at_step[trainer.global_step] = _floats(module.model.state_dict())


def _trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accumulate_grad_batches=ACCUMULATE, **kwargs)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TileClassifier, L.Trainer, _RawWeightsPerStep, Path]:
    """One epoch of 2 optimiser steps with EMA (decay 0.5, no warm-up), validated on 4 tiles; its last.ckpt."""
    root = tmp_path_factory.mktemp("ema")
    model, record = _classifier(ema_decay=DECAY, ema_warmup=False), _RawWeightsPerStep()
    trainer = _trainer(root, max_epochs=1, callbacks=[record, ModelCheckpoint(dirpath=root, save_last=True)])
    trainer.fit(model, train_dataloaders=_loader(8, seed=0), val_dataloaders=_loader(4, seed=1))
    return model, trainer, record, root / "last.ckpt"


def test_ema_follows_each_optimiser_step_by_hand(ema_run) -> None:
    model, trainer, record, _ = ema_run
    assert trainer.global_step == 2 and sorted(record.at_step) == [0, 1, 2]
    # timm: the first update copies the weights, later ones keep DECAY of the average
    expected = {k: DECAY * record.at_step[1][k] + (1 - DECAY) * record.at_step[2][k] for k in record.at_step[2]}
    _assert_equal(_floats(model.ema.module.state_dict()), expected)
    assert _differ(_floats(model.ema.module.state_dict()), _floats(model.model.state_dict()))


def test_checkpoint_holds_ema_under_model_and_raw_under_raw_model(ema_run) -> None:
    model, _, _, last = ema_run
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("ema.") for k in state)
    _assert_equal(_floats(state, "model."), _floats(model.ema.module.state_dict()))
    _assert_equal(_floats(state, RAW_PREFIX), _floats(model.model.state_dict()))
    weights, _ = load_checkpoint(last)  # what predict-tiles, infer and export read
    _assert_equal(_floats(weights), _floats(model.ema.module.state_dict()))
    assert _differ(_floats(weights), _floats(model.model.state_dict()))


def test_validation_and_test_use_the_ema_weights(ema_run) -> None:
    model, trainer, _, last = ema_run
    batches = list(_loader(4, seed=1))
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    saved, _ = load_inference_model(last)
    raw = _classifier().model.eval()
    raw.load_state_dict(model.model.state_dict())
    with torch.no_grad():
        ema_loss, raw_loss = F.cross_entropy(saved(images), labels), F.cross_entropy(raw(images), labels)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(ema_loss.item(), rel=1e-5)
    assert raw_loss.item() != pytest.approx(ema_loss.item(), rel=1e-3)
    fresh = _classifier(ema_decay=DECAY, ema_warmup=False)  # as fit() tests the best checkpoint
    (results,) = _trainer(last.parent).test(fresh, dataloaders=_loader(4, seed=1), ckpt_path=str(last), verbose=False)
    assert results["test/loss"] == pytest.approx(ema_loss.item(), rel=1e-5)


def test_resuming_trains_the_raw_weights_and_continues_the_average(ema_run, tmp_path: Path) -> None:
    _, _, _, last = ema_run
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    model, record = _classifier(ema_decay=DECAY, ema_warmup=False), _RawWeightsPerStep()
    _trainer(tmp_path, max_steps=3, limit_val_batches=0, enable_checkpointing=False, callbacks=[record]).fit(
        model, train_dataloaders=_loader(8, seed=0), ckpt_path=str(last))
    _assert_equal(record.at_step[2], _floats(saved, RAW_PREFIX))  # training went on from the raw weights
    expected = {k: DECAY * v + (1 - DECAY) * record.at_step[3][k] for k, v in _floats(saved, "model.").items()}
    _assert_equal(_floats(model.ema.module.state_dict()), expected)


def test_checkpoint_without_ema_loads_with_and_without_ema(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = _classifier()
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(old, train_dataloaders=_loader(4, seed=0))
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    payload = torch.load(tmp_path / "old.ckpt", weights_only=True)
    for key in NEW_HPARAMS:  # as written before these options existed
        del payload["hyper_parameters"][key]
    torch.save(payload, tmp_path / "old.ckpt")
    weights = _floats(old.model.state_dict())
    plain = TileClassifier.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert plain.ema is None
    _assert_equal(_floats(plain.model.state_dict()), weights)
    with caplog.at_level(logging.WARNING):
        averaged = TileClassifier.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", ema_decay=0.9)
    _assert_equal(_floats(averaged.model.state_dict()), weights)
    _assert_equal(_floats(averaged.ema.module.state_dict()), weights)
    assert "no EMA weights" in caplog.text


def test_checkpoint_layout_round_trip_by_hand() -> None:
    raw, avg, other = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])
    module_state = {"model.w": raw, "ema.module.w": avg, "loss_weights": other}
    saved = state_for_checkpoint(module_state, "ema.module.")
    assert saved == {"model.w": avg, "raw_model.w": raw, "loss_weights": other}
    assert state_from_checkpoint(saved, "ema.module.") == module_state
    assert state_from_checkpoint(saved, None) == {"model.w": raw, "loss_weights": other}  # EMA turned off: raw
