"""``python -m golore_lab figures``: regenerate every figure the package knows.

Each figure is a *producer*: a function ``produce(ctx: FigureContext) -> None`` that computes (or loads from
the result cache) the tidy data behind one or more figures and writes each with :func:`FigureContext.save`.
Producers are registered in :data:`PRODUCERS` by dotted path, so this module imports nothing heavy.

Files written, for a figure named ``NAME``:

* ``figures/NAME.png`` -- the picture;
* ``figures/data/NAME.csv`` -- the tidy data behind it (one row per plotted value).

Results of expensive runs are cached under ``figures/data/runs/`` with the configuration that made them
(see :meth:`FigureContext.cached`) and reused unless ``--force``. All files are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .fileio import atomic_write_bytes

#: figure producer name -> "module:function". Order is the order they run in.
PRODUCERS: dict[str, str] = {
    "counterexample": "golore_lab.experiments:produce_counterexample",
    "noise": "golore_lab.experiments:produce_noise",
    "noise-lm": "golore_lab.experiments:produce_noise_lm",
    "pretrain": "golore_lab.lm.experiment:produce",
    "finetune": "golore_lab.lm.finetune_experiments:produce",
    "theory": "golore_lab.experiments:produce_theory",
}

PRESETS = ("fast", "default", "full")


def atomic_write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame as CSV atomically."""
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


@dataclass
class FigureContext:
    """What a producer needs: where to write, whether to recompute, how big to run."""

    out_dir: Path = Path("figures")
    preset: str = "default"
    force: bool = False
    written: list[Path] = field(default_factory=list)

    def save(self, fig, name: str, data: pd.DataFrame) -> Path:
        """Save ``fig`` as ``out_dir/name.png`` and ``data`` as ``out_dir/data/name.csv`` (atomically)."""
        import io

        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
        plt.close(fig)
        png = self.out_dir / f"{name}.png"
        atomic_write_bytes(png, buf.getvalue())
        atomic_write_csv(data, self.out_dir / "data" / f"{name}.csv")
        self.written.append(png)
        return png

    def cached(self, key: str, config: dict, compute) -> pd.DataFrame:
        """Return the run results cached under ``key`` if they were made with ``config``; else compute them.

        The cache is ``out_dir/data/runs/KEY.csv`` plus ``KEY.json`` holding ``config``; both are small and
        committed, so expensive runs (the LM figures) are re-plotted, not re-run, on a fresh clone. A cache made
        with another configuration, or ``--force``, recomputes. ``compute()`` returns a tidy DataFrame.
        """
        import json

        path = self.out_dir / "data" / "runs" / f"{key}.csv"
        sidecar = path.with_suffix(".json")
        wanted = json.dumps(config, sort_keys=True, default=str)
        if not self.force and path.exists() and sidecar.exists() and sidecar.read_text() == wanted:
            return pd.read_csv(path)
        frame = compute()
        atomic_write_csv(frame, path)
        atomic_write_bytes(sidecar, wanted.encode())
        return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m golore_lab figures", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(PRODUCERS), help="run only these producers")
    parser.add_argument("--preset", default="default", choices=PRESETS, help="size of the runs (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="recompute instead of reusing cached results")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    ctx = FigureContext(out_dir=args.out, preset=args.preset, force=args.force)
    names = args.only or list(PRODUCERS)
    for name in (bar := tqdm(names, desc="figures", unit="producer")):
        bar.set_postfix_str(name)
        module, func = PRODUCERS[name].split(":")
        start = time.perf_counter()
        getattr(importlib.import_module(module), func)(ctx)
        tqdm.write(f"{name}: {time.perf_counter() - start:.1f} s")
    for path in ctx.written:
        print(path)
    return 0
