"""Reading torch files safely: the one place below both checkpoints and pretrained weights.

:mod:`pathology.checkpoint` (our tile-classifier checkpoints) and :mod:`pathology.models.checkpoint`
(pretrained weights) both read torch files; this module sits below both, so neither imports the other.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "first_line", "read_torch_file"]

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes in torch's messages


class CheckpointError(ValueError):
    """A file that is not a readable pathology checkpoint; the message names the file."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type name when the message is empty."""
    text = ANSI_ESCAPE.sub("", str(err)).strip()
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
    except pickle.UnpicklingError as err:  # torch's message advises weights_only=False: never repeat it
        raise CheckpointError(f"{path}: not a loadable {what}: it holds pickled objects other than tensors "
                              "and plain values (e.g. code), which are never unpickled") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a loadable {what} ({first_line(err)})") from err
    except (KeyError, IndexError, ValueError) as err:  # what a text file or a CSV gives
        raise CheckpointError(f"{path}: not a {what}: not a file written by torch.save") from err
