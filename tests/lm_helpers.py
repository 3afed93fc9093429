"""Shared helpers of the LM tests: a small real-text corpus built from the committed fixture."""
from __future__ import annotations

from pathlib import Path

FIXTURE = Path(__file__).parent / "data" / "shakespeare_excerpts.txt"
VOCAB = 320


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
