"""Files appear only when complete: every writer in ``pathology`` goes through :func:`atomic_path`."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path"]

_UMASK = os.umask(0)  # read once (setting it is the only way to read it), then restored
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file; mkstemp's own is 0600


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` and renames it into place only on success.

    A crash therefore never leaves a half-written file where a finished one is expected. The
    temporary name is unique per call, so processes writing the same file at once (DDP ranks
    making the same split file) never rename each other's half-written files. The finished file
    gets the permissions a plainly created one would (the umask's), not the temporary file's 0600,
    so colleagues sharing a results folder can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
