"""Every notebook runs top to bottom at the fast preset from the committed caches (as CI runs it) and takes
its results from the artefacts (one preset switch, no producer of its own).

The kernel gets ``GOLORE_LAB_PRESET=fast``, ``GOLORE_LAB_FIGURES`` = a temporary copy of the committed caches
(the repository is never written to) and ``GOLORE_LAB_CACHE`` = an empty folder: a notebook that needed the
corpus or the fine-tuning data would have to fetch them, and the test fails (no notebook may).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code(path: Path) -> str:
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_uses_the_artefacts_and_one_preset_switch(path):
    code = _code(path)
    assert "PRESET = artefacts.env_preset()" in code
    assert not re.search(r"PRESET\s*=\s*['\"]|PAPER_LENGTH|\bSEEDS\b|\bTRIALS\b|golore_lab\.experiments|"
                         r"finetune_experiments|lm\.experiment\b|load_splits|ensure_corpus", code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)  # committed executed; executing replaces the outputs
    shutil.copytree(ROOT / "figures" / "data" / "runs", tmp_path / "figures" / "data" / "runs")
    (tmp_path / "data-cache").mkdir()
    monkeypatch.setenv("GOLORE_LAB_PRESET", "fast")
    monkeypatch.setenv("GOLORE_LAB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("GOLORE_LAB_CACHE", str(tmp_path / "data-cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the kernel imports this checkout's golore_lab, not whichever one the environment has installed (a git
    # worktree shares the venv of the main checkout, whose editable install points there)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()
    runs = tmp_path / "figures" / "data" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(p.name for p in (ROOT / "figures/data/runs").iterdir()), \
        "a notebook recomputed a result instead of reading the committed cache"
    assert not any((tmp_path / "data-cache").iterdir()), "a notebook fetched or prepared data"
