"""``python -m golore_lab pretrain``: pre-train a LLaMA on real text with Full, GaLore, GoLore@x% or L.B. GaLore.

The paper's recipe (LLaMA-60M on C4: seq 256, batch 512, lr 1e-3 cosine with 1k warm-up, clip 1, rank 128 of
512, tau = 200 of 10k steps, GoLore@20%) scaled to a 2-core CPU (``--model cpu``, the default):

=====================  =========================  ===========================================
                       paper                      CPU preset (this package)
=====================  =========================  ===========================================
model                  d 512, 8 layers, 8 heads    d 128, 4 layers, 4 heads, MLP 344
data / tokenizer       C4, T5 (32k)               Shakespeare + BBC News, byte-level BPE 4k
tokens per step        512 x 256                  8 x 128
steps, warm-up         10k, 1k                    160, 16
rank / dim, tau        128 / 512, 200             32 / 128, 16 (same r/d; T/tau 50 -> 10)
=====================  =========================  ===========================================

``--model late`` is a smaller model trained much longer with a tiny batch (d 64, 2 layers, 2 heads, MLP 172,
context 32; batch 2 x 32 tokens, 6000 steps, warm-up 300, rank 16 of 64, tau 100): late in training the SVD of
one batch captures clearly less of the true gradient than early on, the regime GoLore@auto is about
(``golore_lab.artefacts.fig6_when_to_switch``).

Runs unchanged under ``torchrun --standalone --nproc-per-node N`` (DDP; ``--batch-size`` is global). Examples::

    python -m golore_lab pretrain --method golore@20 --optimizer adamw --seed 1 --out runs/golore
    python -m golore_lab pretrain --method lb-galore --optimizer sgd --out runs/lb --stop-at 100
    python -m golore_lab pretrain --method lb-galore --optimizer sgd --out runs/lb --resume
    torchrun --standalone --nproc-per-node 2 -m golore_lab pretrain --method galore --out runs/ddp
    torchrun --standalone --nproc-per-node 2 -m golore_lab pretrain --method galore --path wrapper --out runs/w
    torchrun --standalone --nproc-per-node 2 -m golore_lab pretrain --method golore@20 --fsdp --out runs/fsdp

``--fsdp`` shards the model with FSDP2 instead of DDP (checkpoint: the folder ``checkpoint/``; see
:mod:`golore_lab.lm.train`).

``--path wrapper`` trains the same matrices through :class:`golore_lab.wrapper.SubspaceModel` and plain torch
optimizers (under DDP only the low-rank factors are all-reduced between refreshes); ``checkpoint.pt``'s
``"model"`` then holds the merged weights, loadable into the plain LLaMA.

``--layerwise`` takes each parameter's step in the backward pass and frees its gradient
(:mod:`golore_lab.optim.layerwise`; one process; clipping off by default, the global clip being impossible
in-backward), ``--checkpoint-activations`` recomputes each block in the backward: with both, GoLore trains the
LLaMA-1B widths (``--model 1b``, GaLore's llama_1b: d 2048, MLP 5461, 24 layers, 32 heads) on a 24 GiB CPU
machine, a few steps::

    python -m golore_lab pretrain --model 1b --method golore@100 --layerwise --checkpoint-activations \
        --steps 3 --warmup-steps 0 --batch-size 1 --eval-windows 1 --out runs/1b

``--model 60m`` with its batch of 512 needs more memory than a CPU machine has for one micro-batch of 512: the
program then accumulates smaller micro-batches (same batch; it says so), or refuses naming the size it needs
(:mod:`golore_lab.lm.memory`). Exit status: 0 done; 1 the run stopped (divergence -- a non-finite loss or
perplexity, or a loss above ``DIVERGENCE_FACTOR`` times its start --, a damaged checkpoint or metrics file, a
read-only or full disk, a folder in use; the message says what is kept); 2 bad options; 130 / 143 stopped by
SIGINT / SIGTERM between two steps, after the checkpoint of the last one (``--resume`` continues).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import DEFAULT_VOCAB, Corpus, ensure_corpus
from .memory import llama_activation_bytes
from .model import LlamaConfig, build_model, llama_param_groups
from .config import positive_int, run_program, thread_count
from .metrics import json_row
from .train import TrainConfig, add_train_arguments, stream_indices, train

#: Learning rates of the CPU preset: the best of {1e-3, 3e-3, 1e-2} (AdamW) and {0.1, 0.3, 1, 3} (SGD) for
#: full training over 100 steps, then used for every method.
DEFAULT_LR = {"adamw": 3e-3, "sgd": 0.3}


def recipe(model: str = "cpu", **overrides) -> TrainConfig:
    """The scaled-down paper recipe for a model preset (the CLI defaults and the figure's runs)."""
    base = {
        "tiny": dict(steps=40, batch_size=8, warmup_steps=4, rank=8, update_proj_gap=5, eval_every=10, log_every=5),
        "cpu": dict(steps=160, batch_size=8, warmup_steps=16, rank=32, update_proj_gap=16, eval_every=16, log_every=4),
        "late": dict(steps=6000, batch_size=2, warmup_steps=300, rank=16, update_proj_gap=100, eval_every=500,
                     log_every=50),
        "60m": dict(steps=10_000, batch_size=512, warmup_steps=1000, rank=128, update_proj_gap=200, eval_every=500,
                    log_every=10),
        # GaLore's LLaMA-350M and LLaMA-1B recipes (its ranks 256 and 512); on a CPU only a few steps, e.g.
        # --steps 3 --warmup-steps 0 --batch-size 1 --layerwise --checkpoint-activations
        "350m": dict(steps=60_000, batch_size=512, warmup_steps=6000, rank=256, update_proj_gap=200, eval_every=1000,
                     log_every=10),
        "1b": dict(steps=100_000, batch_size=512, warmup_steps=10_000, rank=512, update_proj_gap=200,
                   eval_every=1000, log_every=10),
    }
    if model not in base:
        raise ValueError(f"Unknown model preset: {model!r} (choose from {sorted(base)})")
    if overrides.get("layerwise") and "grad_clip" not in overrides:
        overrides = {**overrides, "grad_clip": 0.0}   # layer-wise steps cannot clip by the global norm
    optimizer = overrides.get("optimizer", "adamw")
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"Invalid optimizer: {optimizer!r} (choose from {', '.join(DEFAULT_LR)})")
    return TrainConfig(**{"lr": DEFAULT_LR[optimizer], **base[model], **overrides})


