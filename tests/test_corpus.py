"""Any corpus, any tokenizer: C4-format JSON Lines shards, Parquet, text folders and datasets builders, tokenized once
into a verified, memory-mapped cache. Everything is written by the tests; nothing is fetched."""
from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np
import pytest

from golore_lab.lm import corpus as corpus_module
from golore_lab.lm.corpus import load_token_corpus, load_tokenizer, prepare_corpus, token_dtype
from golore_lab.lm.data import CorruptCacheError

pytest.importorskip("transformers")

WORDS = ("the quick brown fox jumps over a lazy dog while seven old owls watch from tall trees near "
         "quiet rivers and green hills under grey skies").split()


def documents(n: int, seed: int = 0) -> list[str]:
    """n documents of 3..12 words from WORDS (a seeded numpy generator)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 13)))) for _ in range(n)]


def word_tokenizer(folder, extra: int = 0):
    """A word-level tokenizer over WORDS (ids: [UNK] 0, </s> 1, then the words), saved as a transformers folder.
    A document of w words is exactly w tokens, + 1 for the end-of-sequence id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
    for i in range(extra):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return str(folder), vocab


def write_c4_shard(path, docs):
    """C4's own layout: gzipped JSON Lines with text, timestamp, url."""
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i, text in enumerate(docs):
            handle.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                     "url": f"https://example.org/{i}"}) + "\n")


def expected_ids(docs, vocab):
    return np.concatenate([[vocab[w] for w in d.split()] + [1] for d in docs]) if docs else np.zeros(0)


@pytest.fixture()
def tok(tmp_path):
    return word_tokenizer(tmp_path / "tok")


def test_c4_shards_exact_tokens(tmp_path, tok):
    spec, vocab = tok
    train_docs, val_docs = documents(40, 1), documents(7, 2)
    write_c4_shard(tmp_path / "c4-train.00000-of-01024.json.gz", train_docs)
    write_c4_shard(tmp_path / "c4-validation.00000-of-00008.json.gz", val_docs)
    path = prepare_corpus(tmp_path / "c4-train.00000-of-01024.json.gz", spec, progress=False, root=tmp_path / "c",
                          val_data=tmp_path / "c4-validation.00000-of-00008.json.gz", log=lambda m: None)
    corpus = load_token_corpus(path)
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    np.testing.assert_array_equal(corpus.train, expected_ids(train_docs, vocab))
    np.testing.assert_array_equal(corpus.val, expected_ids(val_docs, vocab))
    m = corpus.manifest
    assert m["tokens"] == {"train": sum(len(d.split()) + 1 for d in train_docs),
                           "val": sum(len(d.split()) + 1 for d in val_docs)}
    assert m["documents"] == {"train": 40, "val": 7} and corpus.eot_id == 1
    assert m["max_token_id"] == int(max(expected_ids(train_docs, vocab).max(), expected_ids(val_docs, vocab).max()))
    assert corpus.vocab_size == len(vocab)
    # The tokenizer is kept with the tokens and reloads to the same encoding.
    reloaded = corpus_module.corpus_tokenizer(corpus)
    assert reloaded(train_docs[0], add_special_tokens=False)["input_ids"] == [vocab[w] for w in train_docs[0].split()]


