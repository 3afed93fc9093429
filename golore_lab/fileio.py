"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the new one, never a part.

Every file the package writes -- figures, cached results, metrics, checkpoints, prepared data -- goes through
:func:`atomic_write_bytes` (or a caller that follows the same temporary-file-then-rename pattern).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before the rename (one per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file; a failed write leaves no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    """Append ``data`` to ``path`` with one ``write`` on an ``O_APPEND`` descriptor (``durable``: then fsync).

    Lines appended this way by a process that is killed can leave at most the last line torn (a prefix of
    ``data``), never an earlier line damaged: readers that drop a final line without its newline see whole lines.
    With ``durable`` the line is on disk when this returns (as a checkpoint is), so a power loss cannot lose a row
    logged before the checkpoint that follows it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def truncate(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (undoing a failed append), best effort: a file that cannot be opened
    is left as it is (a torn last line is then dropped by its reader)."""
    try:
        with open(path, "r+b") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())
    except OSError:
        pass


def replace_dir(new: Path, old: Path) -> None:
    """Put the finished folder ``new`` at ``old``: a rename where ``old`` is free, else the old folder moved aside
    first (a sibling ``.NAME.PID.old``), the new one renamed in, the old one deleted, so ``old`` is never a
    partial folder."""
    if old.exists():
        trash = old.with_name(f".{old.name}.{os.getpid()}.old")
        os.replace(old, trash)
        os.replace(new, old)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, old)