class LMTask:
    """Next-token prediction on a :class:`~golore_lab.lm.data.Corpus` (implements ``train.Task``).

    Training examples are the non-overlapping windows ``tokens[k T : k T + T + 1]`` (T = ``seq_len``) visited
    in a seeded order (:func:`~golore_lab.lm.train.stream_indices`); the loss is the mean cross-entropy of the
    T next-token predictions. Evaluation is the mean loss on ``eval_windows`` validation windows spread evenly
    over the validation split (so both sources are represented; the same tokens for every method and seed) and
    its perplexity exp(loss) (inf when exp overflows, as it does once a run has diverged).
    """

    def __init__(self, corpus: Corpus, model_cfg: LlamaConfig, seq_len: int | None = None,
                 eval_windows: int = 48, eval_batch: int = 16):
        self.model_cfg = replace(model_cfg, vocab_size=corpus.vocab_size)
        self.seq_len = model_cfg.max_seq_len if seq_len is None else seq_len
        if not 1 <= self.seq_len <= self.model_cfg.max_seq_len:
            raise ValueError(f"Invalid seq_len: {self.seq_len} (must be in [1, max_seq_len = {model_cfg.max_seq_len}])")
        self.train_tokens = torch.from_numpy(corpus.train.astype(np.int64))
        self.val_tokens = torch.from_numpy(corpus.val.astype(np.int64))
        self.n_train = (len(self.train_tokens) - 1) // self.seq_len
        n_val = (len(self.val_tokens) - 1) // self.seq_len
        if eval_windows < 1 or eval_windows > n_val:
            raise ValueError(f"Invalid eval_windows: {eval_windows} (validation has {n_val} windows of {self.seq_len})")
        self.eval_windows, self.eval_batch = eval_windows, eval_batch
        self.corpus_files = dict(corpus.manifest.get("files", {}))
        self._eval_starts = torch.linspace(0, n_val - 1, eval_windows).round().long() * self.seq_len
        self._offsets = torch.arange(self.seq_len + 1)

    def build_model(self, seed: int) -> nn.Module:
        return build_model(self.model_cfg, seed)

    def options(self) -> dict:
        """The model's shape, the sequence length, the evaluation windows and the corpus (its files' sha256)."""
        return {"model": asdict(self.model_cfg), "seq_len": self.seq_len, "eval_windows": self.eval_windows,
                "eval_batch": self.eval_batch, "corpus": self.corpus_files}

    def activation_bytes(self, micro_batch: int, checkpoint: bool = False) -> int:
        c = self.model_cfg
        return llama_activation_bytes(c.dim, c.n_layers, c.hidden_dim, c.vocab_size, micro_batch, self.seq_len,
                                      eval_batch=min(self.eval_batch, self.eval_windows), checkpoint=checkpoint)

    def param_groups(self, model: nn.Module, **subspace) -> list[dict]:
        return llama_param_groups(model, **subspace)

    def batch(self, start: int, count: int, seed: int) -> torch.Tensor:
        """(count, T + 1) token windows at stream positions start .. start + count - 1."""
        starts = stream_indices(start, count, self.n_train, seed) * self.seq_len
        return self.train_tokens[starts[:, None] + self._offsets]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def count_tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for first in range(0, self.eval_windows, self.eval_batch):
            starts = self._eval_starts[first:first + self.eval_batch]
            windows = self.val_tokens[starts[:, None] + self._offsets].to(next(model.parameters()).device)
            logits = model(windows[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"))
            count += windows[:, 1:].numel()
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf}


#: the TrainConfig fields whose default is the model preset's recipe (resolved after parsing)
RECIPE_FIELDS = frozenset(f.name for f in fields(TrainConfig)) - {"method", "optimizer", "path"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m golore_lab pretrain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="cpu", choices=["tiny", "cpu", "late", "60m", "350m", "1b"],
                        help="model preset and recipe")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per example (default: the preset's)")
    parser.add_argument("--eval-windows", type=positive_int, default=48, help="validation windows per evaluation")
    parser.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB, help="BPE vocabulary of the corpus")
    parser.add_argument("--cache", type=Path, default=None, help="data cache root (default: $GOLORE_LAB_CACHE)")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (CPU)")
    add_train_arguments(parser, deferred=RECIPE_FIELDS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    try:
        cfg = recipe(args.model, **given)
        corpus = ensure_corpus(args.cache, args.vocab_size, log=lambda m: print(m, file=sys.stderr))
        task = LMTask(corpus, LlamaConfig.preset(args.model), seq_len=args.seq_len, eval_windows=args.eval_windows)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    status, result = run_program(parser, lambda: train(task, cfg))
    if status == 0 and result.final and int(os.environ.get("RANK", "0")) == 0:
        print(json_row({"step": result.step, **result.final}))
    return status
