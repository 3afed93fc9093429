"""notebooks/04_finetuning.ipynb executes top to bottom on the fast preset, as CI runs it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_finetuning_notebook_runs(tmp_path, monkeypatch):
    runs = ROOT / "figures" / "data" / "runs"
    if runs.exists():  # the committed cache, copied so that the repository is never written to
        shutil.copytree(runs, tmp_path / "figures" / "data" / "runs")
    monkeypatch.setenv("GOLORE_LAB_PRESET", "fast")
    monkeypatch.setenv("GOLORE_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "notebooks" / "04_finetuning.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # no outputs committed
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(str(o.get("data", {}).get("text/markdown", "")) for c in notebook.cells for o in c.get("outputs", []))
    assert "GoLore@20% − GaLore" in text and "| Full params. |" in text
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images  # the loss curves were drawn
