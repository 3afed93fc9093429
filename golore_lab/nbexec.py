"""``python -m golore_lab notebooks``: execute the notebooks in place, so that a reader on the web sees the figures.

The notebooks are committed *executed* at the ``default`` preset. Each executed notebook records, in its metadata
under ``golore_lab``, the sha256 of its code cells (and the package version and preset it ran with);
``--check`` (and ``tests/test_notebook_outputs.py``) fails when a code cell was edited after the last execution,
so committed outputs cannot silently go stale. Execution keeps the outputs deterministic: no timing metadata,
no progress-bar (stderr) streams, execution counts 1, 2, 3, ...

    python -m golore_lab notebooks                 # execute every notebook in notebooks/ (default preset)
    python -m golore_lab notebooks 01_counterexample --preset fast
    python -m golore_lab notebooks --check         # are the committed outputs current?
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from .fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
PRESETS = ("fast", "default", "full")


def code_sha256_of(notebook) -> str:
    """sha256 of the notebook's code cells (their sources, in order) and the package version."""
    from . import __version__

    checksum = hashlib.sha256(f"golore_lab {__version__}\0".encode())
    for cell in notebook.cells:
        if cell.cell_type == "code":
            checksum.update(cell.source.encode("utf-8") + b"\0")
    return checksum.hexdigest()


def problems(notebook, name: str) -> list[str]:
    """Why a committed notebook is not current (empty list: it is)."""
    found = []
    if notebook.metadata.get("kernelspec", {}).get("name") != KERNELSPEC["name"]:
        found.append(f"{name}: no python3 kernelspec")
    stamp = notebook.metadata.get("golore_lab", {})
    if not stamp:
        found.append(f"{name}: never executed by `make notebooks`")
    elif stamp.get("code_sha256") != code_sha256_of(notebook):
        found.append(f"{name}: code cells changed since the outputs were made (run `make notebooks`)")
    unexecuted = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
                  and cell.source.strip() and cell.get("execution_count") is None]
    if stamp and unexecuted:
        found.append(f"{name}: code cells {unexecuted} have no outputs")
    return found


def _clean(notebook) -> None:
    count = 0
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        cell.outputs = [out for out in cell.outputs
                        if not (out.get("output_type") == "stream" and out.get("name") == "stderr")]
        for out in cell.outputs:
            if "execution_count" in out:
                out["execution_count"] = count


def execute(path: Path, preset: str = "default", timeout: int = 3600) -> None:
    """Execute ``path`` top to bottom with ``GOLORE_LAB_PRESET=preset`` and write it back with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    env = {"GOLORE_LAB_PRESET": preset, "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _clean(notebook)
    from . import __version__

    notebook.metadata["golore_lab"] = {"code_sha256": code_sha256_of(notebook), "preset": preset,
                                       "version": __version__}
    atomic_write_text(path, nbformat.writes(notebook) + "\n")


def _select(names: list[str]) -> list[Path]:
    every = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not names:
        return every
    chosen = []
    for name in names:
        matches = [p for p in every if p.stem == name or p.name == name or p.stem.startswith(name + "_")]
        if not matches:
            raise SystemExit(f"error: no notebook named {name!r} in {NOTEBOOK_DIR} "
                             f"(have: {', '.join(p.stem for p in every)})")
        chosen += matches
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m golore_lab notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (stem or number prefix; default: all)")
    parser.add_argument("--preset", default="default", choices=PRESETS, help="size of the runs (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only check that the committed outputs are current")
    args = parser.parse_args(argv)
    paths = _select(args.names)
    if args.check:
        import nbformat

        found = [text for p in paths for text in problems(nbformat.read(p, as_version=4), p.name)]
        for text in found:
            print(text, file=sys.stderr)
        return 1 if found else 0
    for path in paths:
        start = time.perf_counter()
        execute(path, args.preset)
        print(f"{path.relative_to(ROOT)}: executed at preset {args.preset} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
