"""The metrics files of a run folder: ``metrics.jsonl`` and ``metrics.csv``, appended durably, read back checked.

:class:`MetricsLog` appends one whole line per logged row to both files with one ``write`` each, then fsyncs (a
row logged before a checkpoint survives a power loss as the checkpoint does); an append that fails (a full disk)
is undone in both files. Non-finite numbers are written as JSON ``null`` / an empty CSV field: the files never
hold NaN or Infinity. :func:`read_metrics` drops a torn last line and refuses (naming it) an earlier line that is
not a row; :func:`reconcile_metrics` keeps the rows up to a checkpoint's step and repairs duplicated or
reordered rows, saying what it did.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import math
from pathlib import Path

from golore_lab.fileio import append_bytes, atomic_write_text, truncate

from .runfolder import METRICS, METRICS_CSV, RunError, unwritable


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool) or row["step"] < 0:
        return "no integer step >= 0"
    return None


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The rows of a ``metrics.jsonl``, and a note if its last line was torn (cut by a kill) and is dropped.

    Only the last line can be torn (rows are appended whole, one write each); an earlier line that is not a
    metrics row -- not JSON, or JSON without an integer ``step`` (``{}``, ``42``) -- is a :class:`RunError`
    naming it.
    """
    if not path.exists():
        return [], None
    lines = path.read_bytes().split(b"\n")
    rows, note = [], None
    complete, tail = lines[:-1], lines[-1]   # a file that ends with "\n" has an empty tail
    for number, line in enumerate(complete, 1):
        try:
            row = json.loads(line)
            problem = _row_problem(row)
        except ValueError:
            row, problem = None, "not JSON"
        if problem is None:
            rows.append(row)
        elif number == len(complete) and not tail and row is None:
            note = f"{path}: dropped its unreadable last line {number}"
        else:
            raise RunError(f"{path}: line {number} is not a metrics row ({problem}: {line[:60]!r}); the file is "
                           "damaged beyond its last line, and nothing was changed: repair or remove that line, or "
                           "start over with --overwrite")
    if tail:
        note = f"{path}: dropped its torn last line {len(lines)} ({len(tail)} bytes without a newline)"
    return rows, note


def reconcile_metrics(out_dir: Path, step: int, say) -> list[dict]:
    """The rows of ``out_dir/metrics.jsonl`` up to the checkpoint's ``step`` (what the resumed run continues), in
    step order with one row per step; what is dropped or repaired -- a torn last line, rows logged after the
    checkpoint, duplicated or reordered rows -- is said through ``say``."""
    path = out_dir / METRICS
    rows, note = read_metrics(path)
    if note:
        say(note)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) < len(rows):
        say(f"{path}: dropped {len(rows) - len(kept)} row(s) logged after the checkpoint's step {step}")
    by_step = {}
    for row in kept:                          # the last row written for a step is the one that run logged
        by_step[row["step"]] = row
    repaired = [by_step[s] for s in sorted(by_step)]
    if len(repaired) < len(kept):
        say(f"{path}: repaired: dropped {len(kept) - len(repaired)} duplicated row(s) (kept the last of each step)")
    if [r["step"] for r in kept if by_step[r["step"]] is r] != [r["step"] for r in repaired]:
        say(f"{path}: repaired: rows put back in step order")
    if not repaired:
        say(f"{path}: no rows up to step {step}; the history before the checkpoint is lost")
    return repaired


def json_row(row: dict) -> str:
    """``row`` as one JSON line: non-finite floats become ``null`` (JSON has no NaN or Infinity)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


class MetricsLog:
    """Rows appended to ``metrics.csv`` and ``metrics.jsonl`` (one whole line per write, fsynced); kept in memory
    too.

    A new log writes both files with no rows (the CSV with its header); a resumed one rewrites both, through a
    temporary file and a rename, from ``rows`` -- the JSON lines already reconciled with the checkpoint -- so that
    a kill at any moment leaves the old files or the new ones. An append that fails (a full disk) is undone in
    both files and raises :class:`RunError`.
    """

    BASE = ["step", "examples", "tokens", "lr", "train_loss", "grad_norm", "elapsed_s", "tokens_per_s"]

    def __init__(self, out_dir: Path | None, metric_names: list[str], rows: list[dict] | None = None):
        self.fields = self.BASE + [m for m in metric_names if m not in self.BASE]
        self.rows: list[dict] = list(rows or [])
        self.out_dir = out_dir
        if out_dir is None:
            return
        self.jsonl, self.csv = out_dir / METRICS, out_dir / METRICS_CSV
        try:
            atomic_write_text(self.jsonl, "".join(json_row(row) + "\n" for row in self.rows))
            atomic_write_text(self.csv, self._csv_lines(self.rows, header=True))
        except OSError as err:
            raise unwritable(out_dir, err) from None

    def _csv_lines(self, rows: list[dict], header: bool = False) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, restval="", extrasaction="ignore")
        if header:
            writer.writeheader()
        writer.writerows([{k: json.loads(json_row({"v": v}))["v"] for k, v in row.items()} for row in rows])
        return buffer.getvalue()

    def append(self, row: dict, kept: str = "") -> None:
        """Append ``row`` to both files; ``kept`` (what the last checkpoint holds) goes into a failure's message."""
        line, csv_line = (json_row(row) + "\n").encode(), self._csv_lines([row]).encode()
        if self.out_dir is not None:
            sizes = [self.jsonl.stat().st_size, self.csv.stat().st_size]
            try:
                append_bytes(self.jsonl, line, durable=True)
                append_bytes(self.csv, csv_line, durable=True)
            except OSError as err:
                for path, size in zip((self.jsonl, self.csv), sizes):
                    truncate(path, size)   # undo a torn line, and the other file's whole one
                what = "no space left" if err.errno == errno.ENOSPC else f"writing failed ({err})"
                raise RunError(f"{what} while appending the metrics row of step {row['step']}: the row is not in "
                               f"{self.jsonl.name} or {self.csv.name} (both end at the row before); {kept}") from None
        self.rows.append(row)
