"""Stamps: what a committed figure was drawn from, so that re-plotting unchanged inputs leaves it alone.

Agg's anti-aliasing can differ by a colour level on a few pixels between CPUs (vectorised code paths round
differently), so re-rendering the same numbers is not guaranteed to give the same PNG bytes on another machine.
A figure ``OUT/NAME.png`` therefore has a stamp ``OUT/NAME.stamp.json`` beside it recording

* ``data_sha256`` -- the sha256 of the cache CSV the figure was plotted from (the bytes its manifest certifies);
* ``code_sha256`` -- the sha256 of the plotting code: the artefact's module, every module of
  :mod:`golore_lab.artefacts` it draws on (found from its globals, transitively) and :mod:`golore_lab.plotting`
  (``code_files`` lists them);
* ``matplotlib`` -- the version that rendered it;
* ``png_sha256`` -- the sha256 of the PNG written then.

``python -m golore_lab figures`` re-renders a figure only when the stamp beside it is missing or any of these
differ (the PNG itself included: a deleted or edited PNG is redrawn), so a fresh clone on any CPU leaves the
tracked PNGs untouched, while a change of data, code or matplotlib redraws them (and rewrites the stamp).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import ModuleType

import matplotlib

#: the packages whose source counts as plotting code (numerical code is covered by the data's sha256)
PLOTTING_PACKAGES = ("golore_lab.artefacts", "golore_lab.plotting")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def stamp_path(png: Path) -> Path:
    """``NAME.stamp.json`` beside ``NAME.png``."""
    png = Path(png)
    return png.with_name(png.stem + ".stamp.json")


def _plotting_module(name: str | None) -> bool:
    return bool(name) and any(name == p or name.startswith(p + ".") for p in PLOTTING_PACKAGES) \
        and name != "golore_lab.artefacts.stamp"


def code_modules(module: ModuleType) -> list[ModuleType]:
    """``module`` and every plotting module it uses through its globals (modules, functions, classes, values
    imported from them), transitively; always :mod:`golore_lab.plotting`. Sorted by name."""
    import golore_lab.plotting

    seen: dict[str, ModuleType] = {}
    todo = [module, golore_lab.plotting]
    while todo:
        current = todo.pop()
        if current.__name__ in seen:
            continue
        seen[current.__name__] = current
        for value in vars(current).values():
            name = value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)
            if isinstance(name, str) and _plotting_module(name) and name not in seen and name in sys.modules:
                todo.append(sys.modules[name])
    return [seen[name] for name in sorted(seen)]


def _source_bytes(module: ModuleType) -> bytes:
    # text with "\n" line ends: a checkout with other line ends hashes the same
    return Path(module.__file__).read_text(encoding="utf-8").replace("\r\n", "\n").encode("utf-8")


def expected_stamp(module: ModuleType, csv: Path) -> dict:
    """The stamp a figure of ``module`` plotted from the cache file ``csv`` has now (without ``png_sha256``)."""
    modules = code_modules(module)
    code = hashlib.sha256()
    files = []
    for mod in modules:
        rel = Path(mod.__file__).resolve().relative_to(PACKAGE_ROOT.parent).as_posix()
        files.append(rel)
        code.update(rel.encode() + b"\0" + _source_bytes(mod) + b"\0")
    return {"artefact": module.NAME, "data": Path(csv).name,
            "data_sha256": hashlib.sha256(Path(csv).read_bytes()).hexdigest(),
            "code_sha256": code.hexdigest(), "code_files": files, "matplotlib": matplotlib.__version__}


def read_stamp(png: Path) -> dict | None:
    """The stamp beside ``png``, or None if there is none or it cannot be read (then the figure is redrawn)."""
    try:
        record = json.loads(stamp_path(png).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_current(png: Path, expected: dict) -> bool:
    """True when ``png`` exists, its bytes are the ones its stamp recorded, and the stamp's inputs are
    ``expected``: re-plotting would draw the same figure, so it is left as it is."""
    png = Path(png)
    record = read_stamp(png)
    if record is None or not png.is_file():
        return False
    if hashlib.sha256(png.read_bytes()).hexdigest() != record.get("png_sha256"):
        return False
    return {k: record.get(k) for k in expected} == expected


def stamp_bytes(expected: dict, png_data: bytes) -> bytes:
    """The stamp file's bytes for a PNG ``png_data`` drawn from the inputs ``expected``."""
    record = {**expected, "png_sha256": hashlib.sha256(png_data).hexdigest()}
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
