"""Run by tests/test_lm_fsdp.py, alone (``--no-fsdp``: the one-process reference) or under torchrun with FSDP.

``lm_fsdp_worker.py CORPUS OUT [--no-fsdp] [--split]``: trains every run of :data:`RUNS` into ``OUT/<name>`` and
saves each rank's final weights and logged rows to ``OUT/<name>-rank<r>.pt``. With FSDP it also trains
:data:`RESUMED` up to ``STOP_AT`` and resumes it (``OUT/<name>-resumed-rank<r>.pt``). ``--split`` halves the
micro-batch (the same examples summed in another order): the tests' perturbation.

The ``layerwise`` runs take each parameter's step in FSDP2's hooks on its reduce-scattered shard (2 micro-batches
per rank, no clipping). Every run projects the right side (``proj_type="right"``): what ``"std"`` picks for every row-sharded matrix,
whereas one process with ``"std"`` projects the smaller side, another algorithm for wide matrices.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from golore_lab.lm.data import load_corpus
from golore_lab.lm.model import LlamaConfig
from golore_lab.lm.pretrain import LMTask, recipe
from golore_lab.lm.train import train

RUNS = [("galore", "adamw"), ("golore@100", "adamw"), ("golore@50", "adamw"),
        ("golore@50", "adamw", "layerwise"), ("lb-galore", "sgd", "layerwise")]   # layer-wise: no clipping
RESUMED = ("golore@50", "adamw")  # SVD refreshes before the stop, random ones after
STEPS, STOP_AT, GRAD_CLIP = 6, 3, 0.5  # the clip binds (the gradient norm is above it at every step)


def make_task(corpus_path) -> LMTask:
    return LMTask(load_corpus(corpus_path), LlamaConfig.preset("tiny"), seq_len=32, eval_windows=4)


def config(method: str, optimizer: str, fsdp: bool, out: Path, split: bool = False, **overrides):
    micro = 1 if split else 2
    return recipe("tiny", method=method, optimizer=optimizer, fsdp=fsdp, steps=STEPS, warmup_steps=1,
                  update_proj_gap=2, rank=4, batch_size=8, micro_batch_size=micro, eval_every=3, log_every=1,
                  **{"grad_clip": GRAD_CLIP, **overrides}, proj_type="right", progress=False, out_dir=str(out))


def save(result, path: Path) -> None:
    torch.save({"weights": result.model.state_dict(), "history": result.history}, path)


def main(corpus_path: str, out: str, *flags: str) -> None:
    torch.set_num_threads(1)
    fsdp, split = "--no-fsdp" not in flags, "--split" in flags
    out = Path(out)
    task = make_task(corpus_path)
    rank = int(os.environ.get("RANK", "0"))
    for method, optimizer, *how in RUNS:
        name = "-".join([method, optimizer, *how])
        extra = dict(layerwise=True, grad_clip=0.0) if how else {}
        save(train(task, config(method, optimizer, fsdp, out / name, split, **extra)), out / f"{name}-rank{rank}.pt")
    if fsdp:
        name = "-".join(RESUMED) + "-resumed"
        train(task, config(*RESUMED, fsdp, out / name, stop_at=STOP_AT))
        save(train(task, config(*RESUMED, fsdp, out / name, resume=True)), out / f"{name}-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
