"""Result caches that carry their own integrity.

A cached result of artefact ``NAME`` made with configuration ``config`` is two files under the cache folder
(``figures/data/runs/`` by default):

* ``NAME-PRESET-KEY.csv`` -- the tidy frame :func:`run` returned, floats written with :data:`FLOAT_FORMAT`;
* ``NAME-PRESET-KEY.json`` -- its manifest: the artefact, the key, the configuration, the sha256 of the CSV's
  bytes, the total row count and the row count of every group (one run, one seed, ...) of a complete result.

``KEY`` is :func:`cache_key`: the first 16 hex digits of the sha256 of the canonical JSON of the
configuration plus the artefact name, computed without reading any file. The preset is a field of every
configuration, so two presets never share a file. :func:`load` accepts a cache only if the manifest belongs to
this artefact and configuration, the CSV's bytes hash to the recorded sha256, and every expected group is
present with its recorded row count; anything else is a :class:`CacheError` naming the file and the defect.
:func:`store` refuses to cache an incomplete result (a group missing or empty). A manifest that is not an object
or lacks a field (``sha256``, ``rows_per_group``, ...) and a data file that is a directory are
:class:`CacheError` too, so the default mode recomputes instead of crashing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import pandas as pd

from ..fileio import atomic_write_bytes

#: floats in every written CSV: 6 significant digits (losses to 1e-4 absolute, perplexities to 0.01)
FLOAT_FORMAT = "%.6g"
#: the manifest layout; a manifest of another version is not read
MANIFEST_VERSION = 1


class CacheError(Exception):
    """A cache that is missing, belongs to another configuration, or is damaged or incomplete."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def canonical_json(config) -> str:
    """The configuration (a dataclass) as sorted, compact JSON; tuples become lists."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True, separators=(",", ":"))


def cache_key(name: str, config) -> str:
    """sha256 of the artefact name and the canonical JSON of ``config``, first 16 hex digits (no I/O)."""
    return hashlib.sha256(f"{name}\n{canonical_json(config)}".encode()).hexdigest()[:16]


def cache_paths(root: Path, name: str, config) -> tuple[Path, Path]:
    """``(csv, manifest)`` of the cache of ``name`` made with ``config`` under ``root``."""
    stem = Path(root) / f"{name}-{config.preset}-{cache_key(name, config)}"
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The bytes every CSV of the package is written with (fixed float format, ``\\n`` line ends)."""
    return frame.to_csv(index=False, float_format=FLOAT_FORMAT, lineterminator="\n").encode()


def group_counts(frame: pd.DataFrame, group_by: tuple[str, ...]) -> dict[str, int]:
    """Rows per group, keyed ``"a/b/c"`` by the groups' values (one key ``""`` when ``group_by`` is empty)."""
    if not group_by:
        return {"": len(frame)}
    sizes = frame.groupby(list(group_by), sort=True, dropna=False).size()
    return {"/".join(map(str, key if isinstance(key, tuple) else (key,))): int(n) for key, n in sizes.items()}


def _expected_keys(expected_groups) -> set[str]:
    return {"/".join(map(str, group)) for group in expected_groups}


def store(root: Path, name: str, config, frame: pd.DataFrame, group_by: tuple[str, ...], expected_groups) -> None:
    """Write ``frame`` and its manifest atomically (the CSV first: a manifest never names missing data).

    ``expected_groups``: the group values (tuples over ``group_by``) a complete result has; a frame that misses
    one, or has one more, is a ``ValueError`` and nothing is written.
    """
    csv, manifest = cache_paths(root, name, config)
    counts = group_counts(frame, group_by)
    wanted = _expected_keys(expected_groups) if group_by else {""}
    if set(counts) != wanted or not all(counts.values()):
        missing, extra = sorted(wanted - set(counts)), sorted(set(counts) - wanted)
        raise ValueError(f"{name}: incomplete result, not cached (missing groups {missing}, unexpected {extra})")
    for path in (csv, manifest):
        if path.is_dir():
            raise CacheError(path, "a directory where the cache file belongs; nothing was written (move it away)")
    data = csv_bytes(frame)
    atomic_write_bytes(csv, data)
    record = {"version": MANIFEST_VERSION, "artefact": name, "key": cache_key(name, config),
              "config": dataclasses.asdict(config), "file": csv.name, "sha256": hashlib.sha256(data).hexdigest(),
              "rows": len(frame), "group_by": list(group_by), "rows_per_group": counts}
    atomic_write_bytes(manifest, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def load(root: Path, name: str, config, group_by: tuple[str, ...], expected_groups) -> pd.DataFrame:
    """The cached frame of ``name`` for ``config``, checked against its manifest; else :class:`CacheError`."""
    csv, manifest = cache_paths(root, name, config)
    if not manifest.exists():
        raise CacheError(manifest, "no cache for this configuration")
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise CacheError(manifest, f"unreadable manifest ({error})") from None
    if not isinstance(record, dict):
        raise CacheError(manifest, f"not a manifest (a JSON {type(record).__name__}, not an object)")
    if record.get("version") != MANIFEST_VERSION or record.get("artefact") != name \
            or record.get("key") != cache_key(name, config) or record.get("config") != _jsonable(config):
        raise CacheError(manifest, "manifest of another artefact, configuration or format")
    problem = _manifest_problem(record)
    if problem:
        raise CacheError(manifest, f"incomplete manifest: {problem}")
    if not csv.exists():
        raise CacheError(csv, "data file missing")
    try:
        data = csv.read_bytes()
    except OSError as error:   # a directory, unreadable
        raise CacheError(csv, f"unreadable data file ({error.strerror or error})") from None
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        lines = data.count(b"\n") - 1
        raise CacheError(csv, f"sha256 mismatch: the file changed since it was written "
                              f"({lines} data lines, {record['rows']} rows recorded)")
    try:
        frame = pd.read_csv(io.BytesIO(data))
    except (ValueError, pd.errors.ParserError) as error:
        raise CacheError(csv, f"incomplete: unreadable data ({error})") from None
    counts = group_counts(frame, tuple(record["group_by"])) if len(frame) else {}
    wanted = _expected_keys(expected_groups) if group_by else {""}
    if list(record["group_by"]) != list(group_by) or set(record["rows_per_group"]) != wanted:
        raise CacheError(manifest, "manifest does not list the groups this configuration needs")
    if len(frame) != record["rows"] or counts != record["rows_per_group"]:
        short = sorted(k for k, n in record["rows_per_group"].items() if counts.get(k, 0) != n)
        raise CacheError(csv, f"incomplete: {len(frame)} rows of {record['rows']}; groups with wrong counts: "
                              f"{short[:5]}{' ...' if len(short) > 5 else ''}")
    return frame


def _manifest_problem(record: dict) -> str | None:
    """What a manifest lacks (None if it has every field :func:`load` reads, of the right type)."""
    kinds = {"sha256": str, "rows": int, "group_by": list, "rows_per_group": dict}
    for key, kind in kinds.items():
        if not isinstance(record.get(key), kind):
            return f"no {key}" if key not in record else f"{key} is not a {kind.__name__}"
    if not all(isinstance(n, int) for n in record["rows_per_group"].values()):
        return "rows_per_group holds a count that is not an integer"
    return None


def _jsonable(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
