"""The run folder: one run's checkpoint, metrics and lock, and every way they can be found damaged.

A run folder (``out_dir``) holds one run:

* ``checkpoint.pt`` -- written to a temporary file, fsynced and renamed (:func:`save_checkpoint`); with ``fsdp``
  the folder ``checkpoint/`` (:func:`save_sharded_checkpoint`), written under a temporary name and renamed;
* ``metrics.jsonl`` and ``metrics.csv`` -- one line appended and fsynced per logged row
  (:mod:`golore_lab.lm.metrics`; never NaN or Infinity); on ``resume`` both are rewritten, through a temporary
  file, from the rows up to the checkpoint's step;
* ``switches.json`` -- GoLore@auto's switch records at the last checkpoint, rewritten atomically;
* ``.lock`` -- held (``fcntl.flock``) by the one process training there.

Every fault is a :class:`RunError` (the programs' exit 1) naming the file and saying what is kept: a damaged
checkpoint (random bytes, truncated, empty, a directory, a missing key), a metrics line that is not a row, a
folder that cannot be written (read-only, EROFS), a run file or ``.lock`` that is a directory, a disk that fills
during a checkpoint write or a metrics append (the torn append is undone). ``--out`` naming a file is a bad
option (``ValueError``, exit 2).
"""
from __future__ import annotations

import errno
import fcntl
import os
import pickle
import re
import shutil
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from golore_lab.fileio import temporary_path

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_DIR = "checkpoint"          # with fsdp: a torch.distributed.checkpoint folder, holding STATE too
STATE = "state.pt"
#: GoLore@auto's per-matrix switch records (``switch_log`` of the optimizer, or of the wrapper) in a run folder
SWITCHES = "switches.json"
METRICS, METRICS_CSV = "metrics.jsonl", "metrics.csv"
#: what every checkpoint holds besides the weights and the optimizer state ("model", "optimizer"; an fsdp
#: checkpoint keeps those in its shards)
STATE_KEYS = ("step", "position", "tokens", "window", "metric_names", "rng_cpu", "identity")


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (divergence, a full disk, a folder in use or damaged, too
    little memory, a signal); the message says what is on disk and what to do."""


class RunInterrupted(RunError):
    """SIGINT or SIGTERM stopped the run at a safe point; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _kept(path: Path, previous_step: int | None) -> str:
    return (f"the previous checkpoint at step {previous_step} is intact ({path})" if previous_step is not None
            else f"no earlier checkpoint exists in {path.parent}")


def unwritable(path: Path, err: OSError) -> RunError:
    why = {errno.EROFS: "on a read-only file system", errno.EACCES: "not writable (permission denied)",
           errno.EPERM: "not writable (operation not permitted)", errno.ENOSPC: "on a full disk"}
    return RunError(f"cannot write in {path}: {why.get(err.errno, str(err))}; nothing in it was changed. Make it "
                    "writable, or choose another --out")


