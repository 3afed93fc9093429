"""Run by tests/test_lm_train.py, alone or under torchrun: train two tiny runs and save each rank's weights."""
from __future__ import annotations

import os
import sys

import torch

from golore_lab.lm.data import load_corpus
from golore_lab.lm.model import LlamaConfig
from golore_lab.lm.pretrain import LMTask, recipe
from golore_lab.lm.train import train

RUNS = [("golore", "adamw"), ("lb-galore", "sgd")]


def main(corpus_path: str, out: str) -> None:
    torch.set_num_threads(1)
    task = LMTask(load_corpus(corpus_path), LlamaConfig.preset("tiny"), seq_len=32, eval_windows=4)
    rank = int(os.environ.get("RANK", "0"))
    for method, optimizer in RUNS:
        cfg = recipe("tiny", method=method, optimizer=optimizer, steps=6, warmup_steps=1, update_proj_gap=2, rank=4,
                     batch_size=8, micro_batch_size=2, switch_fraction=0.5, eval_every=6, progress=False)
        result = train(task, cfg)
        torch.save(result.model.state_dict(), os.path.join(out, f"{method}-{optimizer}-rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
