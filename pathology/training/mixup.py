"""Mixup and CutMix of training batches (timm's ``Mixup``), and the class-weighted loss of their soft targets.

Mixup blends two tiles and their labels; CutMix pastes a box of one tile into another and mixes the
labels by area. Both pair each tile with the batch reversed, so timm needs an even batch; an odd one
(the last of a small set) trains unmixed. Label smoothing is applied once, by
:func:`soft_cross_entropy`, not by timm: class-weighted cross-entropy normalises by the weight of each
tile's (mixed) class, which smoothed targets no longer show.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup

__all__ = ["create_mixup", "mix", "soft_cross_entropy"]


def create_mixup(mixup_alpha: float, cutmix_alpha: float, prob: float, num_classes: int) -> Mixup | None:
    """timm's batch-wise Mixup/CutMix; None when both alphas are 0.

    Args:
        mixup_alpha: Beta(alpha, alpha) of the Mixup blend weight; 0 turns Mixup off.
        cutmix_alpha: Beta(alpha, alpha) of the CutMix kept area; 0 turns CutMix off. With both on,
            each batch gets one of the two, at even odds.
        prob: probability that a batch is mixed at all.
    """
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, label_smoothing=0.0,
                 num_classes=num_classes)


def mix(mixup: Mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixes a batch in place; an odd batch is left as it is.

    Args:
        images: (N, C, H, W) model inputs.
        labels: (N,) class indices.

    Returns:
        (images, targets): targets (N, classes) are class probabilities summing to 1 per tile, unsmoothed.
    """
    if len(labels) % 2:
        return images, F.one_hot(labels, mixup.num_classes).to(images.dtype)
    return mixup(images, labels)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                       label_smoothing: float = 0.0) -> torch.Tensor:
    """Class-weighted cross-entropy of class-probability targets; equals ``F.cross_entropy(logits, labels,
    weight, label_smoothing=...)`` when ``targets`` are the one-hot ``labels``.

    Each tile's targets are smoothed towards uniform, ``(1 - s) t + s / classes``, and its loss
    ``-sum_c w_c t'_c log p_c`` is averaged over the batch weighted by its unsmoothed class weight
    ``sum_c w_c t_c`` (for a one-hot target, the weight of its class, as PyTorch normalises).

    Args:
        logits: (N, classes).
        targets: (N, classes) unsmoothed class probabilities (one-hot or mixed).
        weight: (classes,) class weights; None weighs every class 1.
        label_smoothing: ``s`` above, in [0, 1].
    """
    num_classes = logits.shape[1]
    weight = torch.ones(num_classes, dtype=logits.dtype, device=logits.device) if weight is None else weight
    smoothed = targets * (1 - label_smoothing) + label_smoothing / num_classes
    losses = -(smoothed * weight * logits.log_softmax(dim=1)).sum(dim=1)
    return losses.sum() / (targets * weight).sum()
