"""The resolution-study notebook runs top to bottom on the tiny study's folder, so it cannot rot."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "resolution_study.ipynb"
TIMEOUT_S = 180


def test_notebook_executes_on_a_study_folder(study_copy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs, slides_csv, out, results = study_copy
    monkeypatch.setenv("STUDY_DIR", str(out))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/markdown", ""))
                     for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    n_ok = int((results["status"] == "ok").sum())
    assert f"{len(results)} cells, {n_ok} finished" in text
    assert "| chromatin | 2.5x, MHSA 32:1 |" in text  # the findings table names the study's only grid point
    assert (out / "notebook_figures" / "pareto.png").stat().st_size > 0
