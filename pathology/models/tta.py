"""Test-time augmentation: a tile classifier's outputs averaged over the 8 dihedral views of each tile.

A tissue tile has no up, down, left or right, so the 4 rotations by 90° and the horizontal flip of
each (the dihedral group of the square) are equally valid pictures of it. Averaging the softmax
probabilities over them removes the orientation a single forward pass happens to see, for 8 times
the compute. Training (``model.tta``), ``pathology predict-tiles --tta`` and ``pathology infer
--tta`` all average through :func:`mean_over_views`, so they compute the same function.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["N_VIEWS", "dihedral_views", "mean_over_views", "tta_probabilities"]

N_VIEWS = 8
SPATIAL_DIMS = (-2, -1)  # (H, W) of a (B, C, H, W) batch
WIDTH_DIM = -1


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral views of a batch: rotations by 0, 90, 180 and 270° (counter-clockwise), then
    the horizontal flip (of the width axis) of each.

    Args:
        images: (B, C, H, W) square tiles.

    Returns:
        8 tensors shaped like ``images``; the first is ``images`` itself.

    Raises:
        ValueError: tiles that are not square (a 90° rotation would change their shape).
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"dihedral views need (B, C, H, W) square tiles, got {tuple(images.shape)}")
    rotations = [torch.rot90(images, k, dims=SPATIAL_DIMS) for k in range(4)]
    return rotations + [torch.flip(view, dims=(WIDTH_DIM,)) for view in rotations]


def mean_over_views(forward: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                    images: torch.Tensor) -> list[torch.Tensor]:
    """Each output of ``forward`` averaged over the 8 dihedral views of ``images``.

    ``forward`` sees one view at a time (a batch of the caller's size), so peak memory is that of
    one forward pass.

    Args:
        forward: maps a (B, C, H, W) batch to per-tile outputs, each (B, ...) (probabilities,
            embeddings); outputs are averaged in float32.
        images: (B, C, H, W) square tiles.

    Returns:
        One (B, ...) float32 mean per output of ``forward``.
    """
    totals: list[torch.Tensor] = []
    for view in dihedral_views(images):
        outputs = [output.float() for output in forward(view)]
        totals = outputs if not totals else [total + output for total, output in zip(totals, outputs)]
    return [total / N_VIEWS for total in totals]


def tta_probabilities(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """(B, classes) softmax probabilities averaged over the 8 dihedral views of ``images`` (B, C, H, W)."""
    return mean_over_views(lambda view: [classifier(view).float().softmax(dim=1)], images)[0]
