"""Any text corpus, any tokenizer: tokenize once into a cached, memory-mapped token file with an integrity manifest.

What ``pretrain --data PATH_OR_NAME --tokenizer NAME_OR_PATH`` reads (:func:`prepare_corpus`, then
:func:`load_token_corpus`):

* **local files** -- a file, a folder (searched recursively, files in sorted path order) or a glob pattern
  (``'c4/en/c4-train.0000*-of-01024.json.gz'``):

  - ``.txt`` (plain text; one file is one document, decoded as UTF-8 with ``errors="replace"``);
  - ``.jsonl`` / ``.json`` (JSON Lines), plain or ``.gz`` -- C4's own shards
    ``c4-train.00000-of-01024.json.gz`` are this -- one document per line, its text in ``text_field``;
  - ``.parquet`` (read with pyarrow, column ``text_field``);

* **a Hugging Face ``datasets`` name** (anything that is not a local path, e.g. ``allenai/c4`` with
  configuration ``en``, as the paper's code reads C4), loaded with ``streaming=True`` so nothing is downloaded
  beyond what is tokenized. ``datasets``' own builders (``json``, ``parquet``, ``text``) with ``data_files`` take
  the same path, offline; that is how the tests exercise it.

Tokenizers (:func:`load_tokenizer`): ``bpe`` or ``bpe:V`` trains the package's byte-level BPE on the corpus itself
(:func:`golore_lab.lm.data.train_tokenizer`, end-of-text id 0), anything else goes to
``transformers.AutoTokenizer.from_pretrained`` (a saved folder, or a hub name such as the paper's ``t5-base``).
Each document is encoded without special tokens and followed by the tokenizer's end-of-sequence id (``</s>``,
id 1, for T5).

Splits: with ``val_data`` (or ``val_split`` for a ``datasets`` name, e.g. C4's ``validation``) the validation
tokens come from there; otherwise document ``i`` of the source goes to validation iff ``i % val_every == 0``
(the rule of :mod:`golore_lab.lm.data`). ``max_documents`` / ``max_tokens`` stop reading early (C4's English
training split has about 365 M documents, by its dataset card; 10k steps of 512 x 256 tokens use 1.3 B tokens).

Cache: ``CACHE/corpora/<name>-<key>/`` with ``train.npy``, ``val.npy`` (token ids, ``uint16`` when the
tokenizer's vocabulary fits, else ``uint32``), the tokenizer (``tokenizer.json``; ``tokenizer/`` for a
``transformers`` one) and ``manifest.json`` (sha256 of every file, counts, largest id). The key hashes every
setting and the *identity of the source*: for local files their paths, sizes and modification times (a changed
file is a new key, and the cache is rebuilt), for a ``datasets`` name its name, configuration, split, revision
and data files; for the tokenizer the sha256 of its serialized form. The folder is written under a temporary
name and renamed into place; :func:`load_token_corpus` verifies the checksums and raises
:class:`~golore_lab.lm.data.CorruptCacheError` naming the bad file, and :func:`prepare_corpus` then rebuilds.
Token files are written in chunks (a raw file, then the ``.npy``), so memory does not grow with the corpus, and
loaded with ``mmap_mode="r"``. A tqdm progress bar (documents) goes to stderr.

Errors are ``ValueError`` naming the bad value: a missing file, a folder with no readable file, an empty corpus
(or an empty split), a field that is not in the data (the fields that are, listed), a tokenizer without an
end-of-sequence token, a vocabulary that does not fit the requested ``dtype``.

Example::

    >>> path = prepare_corpus("c4/en/c4-train.00000-of-01024.json.gz", "t5-base",
    ...                       val_data="c4/en/c4-validation.00000-of-00008.json.gz")
    >>> corpus = load_token_corpus(path)      # a golore_lab.lm.data.Corpus; train/val are memory-mapped
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from golore_lab.lm.data import EOT, VAL_EVERY, Corpus, CorruptCacheError, read_manifest, train_tokenizer
from golore_lab.fileio import replace_dir
from golore_lab.lm.fetch import cache_root, sha256_file

FORMAT_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_CHUNK = 512  # documents per tokenizer call


# ------------------------------------------------------------------------------------------------ sources
def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _looks_local(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or text.endswith("/") or any(c in text for c in "*?[")
            or _suffix(Path(text)) is not None or os.sep == "\\" and "\\" in text)


def local_files(data: str | Path) -> list[Path]:
    """The readable files of a file, folder or glob pattern, sorted; ``ValueError`` if there are none."""
    text = os.path.expanduser(str(data))
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not paths:
            raise ValueError(f"No files match {str(data)!r}")
    elif Path(text).is_dir():
        paths = sorted(p for p in Path(text).rglob("*") if p.is_file())
        if not paths:
            raise ValueError(f"Empty folder: {str(data)!r} (no files)")
    elif Path(text).is_file():
        paths = [Path(text)]
    else:
        raise ValueError(f"No such file or folder: {str(data)!r}")
    readable = [p for p in paths if _suffix(p)]
    if not readable:
        raise ValueError(f"No readable files in {str(data)!r} (suffixes: {', '.join(SUFFIXES)}; "
                         f"found e.g. {paths[0].name!r})")
    return readable


@dataclass(frozen=True)
class Source:
    """Where documents come from: local files (``files``) or a ``datasets`` name (``name``, ``config``, ``split``)."""

    files: tuple[Path, ...] = ()
    name: str | None = None
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] = ()
    revision: str | None = None
    text_field: str = "text"

    @classmethod
    def parse(cls, data: str | Path, text_field: str = "text", config: str | None = None, split: str = "train",
              data_files: list[str] | None = None, revision: str | None = None) -> "Source":
        """Local if ``data`` exists or looks like a path (a known suffix, a glob, ``./``, ``/``); else a ``datasets`` name."""
        text = str(data)
        if not data_files and (Path(os.path.expanduser(text)).exists() or _looks_local(text)):
            return cls(files=tuple(local_files(text)), text_field=text_field)
        return cls(name=text, config=config, split=split, data_files=tuple(map(str, data_files or ())),
                   revision=revision, text_field=text_field)

    def identity(self) -> dict:
        """What the cache key depends on (for files: path, size, modification time of each)."""
        if self.files:
            return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files],
                    "text_field": self.text_field}
        local = [Path(f) for f in self.data_files]
        return {"dataset": self.name, "config": self.config, "split": self.split, "revision": self.revision,
                "data_files": [[f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] if Path(f).is_file() else f
                               for f in map(str, local)], "text_field": self.text_field}

    def label(self) -> str:
        if self.files:
            first = self.files[0].name
            for suffix in SUFFIXES:
                first = first.removesuffix(suffix)
            return first + (f"+{len(self.files) - 1}" if len(self.files) > 1 else "")
        return "-".join(x for x in (self.name, self.config, self.split) if x).replace("/", "_")

    def documents(self) -> Iterator[str]:
        """Yield the texts in order (see the module docstring for each format)."""
        if self.files:
            for path in self.files:
                yield from _read_file(path, self.text_field)
        else:
            yield from _read_dataset(self)


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON object is needed, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{where}: no field {text_field!r} (fields: {', '.join(map(repr, record))}); "
                         "choose one with --text-field")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix == ".txt":
        yield path.read_bytes().decode("utf-8", errors="replace")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
        names = reader.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(map(repr, names))}); "
                             "choose one with --text-field")
        for batch in reader.iter_batches(columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield value or ""
    else:
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as err:
                        raise ValueError(f"{path}:{number}: not JSON Lines ({err})") from None
                    yield _field(record, text_field, f"{path}:{number}")


def _read_dataset(source: Source) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{source.name!r} is not a local file or folder, and reading a Hugging Face dataset needs "
                         "`pip install datasets`") from None
    kwargs = {"data_files": list(source.data_files)} if source.data_files else {}
    try:
        ds = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True,
                                   revision=source.revision, **kwargs)
    except Exception as err:  # datasets raises many kinds (connection, missing config, missing split...)
        raise ValueError(f"{source.name!r} is not a local file or folder, and datasets could not load it "
                         f"(config {source.config!r}, split {source.split!r}): {type(err).__name__}: {err}") from None
    for number, record in enumerate(ds):
        yield _field(record, source.text_field, f"{source.name} [{source.split}] example {number}")


# -------------------------------------------------------------------------------------------- tokenizers
@dataclass
class Tokenizer:
    """A tokenizer behind one interface: ``encode(texts) -> list of id lists``, its size and end-of-text id."""

    spec: str
    backend: object
    vocab_size: int
    eot_id: int
    kind: str  # "bpe" (package-trained, tokenizers library) or "transformers"

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "bpe":
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return self.backend(texts, add_special_tokens=False)["input_ids"]

    def fingerprint(self) -> str:
        if self.kind == "bpe":
            return hashlib.sha256(self.backend.to_str().encode()).hexdigest()
        fast = getattr(self.backend, "backend_tokenizer", None)
        text = fast.to_str() if fast is not None else json.dumps(
            [type(self.backend).__name__, self.backend.name_or_path, sorted(self.backend.get_vocab().items())])
        return hashlib.sha256(text.encode()).hexdigest()

    def save(self, folder: Path) -> list[str]:
        """Write the tokenizer into ``folder``; return the file names written (relative)."""
        if self.kind == "bpe":
            self.backend.save(str(folder / "tokenizer.json"))
            return ["tokenizer.json"]
        self.backend.save_pretrained(str(folder / "tokenizer"))
        return sorted(str(p.relative_to(folder)) for p in (folder / "tokenizer").rglob("*") if p.is_file())


def _bpe_vocab(spec: str) -> int | None:
    if spec == "bpe":
        return 4096
    if spec.startswith("bpe:"):
        try:
            return int(spec[4:])
        except ValueError:
            raise ValueError(f"Invalid tokenizer {spec!r} (bpe:V needs an integer V)") from None
    return None


def load_tokenizer(spec: str, texts: list[str] | None = None) -> Tokenizer:
    """``bpe[:V]`` (trained on ``texts``) or a ``transformers.AutoTokenizer`` name or folder."""
    vocab = _bpe_vocab(spec)
    if vocab is not None:
        if not 256 < vocab <= 65536:
            raise ValueError(f"Invalid tokenizer {spec!r}: V must be in (256, 65536]")
        if not texts:
            raise ValueError("Empty corpus: no text to train the bpe tokenizer on")
        backend = train_tokenizer(texts, vocab)
        return Tokenizer(spec, backend, backend.get_vocab_size(), backend.token_to_id(EOT), "bpe")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"Tokenizer {spec!r} needs `pip install transformers` (or use --tokenizer bpe)") from None
    try:
        backend = AutoTokenizer.from_pretrained(spec)
    except Exception as err:
        raise ValueError(f"Cannot load tokenizer {spec!r} (not a saved tokenizer folder, and the hub gave: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if backend.eos_token_id is None:
        raise ValueError(f"Tokenizer {spec!r} has no end-of-sequence token (needed between documents)")
    return Tokenizer(spec, backend, len(backend), int(backend.eos_token_id), "transformers")


def token_dtype(vocab_size: int, dtype: str = "auto", spec: str = "") -> np.dtype:
    """``uint16`` if every id fits (vocab <= 65536), else ``uint32``; a requested dtype that is too small raises."""
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in DTYPES:
        raise ValueError(f"Invalid dtype: {dtype!r} (choose from auto, {', '.join(DTYPES)})")
    limit = np.iinfo(DTYPES[dtype]).max + 1
    if vocab_size > limit:
        raise ValueError(f"Tokenizer {spec!r} has {vocab_size} tokens, more than {dtype} holds ({limit}): "
                         "use dtype uint32 (or auto)")
    return np.dtype(DTYPES[dtype])


# --------------------------------------------------------------------------------------------- building
@dataclass
class _SplitWriter:
    raw: Path
    dtype: np.dtype
    tokens: int = 0
    documents: int = 0
    max_id: int = -1
    handle: object = field(default=None, repr=False)

    def __post_init__(self):
        self.handle = open(self.raw, "wb")

    def add(self, ids: list[int], eot: int) -> None:
        array = np.asarray(list(ids) + [eot], dtype=np.int64)
        if array.size:
            self.max_id = max(self.max_id, int(array.max()))
        self.handle.write(array.astype(self.dtype).tobytes())
        self.tokens += array.size
        self.documents += 1

    def finish(self, npy: Path) -> None:
        self.handle.close()
        out = np.lib.format.open_memmap(npy, mode="w+", dtype=self.dtype, shape=(self.tokens,))
        if self.tokens:
            source = np.memmap(self.raw, dtype=self.dtype, mode="r", shape=(self.tokens,))
            step = 1 << 24
            for start in range(0, self.tokens, step):
                out[start:start + step] = source[start:start + step]
            del source
        out.flush()
        del out
        self.raw.unlink()


def _progress(total=None, desc="tokenizing", enabled=True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_corpus(data: str | Path, tokenizer: str = "bpe", *, text_field: str = "text", config: str | None = None,
                   split: str = "train", data_files: list[str] | None = None, revision: str | None = None,
                   val_data: str | Path | None = None, val_split: str | None = None, val_every: int = VAL_EVERY,
                   max_documents: int | None = None, max_tokens: int | None = None,
                   max_val_documents: int | None = None, dtype: str = "auto",
                   root: Path | None = None, force: bool = False, progress: bool = True, log=None) -> Path:
    """Tokenize ``data`` once into the cache; return the corpus folder (reused while its key and checksums hold).

    See the module docstring for what ``data``, ``tokenizer`` and the split options accept. ``max_documents``
    bounds the documents read from the (training) source, ``max_tokens`` stops once the training split holds at
    least that many tokens; both apply before the ``val_every`` split, so the same prefix of the source is read.
    ``max_val_documents`` bounds the documents read from ``val_data`` / ``val_split`` (default: ``max_documents``).
    """
    if val_every < 2:
        raise ValueError(f"Invalid val_every: {val_every} (must be >= 2)")
    for name, value in (("max_documents", max_documents), ("max_tokens", max_tokens),
                        ("max_val_documents", max_val_documents)):
        if value is not None and value < 1:
            raise ValueError(f"Invalid {name}: {value} (must be >= 1)")
    log = log or (lambda message: print(message, file=sys.stderr))
    source = Source.parse(data, text_field, config, split, data_files, revision)
    if val_data is not None:
        val_source = Source.parse(val_data, text_field, config, val_split or split, None, revision)
    elif val_split is not None:
        if source.files:
            raise ValueError(f"val_split {val_split!r} is for a datasets name; for local files give val_data")
        val_source = Source(name=source.name, config=config, split=val_split, data_files=source.data_files,
                            revision=revision, text_field=text_field)
    else:
        val_source = None
    bpe = _bpe_vocab(tokenizer) is not None
    tok = None if bpe else load_tokenizer(tokenizer)
    if tok is not None:
        token_dtype(tok.vocab_size, dtype, tokenizer)  # fail before reading anything
    settings = {"format": FORMAT_VERSION, "source": source.identity(),
                "val_source": val_source.identity() if val_source else None, "val_every": val_every,
                "tokenizer": tokenizer if bpe else tok.fingerprint(), "max_documents": max_documents,
                "max_tokens": max_tokens, "dtype": dtype}
    if max_val_documents is not None:  # only then: the keys of existing caches stay what they were
        settings["max_val_documents"] = max_val_documents
    key = cache_key(settings)
    tok_label = (tokenizer if bpe else Path(tokenizer).name or tokenizer).replace("/", "_").replace(":", "")
    out = Path(root or cache_root()) / "corpora" / f"{source.label()}-{tok_label}-{key}"
    if not force:
        try:
            load_token_corpus(out)
            return out
        except CorruptCacheError as err:
            if out.exists():
                log(f"golore_lab: rebuilding the corpus cache: {err}")
    _build(out, source, val_source, tokenizer, tok, settings, val_every, max_documents, max_tokens, dtype, progress,
           max_documents if max_val_documents is None else max_val_documents)
    manifest = json.loads((out / "manifest.json").read_text())
    log(f"golore_lab: prepared {out}: {manifest['documents']['train']:,} / {manifest['documents']['val']:,} "
        f"documents, {manifest['tokens']['train']:,} train / {manifest['tokens']['val']:,} val tokens")
    return out


def _limited(docs: Iterator[str], max_documents: int | None) -> Iterator[str]:
    for index, text in enumerate(docs):
        if max_documents is not None and index >= max_documents:
            return
        yield text


def _build(out: Path, source: Source, val_source: Source | None, spec: str, tok: Tokenizer | None, settings: dict,
           val_every: int, max_documents: int | None, max_tokens: int | None, dtype: str, progress: bool,
           max_val_documents: int | None = None) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train_docs = _limited(source.documents(), max_documents)
        if tok is None:  # the package's BPE is trained on the (training) documents themselves
            train_docs = list(train_docs)
            tok = load_tokenizer(spec, [t for t in train_docs if t])
        np_dtype = token_dtype(tok.vocab_size, dtype, spec)
        writers = {s: _SplitWriter(tmp / f"{s}.raw", np_dtype) for s in ("train", "val")}
        skipped = _tokenize(train_docs, tok, writers, None if val_source else val_every, max_tokens, progress,
                            "tokenizing " + source.label())
        if val_source is not None:
            skipped += _tokenize(_limited(val_source.documents(), max_val_documents), tok, {"val": writers["val"]},
                                 None, None, progress, "tokenizing " + val_source.label())
        where = source.label() + (f" + {val_source.label()}" if val_source else "")
        if writers["train"].documents + writers["val"].documents == 0:
            raise ValueError(f"Empty corpus: no document with text in {where}"
                             + (f" ({skipped} empty documents)" if skipped else ""))
        for split, writer in writers.items():
            if writer.documents == 0:
                raise ValueError(f"Empty {split} split: {where} gave no {split} document "
                                 + ("(give more documents than val_every, or val_data)" if split == "train"
                                    and not val_source else ""))
        for split, writer in writers.items():
            writer.finish(tmp / f"{split}.npy")
        files = tok.save(tmp) + ["train.npy", "val.npy"]
        manifest = {
            "format": FORMAT_VERSION, "kind": "token-corpus", "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "tokenizer": {"spec": spec, "kind": tok.kind, "sha256": tok.fingerprint()},
            "dtype": np_dtype.name, "max_token_id": max(w.max_id for w in writers.values()),
            "val_every": None if val_source else val_every, "settings": settings,
            "documents": {s: w.documents for s, w in writers.items()},
            "tokens": {s: w.tokens for s, w in writers.items()}, "empty_documents_skipped": skipped,
            "files": {f: sha256_file(tmp / f) for f in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        replace_dir(tmp, out)
    finally:
        for writer in locals().get("writers", {}).values():
            if not writer.handle.closed:
                writer.handle.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenize(docs, tok: Tokenizer, writers: dict, val_every: int | None, max_tokens: int | None, progress: bool,
              desc: str) -> int:
    """Encode ``docs`` in chunks into ``writers``; document i (counting non-empty ones) is validation iff
    ``i % val_every == 0``; return the number of empty documents skipped."""
    index, skipped, chunk = 0, 0, []
    bar = _progress(desc=desc, enabled=progress)

    def flush() -> bool:
        nonlocal index
        for ids in tok.encode(chunk):
            split = "val" if val_every is not None and index % val_every == 0 else "train"
            writers[split if split in writers else "val"].add(ids, tok.eot_id)
            index += 1
        bar.update(len(chunk))
        chunk.clear()
        return max_tokens is not None and "train" in writers and writers["train"].tokens >= max_tokens

    try:
        for text in docs:
            if not text.strip():
                skipped += 1
                continue
            chunk.append(text)
            if len(chunk) >= _CHUNK and flush():
                return skipped
        if chunk:
            flush()
    finally:
        bar.close()
    return skipped


# --------------------------------------------------------------------------------------------- loading
def load_token_corpus(path: str | Path, verify: bool = True, mmap: bool = True) -> Corpus:
    """A prepared corpus folder as a :class:`~golore_lab.lm.data.Corpus`, token arrays memory-mapped.

    ``verify`` checks every file against ``manifest.json`` and raises :class:`CorruptCacheError` naming the file
    that is missing or whose sha256 differs.
    """
    path = Path(path)
    manifest = read_manifest(path, verify, fields=("vocab_size", "eot_id"))
    try:
        vocab, eot = int(manifest["vocab_size"]), int(manifest["eot_id"])
    except (ValueError, TypeError) as err:
        raise CorruptCacheError(f"{path / 'manifest.json'} is unreadable: {err}") from None
    mode = "r" if mmap else None
    return Corpus(train=np.load(path / "train.npy", mmap_mode=mode), val=np.load(path / "val.npy", mmap_mode=mode),
                  vocab_size=vocab, eot_id=eot, path=path, manifest=manifest)


def corpus_tokenizer(corpus: Corpus):
    """The tokenizer a corpus was built with: a ``tokenizers.Tokenizer`` (bpe) or a ``transformers`` tokenizer."""
    if (corpus.path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(corpus.path / "tokenizer"))
    return corpus.tokenizer()


def main(argv: list[str] | None = None) -> int:
    """``python -m golore_lab.lm.corpus DATA --tokenizer T``: prepare a corpus, print its folder and counts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m golore_lab.lm.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("data", help="file, folder, glob pattern or Hugging Face datasets name")
    parser.add_argument("--tokenizer", default="bpe", help="bpe, bpe:V, or a transformers tokenizer name/folder")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--data-config", default=None, help="datasets configuration (e.g. en for allenai/c4)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--val-data", default=None)
    parser.add_argument("--val-split", default=None, help="datasets split for validation (e.g. validation)")
    parser.add_argument("--val-every", type=int, default=VAL_EVERY)
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = prepare_corpus(args.data, args.tokenizer, text_field=args.text_field, config=args.data_config,
                              split=args.split, val_data=args.val_data, val_split=args.val_split,
                              val_every=args.val_every, max_documents=args.max_documents, max_tokens=args.max_tokens,
                              dtype=args.dtype, root=args.cache, force=args.force)
    except (ValueError, CorruptCacheError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    corpus = load_token_corpus(path, verify=False)
    print(f"{path}: vocab {corpus.vocab_size}, {len(corpus.train):,} train / {len(corpus.val):,} val tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
