"""Every notebook runs top to bottom on its fast preset (as CI runs it), and is committed without outputs.

Notebooks read ``GOLORE_LAB_PRESET`` (set to ``fast`` here) and ``GOLORE_LAB_FIGURES`` (a temporary copy of the
committed run cache, so the repository is never written to).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{path.name} is committed with outputs"
    runs = ROOT / "figures" / "data" / "runs"
    if runs.exists():
        shutil.copytree(runs, tmp_path / "figures" / "data" / "runs")
    monkeypatch.setenv("GOLORE_LAB_PRESET", "fast")
    monkeypatch.setenv("GOLORE_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel imports this checkout's golore_lab, not whichever one the environment has installed (a git
    # worktree shares the venv of the main checkout, whose editable install points there)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
