"""Reading torch files safely: the one place below both checkpoints and pretrained weights.

:mod:`pathology.checkpoint` (our tile-classifier checkpoints) and :mod:`pathology.models.checkpoint`
(pretrained weights) both read torch files; this module sits below both, so neither imports the other.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "first_line", "read_torch_file"]


class CheckpointError(ValueError):
    """A file that is not a readable pathology checkpoint; the message names the file."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type name when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_torch_file(path: str | Path, what: str) -> Any:
    """Loads a torch file onto the CPU safely (``weights_only``: never unpickles code).

    Args:
        path: the file.
        what: what the file should be (``"checkpoint"``), for error messages.

    Raises:
        CheckpointError: missing, truncated or unsafe file; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a loadable {what} ({first_line(err)})") from err
