"""The LightningModule of a tile classifier: an EfficientFormer, its loss, optimiser and metrics.

It holds no paths, batch sizes or files (those belong to the DataModule). Its checkpoint carries
:class:`pathology.checkpoint.ModelSpec` under ``SPEC_KEY`` and only plain-typed hyper-parameters,
so inference reads it with ``torch.load(weights_only=True)``. With ``ema_decay``, validation, testing
and the checkpoint's ``model.*`` weights are the EMA (:mod:`pathology.training.ema`).
"""
from __future__ import annotations

import math
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, OpenUnitInterval
from torch import nn

from pathology.checkpoint import SPEC_KEY, ModelSpec
from pathology.models import create_model
from pathology.models.mhsa import MhsaBlocks
from pathology.models.tta import tta_probabilities
from pathology.stain import StainReference
from pathology.training.ema import create_ema, state_for_checkpoint, state_from_checkpoint
from pathology.training.metrics import classification_metrics
from pathology.training.mixup import create_mixup, mix, soft_cross_entropy
from wsi_tiling import Resolution

__all__ = ["TileClassifier", "NonFiniteLossError", "warmup_cosine"]

HEAD_PREFIX = "head"  # timm names the classifier heads head / head_dist
EMA_PREFIX = "ema.module."  # where the state_dict holds the EMA copy (attribute ema, timm's ModelEmaV3.module)
PROB_FLOOR = 1e-12  # keeps log(probability) finite in the loss of TTA-averaged probabilities


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stops before any checkpoint is written."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TileClassifier(L.LightningModule):
    """Cross-entropy fine-tuning of an EfficientFormer on labelled tiles, with epoch-level metrics."""

    def __init__(
        self,
        class_names: list[str],
        tile_size: int,
        resolution: str,
        model_name: str = "efficientformer_l1",
        mhsa_blocks: MhsaBlocks | None = None,
        act_layer: str = "gelu",
        img_size: int = 224,
        pretrained: str | None = None,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-5,
        lr: float = 1e-3,
        backbone_lr_scale: float = 1.0,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        balanced_loss: bool = False,
        ema_decay: OpenUnitInterval | None = None,
        ema_warmup: bool = True,
        mixup_alpha: NonNegativeFloat = 0.0,
        cutmix_alpha: NonNegativeFloat = 0.0,
        mixup_prob: ClosedUnitInterval = 1.0,
        tta: bool = False,
        decision_rule: Literal["argmax", "youden"] = "argmax",
    ) -> None:
        """Args:
            class_names: class names in logit order (linked from the data).
            tile_size: tile edge in pixels as cut (linked from the data; recorded for inference).
            resolution: what tiles were cut at, ``"10x"`` or ``"0.50mpp"`` (linked from the data).
            model_name: a registered EfficientFormer variant.
            mhsa_blocks: {output stride: MHSA blocks} (``"16:2,32:1"`` or a mapping in YAML); None keeps the
                variant's default.
            act_layer: the blocks' MLP activation, a timm name (``gelu``, ``relu``, ``hard_swish``, ...).
            img_size: model input edge in pixels (a multiple of 32).
            pretrained: weights file (or hub name) for the backbone; None trains from scratch.
            drop_path_rate: stochastic depth rate.
            layer_scale_init_value: initial LayerScale of every block (timm's 1e-5 suits fine-tuning
                pretrained weights; from scratch on few tiles, 1.0 lets the blocks learn within
                hundreds of steps instead of starting as near-identities).
            lr: peak AdamW learning rate of the head.
            backbone_lr_scale: backbone learning rate as a fraction of ``lr``; 0 freezes the backbone.
            weight_decay: AdamW weight decay of weight matrices (not of biases and norms).
            warmup_fraction: share of all training steps spent warming the learning rate up.
            label_smoothing: cross-entropy label smoothing.
            class_weights: per-class loss weights; None for equal weights.
            balanced_loss: weight the loss by inverse class frequency of the training split instead.
            ema_decay: keep an exponential moving average of the weights with this decay per optimiser
                step (e.g. 0.999), used for validation, testing and the saved weights; None for none.
            ema_warmup: raise the EMA decay from 0 as ``1 - (1 + step)^-3/4`` until it reaches ``ema_decay``.
            mixup_alpha: Mixup of training batches with blend weight ~ Beta(alpha, alpha); 0 for none.
            cutmix_alpha: CutMix of training batches with kept area ~ Beta(alpha, alpha); 0 for none (with
                both on, each batch gets one of them at even odds).
            mixup_prob: probability that a training batch is mixed when Mixup or CutMix is on.
            tta: validate and test on the softmax averaged over the 8 dihedral views of each tile
                (:mod:`pathology.models.tta`; 8 times the evaluation compute); recorded in the
                checkpoint, so ``predict-tiles`` and ``infer`` predict the same way by default.
            decision_rule: two classes only: ``argmax``, or ``youden``: after training, the best
                checkpoint predicts the validation patients and the threshold on class 1's
                probability maximising sensitivity + specificity − 1 there is stored in it
                (``ModelSpec.decision_threshold``) and used for the test metrics (see
                :func:`pathology.training.fit.fit`).

        Raises:
            ValueError: ``decision_rule`` other than argmax for other than two classes.
        """
        if decision_rule != "argmax" and len(class_names) != 2:
            raise ValueError(f"model.decision_rule {decision_rule!r} needs two classes, not {class_names}")
        super().__init__()
        blocks = None if mhsa_blocks is None else MhsaBlocks.parse(mhsa_blocks)
        mhsa_blocks = None if blocks is None else str(blocks)  # hparams hold plain types: weights_only loads them
        ema_decay = None if ema_decay is None else float(ema_decay)  # not jsonargparse's float subclasses
        mixup_alpha, cutmix_alpha, mixup_prob = float(mixup_alpha), float(cutmix_alpha), float(mixup_prob)
        self.save_hyperparameters()
        self.resolution = Resolution.parse(resolution)
        self.model = create_model(model_name, mhsa_blocks=blocks, num_classes=len(class_names),
                                  img_size=img_size, pretrained=pretrained, act_layer=act_layer,
                                  drop_path_rate=drop_path_rate,
                                  layer_scale_init_value=layer_scale_init_value)
        weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("loss_weights", weights, persistent=False)
        self.ema = None if ema_decay is None else create_ema(self.model, ema_decay, ema_warmup)
        self._ema_step = 0  # the optimiser step the EMA last followed
        self.mixup = create_mixup(mixup_alpha, cutmix_alpha, mixup_prob, len(class_names))
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tile_mpp: float | None = None  # delivered µm/px of the training tiles (from the data, in setup)
        self.tile_mpp_spread: float | None = None
        self.stain_reference: StainReference | None = None  # the data's, when it normalises stains (in setup)
        self.decision_threshold: float | None = None  # chosen on validation after fitting; used by test metrics
        self.last_predictions: tuple[np.ndarray, np.ndarray] | None = None  # (labels, probs) of the last eval epoch

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the model expects for RGB in [0, 1] (linked to the data's ``normalization``)."""
        cfg = self.model.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])

    @property
    def spec(self) -> ModelSpec:
        """What inference needs to rebuild this model and feed it tiles as in training."""
        hp = self.hparams
        mean, std = self.normalization
        return ModelSpec(hp.model_name, self.model.mhsa_blocks, tuple(hp.class_names), hp.img_size,
                         hp.tile_size, self.resolution, mean, std, tile_mpp=self.tile_mpp,
                         tile_mpp_spread=self.tile_mpp_spread, act_layer=hp.act_layer, tta=hp.tta,
                         decision_threshold=self.decision_threshold, stain_reference=self.stain_reference)

    def setup(self, stage: str) -> None:
        """Records the delivered µm/px of the data's tile stores (when it knows them) and its stain
        reference (when it normalises stains), and sets inverse-frequency loss weights from the
        training split when ``balanced_loss``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        tiling = getattr(datamodule, "tiling", None)
        if stage == "fit" and tiling is not None:
            self.tile_mpp, self.tile_mpp_spread = float(tiling["mpp"]), float(tiling.get("mpp_spread", 0.0))
        if stage == "fit" and datamodule is not None:
            self.stain_reference = getattr(datamodule, "stain_reference", None)
        if stage == "fit" and self.hparams.balanced_loss and datamodule is not None:
            counts = np.maximum(datamodule.class_counts("train"), 1).astype(np.float32)
            self.loss_weights = torch.from_numpy(counts.sum() / (len(counts) * counts)).to(self.device)

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation, testing and the checkpoint's ``model.*`` hold: the EMA when kept."""
        return self.model if self.ema is None else self.ema.module
    def on_fit_start(self) -> None:
        """Forgets a decision threshold restored from a resumed checkpoint: it was chosen for other weights."""
        self.decision_threshold = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, weight=self.loss_weights, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.mixup is None:
            loss = self._loss(self(images), labels)
        else:
            images, targets = mix(self.mixup, images, labels)
            loss = soft_cross_entropy(self(images), targets, self.loss_weights, self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss.item()} at step {self.global_step} (epoch "
                                     f"{self.current_epoch}); lower the learning rate or check the tiles")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def on_train_start(self) -> None:
        self._ema_step = self.global_step  # a resumed run continues from its checkpoint's step

    def on_train_batch_end(self, outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor],
                           batch_idx: int) -> None:
        """Moves the EMA towards the weights once per optimiser step (not per batch when gradients accumulate)."""
        if self.ema is not None and self.global_step > self._ema_step:
            self.ema.update(self.model, step=self.global_step)
            self._ema_step = self.global_step

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        """Logs the loss and keeps the probabilities; with ``tta`` both are of the view-averaged
        softmax (the loss of ``log p`` as logits is the loss of the averaged distribution ``p``)."""
        images, labels = batch
        if self.hparams.tta:
            probs = tta_probabilities(self.eval_model, images)
            logits = probs.clamp_min(PROB_FLOOR).log()
        else:
            logits = self.eval_model(images)
            probs = logits.float().softmax(dim=1)
        self.log(f"{stage}/loss", self._loss(logits, labels), on_epoch=True, sync_dist=True, batch_size=len(labels))
        self._outputs.append((probs.detach(), labels.detach()))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        """Gathers every process's predictions and logs scikit-learn metrics of the whole epoch.

        Validation metrics are of argmax; test metrics are at the stored decision threshold when
        there is one. The predictions stay in :attr:`last_predictions`.
        """
        if not self._outputs:
            return
        probs = torch.cat([p for p, _ in self._outputs])
        labels = torch.cat([y for _, y in self._outputs])
        self._outputs.clear()
        if self.trainer.world_size > 1:
            probs = self.all_gather(probs).reshape(-1, probs.shape[1])
            labels = self.all_gather(labels).reshape(-1)
        self.last_predictions = (labels.cpu().numpy(), probs.float().cpu().numpy())
        threshold = self.decision_threshold if stage == "test" else None
        metrics = classification_metrics(*self.last_predictions, threshold=threshold)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _param_groups(self) -> list[dict]:
        """AdamW groups: backbone at ``lr * backbone_lr_scale`` (frozen at 0) and head at ``lr``;
        weight decay on matrices only."""
        hp = self.hparams
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            is_head = name.startswith(HEAD_PREFIX)
            if not is_head and hp.backbone_lr_scale == 0:
                param.requires_grad_(False)
                continue
            groups.setdefault((is_head, param.ndim > 1), []).append(param)
        return [{"params": params, "lr": hp.lr * (1.0 if is_head else hp.backbone_lr_scale),
                 "weight_decay": hp.weight_decay if decay else 0.0}
                for (is_head, decay), params in groups.items()]

    def _lr_factor(self, step: int) -> float:
        """Warm-up and cosine over the trainer's current total of steps (read each step, so a
        re-planned ``max_epochs``, e.g. by :class:`~pathology.training.budget.TimeBudget`, is followed)."""
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):  # no epoch or step limit (e.g. only max_time): constant rate, no warm-up or decay
            return 1.0
        total = max(1, int(total))
        return warmup_cosine(step, max(1, round(self.hparams.warmup_fraction * total)), total)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self._param_groups())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Adds the spec; with EMA, the EMA weights go under ``model.*`` and the raw ones under ``raw_model.*``."""
        checkpoint[SPEC_KEY] = self.spec.to_dict()
        if self.ema is not None:
            checkpoint["state_dict"] = state_for_checkpoint(checkpoint["state_dict"], EMA_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restores the training tiles' µm/px, the stain reference and the decision threshold,
        which are data, not hyper-parameters, and puts the raw and EMA weights where this module
        keeps them (Lightning loads the ``state_dict`` after this hook)."""
        spec = checkpoint.get(SPEC_KEY, {})
        self.tile_mpp, self.tile_mpp_spread = spec.get("tile_mpp"), spec.get("tile_mpp_spread")
        self.decision_threshold = spec.get("decision_threshold")
        stain = spec.get("stain_reference")
        self.stain_reference = None if stain is None else StainReference.from_dict(stain)
        checkpoint["state_dict"] = state_from_checkpoint(checkpoint["state_dict"],
                                                       None if self.ema is None else EMA_PREFIX)
