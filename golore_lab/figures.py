"""``python -m golore_lab figures``: make every artefact of :mod:`golore_lab.artefacts`.

For each selected artefact: load its result from the cache under ``OUT/data/runs/`` if that validates
(:mod:`golore_lab.artefacts.cache`: its configuration, sha256 and row counts), else recompute it (``--force``
always does; ``--no-recompute`` refuses instead, exit 1). Only when *every* selected result is in hand are
the outputs written, atomically: ``OUT/NAME.png`` and, for tables, ``OUT/NAME.md`` (``NAME-PRESET.*`` for a
preset other than ``default``, so a quick run never overwrites the committed figures). A damaged cache is
reported by name and is never plotted; nothing is rewritten from a partial set.

Beside every PNG lies its stamp ``NAME.stamp.json`` (:mod:`golore_lab.artefacts.stamp`: the sha256 of the
data, of the plotting code and of the PNG, and the matplotlib version). A figure whose stamp matches is left
untouched -- Agg may anti-alias a few pixels differently on another CPU, and a re-plot of unchanged inputs
must not rewrite a tracked file; ``--redraw`` draws it anyway. Tables are text and are always rewritten (the
same numbers give the same bytes).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .fileio import atomic_write_bytes


def main(argv: list[str] | None = None) -> int:
    from . import artefacts

    parser = argparse.ArgumentParser(prog="python -m golore_lab figures", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=artefacts.ARTEFACTS, metavar="NAME",
                        help=f"make only these artefacts (of: {', '.join(artefacts.ARTEFACTS)})")
    parser.add_argument("--preset", default="default", choices=artefacts.PRESET_NAMES,
                        help="size of the runs (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="recompute instead of reusing cached results")
    parser.add_argument("--no-recompute", action="store_true",
                        help="refuse (exit 1) instead of recomputing a missing or damaged cache")
    parser.add_argument("--redraw", action="store_true",
                        help="draw every figure even where its stamp says data, code and matplotlib are unchanged")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.force and args.no_recompute:
        parser.error("--force and --no-recompute contradict each other")
    root = artefacts.cache_root(args.out)
    names = args.only or list(artefacts.ARTEFACTS)

    frames, failed = {}, []
    for name in names:
        module = artefacts.get(name)
        config = module.PRESETS[args.preset]
        start = time.perf_counter()
        try:
            if args.force:
                raise artefacts.CacheError(root, "--force")
            frames[name] = artefacts.load_cached(module, config, root)
            how = "cached"
        except artefacts.CacheError as error:
            if args.no_recompute:
                print(f"{name}: cache refused: {error}", file=sys.stderr)
                failed.append(name)
                continue
            print(f"{name}: {error.reason} ({error.path.name}); computing", file=sys.stderr)
            try:
                frames[name] = artefacts.compute(module, config, root)
            except artefacts.CacheError as error:   # the result cannot be cached there (a directory in the way)
                print(f"{name}: not cached: {error}", file=sys.stderr)
                failed.append(name)
                continue
            how = "computed"
        print(f"{name}: {how} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    if failed:
        print(f"not written: no figure or table, because these inputs failed: {', '.join(failed)}", file=sys.stderr)
        return 1

    from .artefacts import stamp
    from .plotting import png_bytes

    suffix = "" if args.preset == "default" else f"-{args.preset}"
    outputs = {}  # rendered in memory first: a plot that fails leaves every file as it was
    for name in names:
        module = artefacts.get(name)
        png = args.out / f"{name}{suffix}.png"
        csv, _ = artefacts.cache.cache_paths(root, name, module.PRESETS[args.preset])
        inputs = stamp.expected_stamp(module, csv)
        if not args.redraw and stamp.is_current(png, inputs):
            print(f"{png}: unchanged (data, plotting code and matplotlib as stamped)", file=sys.stderr)
        else:
            outputs[png] = png_bytes(module.plot(frames[name]))
            outputs[stamp.stamp_path(png)] = stamp.stamp_bytes(inputs, outputs[png])
        if hasattr(module, "table"):
            outputs[args.out / f"{name}{suffix}.md"] = module.table(frames[name]).encode()
    for path, data in outputs.items():
        atomic_write_bytes(path, data)
        print(path)
    return 0
