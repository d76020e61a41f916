"""Several classifiers of one architecture as one model: the fold models of cross-validation.

:class:`Ensemble` keeps timm's ``forward_features`` / ``forward_head(pre_logits=...)`` split, so
everything that runs a single model (the runners, ONNX export, ``predict-tiles``, ``infer``) runs
an ensemble unchanged: its logits are the log of the members' mean softmax (so a softmax of them
gives the mean probability) and its embeddings are the members' mean embedding.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Ensemble"]

MEMBER_DIM = 0  # features are stacked along a new first dimension, one slice per member


class Ensemble(nn.Module):
    """The mean prediction of ``members`` (same input size, classes and embedding width).

    Attributes:
        members: the models, each with ``forward_features`` and ``forward_head``.
        img_size: the members' input ``(H, W)`` in px.
        num_classes: the members' number of classes.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        """Raises:
            ValueError: no members, or members built for other input sizes or classes.
        """
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if len({(tuple(m.img_size), m.num_classes) for m in members}) > 1:
            raise ValueError("ensemble members differ in input size or number of classes")
        self.members = nn.ModuleList(members)
        self.img_size, self.num_classes = tuple(members[0].img_size), members[0].num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images -> ``(K, B, ...)`` every member's features, stacked."""
        return torch.stack([member.forward_features(x) for member in self.members], dim=MEMBER_DIM)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The members' mean embedding ``(B, D)`` if ``pre_logits``, else ``log(mean softmax)`` ``(B, classes)``."""
        if pre_logits:
            return torch.stack([m.forward_head(f, pre_logits=True) for m, f in zip(self.members, x)]).mean(MEMBER_DIM)
        log_probs = torch.stack([m.forward_head(f).log_softmax(dim=1) for m, f in zip(self.members, x)])
        return torch.logsumexp(log_probs, dim=MEMBER_DIM) - math.log(len(self.members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` whose softmax is the members' mean probability."""
        return self.forward_head(self.forward_features(x))