# ------------------------------------------------------------------------------------------ checkpoints
class _RecordingWriter:
    """The file object ``torch.save`` writes through: keeps the first ``OSError`` of a write, which torch's
    serializer replaces by its own ``RuntimeError`` (a full disk reads ``unexpected pos ...`` otherwise)."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(path: Path, payload: dict, previous_step: int | None = None) -> None:
    """``torch.save`` to a temporary name, fsync, then rename: a crash never leaves a partial checkpoint.

    A failed write removes its temporary file and raises :class:`RunError` saying the previous checkpoint (at
    ``previous_step``, if any) is intact -- for a full disk, "no space left while writing the checkpoint".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    writer = None
    try:
        with open(tmp, "wb") as handle:
            writer = _RecordingWriter(handle)
            torch.save(payload, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        if not isinstance(cause, OSError):
            raise
        what = ("no space left while writing the checkpoint" if cause.errno == errno.ENOSPC
                else f"writing the checkpoint failed ({cause})")
        raise RunError(f"{what}; {_kept(path, previous_step)}") from err


def load_checkpoint(path: Path, device: torch.device, sharded: bool = False) -> dict:
    """The state saved at ``path`` (``checkpoint.pt``, or an fsdp checkpoint's ``state.pt``), checked whole.

    A file that is not a checkpoint -- random bytes, truncated, empty, a directory, one without the keys a
    checkpoint has -- is a :class:`RunError` naming it and the defect; the folder is left as it is.
    """
    path = Path(path)
    fix = (f"nothing was changed in {path.parent}: start the run again with --overwrite (which moves the damaged "
           "run aside)")
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a directory, not a checkpoint file")
        if path.stat().st_size == 0:
            raise EOFError("the file is empty")
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise RunError(f"--resume: {path} is not a readable checkpoint ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else 'damaged'}); {fix}") from None
    if isinstance(state, dict) and "identity" not in state and "step" in state:
        raise RunError(f"--resume: {path} was written by an earlier version of this program (it records no run "
                       f"identity); {fix}")
    needed = ("identity", *STATE_KEYS, *(() if sharded else ("model", "optimizer")))
    missing = [key for key in needed if not isinstance(state, dict) or key not in state]
    if missing:
        raise RunError(f"--resume: {path} is not a checkpoint of this program (no {', '.join(missing)}); {fix}")
    return state


def saved_state(out_dir: Path) -> Path | None:
    """The file holding a run's non-tensor state: ``checkpoint.pt``, or ``checkpoint/state.pt`` of an fsdp run (or
    of the previous fsdp checkpoint, if a kill came between the two renames of :func:`save_sharded_checkpoint`;
    :meth:`RunFolder.recover` puts it back). None when the folder holds no checkpoint."""
    for path in (out_dir / CHECKPOINT, out_dir / CHECKPOINT_DIR / STATE, RunFolder(out_dir).replaced / STATE):
        if path.exists():
            return path
    return None


def save_sharded_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, payload: dict,
                            step: int, previous_step: int | None = None) -> None:
    """The fsdp checkpoint, a collective: a ``torch.distributed.checkpoint`` folder ``path`` holding the model's
    and the optimizer's state dicts (``get_state_dict``: each rank writes its shards) and :data:`STATE`, the
    non-tensor ``payload`` (rank 0's ``torch.save``).

    Written under a temporary name (``.checkpoint.<step>.tmp``, the same on every rank); once every rank's shards
    are written, rank 0 adds :data:`STATE` and renames: the old folder to ``.checkpoint.old``, the new one into
    place, then deletes the old. A kill between the two renames leaves the old checkpoint whole under
    ``.checkpoint.old``, which the next run puts back (:meth:`RunFolder.recover`). A failed write raises
    :class:`RunError` saying the previous checkpoint is intact.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{step}.tmp")
    leader = dist.get_rank() == 0

    def failed(err: BaseException) -> RunError:
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)
        return RunError(f"writing the checkpoint failed ({err}); {_kept(path, previous_step)}")

    model_state, optim_state = get_state_dict(model, opt)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    except Exception as err:  # every rank: DCP gathers the ranks' failures
        raise failed(err) from err
    if leader:
        try:
            save_checkpoint(tmp / STATE, payload)
        except RunError as err:
            raise failed(err.__cause__ or err) from err
        old = RunFolder(path.parent).replaced
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def load_sharded_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load the model's and the optimizer's state of :func:`save_sharded_checkpoint`'s folder ``path`` (a
    collective; at another world size the shards are re-cut)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ------------------------------------------------------------------------------------------ the folder
class RunFolder:
    """The folder of one run: :data:`RUN_FILES`, and ``.lock``, held (``fcntl.flock``) by the process training there.

    ``lock()`` refuses a second process naming the first; ``stale_temporaries()`` are the hidden temporary files
    that killed writers left behind (safe to delete once the lock is held); ``move_aside()`` moves the run files
    to a sibling folder ``<name>.replaced-<time>`` and returns it.
    """

    RUN_FILES = (CHECKPOINT, CHECKPOINT_DIR, METRICS, METRICS_CSV, SWITCHES, "test_metrics.json")
    LOCK = ".lock"

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"Invalid out_dir: {self.path} is a file, not a folder (choose another --out)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if (self.path / self.LOCK).is_dir():
                raise RunError(f"{self.path / self.LOCK} is a directory, not the run's lock file; nothing in "
                               f"{self.path} was changed: remove it (no run can be training there through it)")
            fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"Invalid out_dir: {self.path} lies inside a file, not a folder (choose another "
                             "--out)") from None
        except OSError as err:
            raise unwritable(self.path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{self.path} is in use by another run (process {holder}); wait for it to end, or "
                           "choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    @property
    def replaced(self) -> Path:
        """Where :func:`save_sharded_checkpoint` keeps the previous checkpoint folder between its two renames."""
        return self.path / f".{CHECKPOINT_DIR}.old"

    def recover(self) -> bool:
        """Put back the previous fsdp checkpoint a kill left under :attr:`replaced` (True), or delete it if the new
        one is in place."""
        if not self.replaced.is_dir():
            return False
        if (self.path / CHECKPOINT_DIR).exists():
            shutil.rmtree(self.replaced)
            return False
        os.replace(self.replaced, self.path / CHECKPOINT_DIR)
        return True

    def existing(self) -> list[str]:
        """The run files present in the folder."""
        return [name for name in self.RUN_FILES if (self.path / name).exists()]

    def misshapen(self) -> list[str]:
        """The run files that are directories where a file belongs (or a file where the fsdp folder belongs)."""
        return [name for name in self.existing() if (self.path / name).is_dir() != (name == CHECKPOINT_DIR)]

    def stale_temporaries(self) -> list[Path]:
        pattern = re.compile(r"\.(%s)\.\d+\.tmp" % "|".join(map(re.escape, self.RUN_FILES)))
        return sorted(p for p in self.path.glob(".*.tmp") if pattern.fullmatch(p.name))

    def move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}")
        aside.mkdir()
        for name in self.existing():
            os.replace(self.path / name, aside / name)
        return aside

    def prepare(self, resume: bool, overwrite: bool, say) -> bool:
        """Before a run (lock held): remove killed writers' temporaries, refuse a folder whose run files are
        misshapen, and refuse a new run a folder already holds -- or with ``overwrite`` move it aside. Returns
        whether the run resumes from a checkpoint: ``resume`` in a folder killed before its first checkpoint
        (metrics only) starts from step 0, saying so."""
        bad = self.misshapen()
        if bad:
            raise RunError(f"{', '.join(str(self.path / n) for n in bad)}: a directory where the run keeps a file "
                           f"(or a file where it keeps a folder); nothing in {self.path} was changed: move it away")
        try:
            if self.recover():
                say(f"put back the checkpoint a killed writer had moved to {self.replaced}")
            stale = self.stale_temporaries()
            for path in stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as err:
            raise unwritable(self.path, err) from None
        if stale:
            say(f"removed {len(stale)} temporary file(s) left by killed writers in {self.path}")
        held = self.existing()
        checkpointed = saved_state(self.path) is not None
        if resume:
            if not checkpointed and not held:
                raise FileNotFoundError(f"--resume: {self.path} holds no run (no checkpoint, no metrics); start it "
                                        "without --resume")
            if not checkpointed:
                say(f"--resume: {self.path} holds no checkpoint yet (the run was stopped before its first one): "
                    "starting it from step 0")
            return checkpointed
        if held and not overwrite:
            if not checkpointed:
                raise RunError(f"{self.path} holds the metrics of a run stopped before its first checkpoint "
                               f"({', '.join(held)}): --resume starts it again from step 0, --overwrite moves them "
                               "aside and starts a new one")
            raise RunError(f"{self.path} already holds a run ({', '.join(held)}): continue it with --resume, or "
                           "start a new one with --overwrite (which moves the old one aside)")
        if held:
            say(f"--overwrite: moved the run that was in {self.path} to {self.move_aside()}")
        return False
