"""Files appear only when complete: every writer in ``pathology`` goes through :func:`atomic_path`."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` and renames it into place only on success.

    A crash therefore never leaves a half-written file where a finished one is expected. The
    temporary name is unique per call, so processes writing the same file at once (DDP ranks
    making the same split file) never rename each other's half-written files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
