"""The committed notebooks carry outputs that are current: executed by ``make notebooks`` after their last edit.

A reader on the web sees the figures only if the notebooks are committed executed; this test fails when a code
cell was changed without re-running ``make notebooks`` (the stored hash of the code cells no longer matches).
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from golore_lab import nbexec

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_outputs_are_current(path):
    notebook = nbformat.read(path, as_version=4)
    assert nbexec.problems(notebook, path.name) == []
    assert any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "no outputs committed"


@pytest.mark.parametrize("path", NOTEBOOKS[:1], ids=[p.name for p in NOTEBOOKS[:1]])
def test_editing_a_code_cell_makes_it_stale(path):
    notebook = nbformat.read(path, as_version=4)
    code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    code.source += "\n# edited"
    assert any("changed since" in text for text in nbexec.problems(notebook, path.name))
