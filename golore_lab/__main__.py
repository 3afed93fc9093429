"""Command line of golore_lab: ``python -m golore_lab <command> ...``.

Each command lives in its own module and exposes ``main(argv) -> int``; this file only dispatches,
importing the module lazily so that ``python -m golore_lab figures`` does not import the LM stack.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "figures": ("golore_lab.figures", "regenerate every figure into figures/ (cached results unless --force)"),
    "notebooks": ("golore_lab.nbexec", "execute the notebooks in place (committed executed; --check: are they current?)"),
    "demo": ("golore_lab.demo", "train a small model with each algorithm and print the results"),
    "prepare": ("golore_lab.lm.data", "fetch and prepare the text corpora and tokenizer (offline afterwards)"),
    "pretrain": ("golore_lab.lm.pretrain", "pre-train a LLaMA on real text (torchrun-ready)"),
    "finetune": ("golore_lab.lm.finetune", "fine-tune all-MiniLM-L6-v2 on a text-classification task"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: python -m golore_lab <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