def test_parquet_and_val_every_split(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    spec, vocab = tok
    docs = documents(25, 3)
    pq.write_table(pa.table({"id": list(range(25)), "content": docs}), tmp_path / "part-0.parquet")
    path = prepare_corpus(tmp_path / "part-0.parquet", spec, text_field="content", val_every=5, progress=False,
                          root=tmp_path / "c", log=lambda m: None)
    corpus = load_token_corpus(path)
    val = [d for i, d in enumerate(docs) if i % 5 == 0]
    train = [d for i, d in enumerate(docs) if i % 5]
    np.testing.assert_array_equal(corpus.val, expected_ids(val, vocab))
    np.testing.assert_array_equal(corpus.train, expected_ids(train, vocab))
    assert corpus.manifest["documents"] == {"train": 20, "val": 5}


def test_datasets_builder_streams_the_same_tokens(tmp_path, tok):
    """The datasets path (a builder name + data_files, streaming) gives the same tokens as the file reader."""
    pytest.importorskip("datasets")
    spec, vocab = tok
    docs = documents(30, 4)
    shard = tmp_path / "c4-train.00001-of-01024.json.gz"
    write_c4_shard(shard, docs)
    via_files = load_token_corpus(prepare_corpus(shard, spec, progress=False, root=tmp_path / "a", log=print))
    via_hub = load_token_corpus(prepare_corpus("json", spec, data_files=[str(shard)], progress=False,
                                               root=tmp_path / "b", log=print))
    np.testing.assert_array_equal(via_hub.train, via_files.train)
    np.testing.assert_array_equal(via_hub.val, via_files.val)
    assert via_hub.manifest["tokens"]["train"] + via_hub.manifest["tokens"]["val"] == len(expected_ids(docs, vocab))
    with pytest.raises(ValueError, match=r"no field 'body' \(fields: 'text', 'timestamp', 'url'\)"):
        prepare_corpus("json", spec, data_files=[str(shard)], text_field="body", progress=False, root=tmp_path / "b")
    # A name that is neither local nor loadable (the tests are offline) says both.
    with pytest.raises(ValueError, match="not a local file or folder, and datasets could not load it"):
        prepare_corpus("no-such-org/no-such-dataset", spec, progress=False, root=tmp_path / "b")


def test_text_folder_with_package_bpe(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    docs = documents(12, 5)
    for i, text in enumerate(docs):
        (folder / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(text * 20)
    (folder / "README.md").write_text("not read")
    path = prepare_corpus(folder, "bpe:300", val_every=4, progress=False, root=tmp_path / "c", log=lambda m: None)
    corpus = load_token_corpus(path)
    names = sorted(p for p in folder.rglob("*.txt"))  # sorted path order
    texts = [p.read_text() for p in names]
    bpe = corpus.tokenizer()
    expected = {"train": [], "val": []}
    for i, t in enumerate(texts):
        expected["val" if i % 4 == 0 else "train"].extend(bpe.encode(t, add_special_tokens=False).ids + [corpus.eot_id])
    np.testing.assert_array_equal(corpus.train, expected["train"])
    np.testing.assert_array_equal(corpus.val, expected["val"])
    assert corpus.vocab_size == 300 and corpus.eot_id == 0


def test_cache_reused_and_rebuilt(tmp_path, tok, monkeypatch):
    spec, vocab = tok
    shard = tmp_path / "data.jsonl"
    shard.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(30, 6)))
    first = prepare_corpus(shard, spec, progress=False, root=tmp_path / "c", log=lambda m: None)
    built = []
    real_build = corpus_module._build
    monkeypatch.setattr(corpus_module, "_build", lambda *a, **k: built.append(1) or real_build(*a, **k))
    assert prepare_corpus(shard, spec, progress=False, root=tmp_path / "c", log=lambda m: None) == first
    assert built == []  # reused: nothing tokenized
    # The source changes -> another key, a rebuild, other tokens.
    time.sleep(0.01)
    shard.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(31, 7)))
    second = prepare_corpus(shard, spec, progress=False, root=tmp_path / "c", log=lambda m: None)
    assert second != first and built == [1]
    assert sum(load_token_corpus(second).manifest["documents"].values()) == 31
    # A corrupted token file is detected and rebuilt in place.
    with open(second / "train.npy", "r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        handle.write(b"\xff\xff")
    with pytest.raises(CorruptCacheError, match="train.npy is corrupt"):
        load_token_corpus(second)
    messages = []
    assert prepare_corpus(shard, spec, progress=False, root=tmp_path / "c", log=messages.append) == second
    assert built == [1, 1] and "rebuilding" in messages[0]
    load_token_corpus(second)
    # Other settings are other caches.
    assert prepare_corpus(shard, spec, val_every=3, progress=False, root=tmp_path / "c", log=lambda m: None) != second


def test_max_tokens_and_documents(tmp_path, tok):
    spec, vocab = tok
    docs = documents(2000, 8)
    write_c4_shard(tmp_path / "s.json.gz", docs)
    c = load_token_corpus(prepare_corpus(tmp_path / "s.json.gz", spec, max_documents=100, progress=False,
                                         root=tmp_path / "c", log=lambda m: None))
    assert c.manifest["documents"] == {"train": 95, "val": 5}
    c = load_token_corpus(prepare_corpus(tmp_path / "s.json.gz", spec, max_tokens=10, progress=False,
                                         root=tmp_path / "c", log=lambda m: None))
    # It stops at the first chunk of 512 documents that brings the training split to >= 10 tokens.
    assert sum(c.manifest["documents"].values()) == corpus_module._CHUNK


def test_errors(tmp_path, tok):
    spec, vocab = tok
    kw = dict(progress=False, root=tmp_path / "c", log=lambda m: None)
    with pytest.raises(ValueError, match="No such file or folder: '.*missing.json.gz'"):
        prepare_corpus(tmp_path / "missing.json.gz", spec, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Empty folder"):
        prepare_corpus(tmp_path / "empty", spec, **kw)
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  \n"}) + "\n")
    with pytest.raises(ValueError, match=r"Empty corpus: no document with text in blank \(2 empty documents\)"):
        prepare_corpus(tmp_path / "blank.jsonl", spec, **kw)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "the fox"}) + "\n")
    with pytest.raises(ValueError, match="Empty train split"):
        prepare_corpus(tmp_path / "one.jsonl", spec, **kw)
    (tmp_path / "f.jsonl").write_text(json.dumps({"body": "the fox", "url": "u"}) + "\n")
    with pytest.raises(ValueError, match=r"f.jsonl:1: no field 'text' \(fields: 'body', 'url'\)"):
        prepare_corpus(tmp_path / "f.jsonl", spec, **kw)
    (tmp_path / "g.jsonl").write_text("{broken\n")
    with pytest.raises(ValueError, match="g.jsonl:1: not JSON Lines"):
        prepare_corpus(tmp_path / "g.jsonl", spec, **kw)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["the fox"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: 'content'\)"):
        prepare_corpus(tmp_path / "p.parquet", spec, **kw)
    with pytest.raises(ValueError, match="Cannot load tokenizer"):
        prepare_corpus(tmp_path / "f.jsonl", str(tmp_path / "no-tokenizer-here"), **kw)
    # A vocabulary larger than uint16 holds: refused for uint16, uint32 under auto.
    big, _ = word_tokenizer(tmp_path / "big", extra=70_000)
    with pytest.raises(ValueError, match="has 70028 tokens, more than uint16 holds"):
        prepare_corpus(tmp_path / "f.jsonl", big, dtype="uint16", **kw)
    assert token_dtype(70_028) == np.uint32 and token_dtype(65_536) == np.uint16
    with pytest.raises(ValueError, match="Invalid dtype"):
        token_dtype(10, "int8")
    assert not list((tmp_path / "c").glob("corpora/.*"))  # no temporary folder is left behind


def test_uint32_tokens_roundtrip(tmp_path):
    big, vocab = word_tokenizer(tmp_path / "big", extra=70_000)
    docs = ["w69999 the fox w5"] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = load_token_corpus(prepare_corpus(tmp_path / "d.jsonl", big, val_every=2, progress=False,
                                         root=tmp_path / "c", log=lambda m: None))
    assert c.train.dtype == np.uint32 and c.manifest["max_token_id"] == vocab["w69999"] > 65535
    np.testing.assert_array_equal(c.train, expected_ids(docs[:2], vocab))
