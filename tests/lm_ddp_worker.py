"""Run by tests/test_lm_ddp.py, alone or under torchrun: train tiny runs and save each rank's weights.

Each run is (method, optimizer, path); ``layerwise`` is the optimizer path with in-backward steps (under DDP,
through its communication hook: :mod:`golore_lab.optim.layerwise`); each rank takes 2 micro-batches a step
(batch 8 of micro-batches of 2 over 2 ranks). The wrapper runs also save the SubspaceModel's own state (W, P, B, step).
"""
from __future__ import annotations

import os
import sys

import torch

from golore_lab.lm.data import load_corpus
from golore_lab.lm.model import LlamaConfig
from golore_lab.lm.pretrain import LMTask, recipe
from golore_lab.lm.train import train

RUNS = [("golore@50", "adamw", "optimizer"), ("lb-galore", "sgd", "optimizer"),
        ("golore@50", "adamw", "wrapper"), ("lb-galore", "sgd", "wrapper"),
        ("golore@50", "adamw", "layerwise"), ("lb-galore", "sgd", "layerwise"), ("galore", "adamw", "layerwise"),
        ("full", "adamw", "layerwise")]


def run_name(method: str, optimizer: str, path: str) -> str:
    return f"{method}-{optimizer}" + ("" if path == "optimizer" else f"-{path}")


def main(corpus_path: str, out: str) -> None:
    torch.set_num_threads(1)
    task = LMTask(load_corpus(corpus_path), LlamaConfig.preset("tiny"), seq_len=32, eval_windows=4)
    rank = int(os.environ.get("RANK", "0"))
    for method, optimizer, path in RUNS:
        where = dict(layerwise=True, grad_clip=0.0) if path == "layerwise" else dict(path=path)
        cfg = recipe("tiny", method=method, optimizer=optimizer, **where, steps=6, warmup_steps=1, update_proj_gap=2,
                     rank=4, batch_size=8, micro_batch_size=2, eval_every=6, progress=False)
        result = train(task, cfg)
        name = run_name(method, optimizer, path)
        torch.save(result.model.state_dict(), os.path.join(out, f"{name}-rank{rank}.pt"))
        if result.wrapped is not None:
            torch.save(result.wrapped.state_dict(), os.path.join(out, f"{name}-rank{rank}-wrapper.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
