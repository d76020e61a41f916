"""``wsi_tiling`` stays light: importing it and every submodule never loads torch."""
from __future__ import annotations

import subprocess
import sys

IMPORT_ALL = """
import importlib, pkgutil, sys
import wsi_tiling
names = [m.name for m in pkgutil.walk_packages(wsi_tiling.__path__, "wsi_tiling.")]
for name in names:
    importlib.import_module(name)
assert len(names) >= 10, names
print("torch" in sys.modules, len(names))
"""


def test_no_submodule_imports_torch() -> None:
    """A fresh interpreter: this test session has torch loaded already."""
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, check=True)
    loaded, count = done.stdout.split()
    assert loaded == "False", f"torch was imported by one of {count} wsi_tiling modules"
