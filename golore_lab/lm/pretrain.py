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
read-only or full disk, a folder in use; the message says what is kept); 2 bad options; 3 a ``--recipe`` this
machine cannot run (its inputs are missing, a step does not fit in memory, or the measured time per step times
the steps exceeds ``--max-hours``: the plan printed says which, :mod:`golore_lab.lm.recipes`); 130 / 143 stopped
by SIGINT / SIGTERM between two steps, after the checkpoint of the last one (``--resume`` continues).

The user's data and model: ``--data PATH_OR_NAME`` (text, JSON Lines -- C4's own ``.json.gz`` shards --, Parquet,
or a ``datasets`` name) with ``--tokenizer NAME_OR_PATH`` (any Hugging Face tokenizer, or the package's BPE), and
``--val-data`` / ``--val-split``, ``--text-field``, ``--data-config``: tokenized once into the cache
(:mod:`golore_lab.lm.corpus`), read through a memory map. ``--model-config NAME_OR_PATH`` takes the model's shape
from a Hugging Face LLaMA ``config.json`` (or one of :data:`golore_lab.lm.configs.PAPER_CONFIGS`), vocabulary
included (the corpus' largest token id must fit). ``--recipe paper-60m`` (``paper-130m``, ``paper-350m``,
``paper-1b``) is the authors' pre-training command (:mod:`golore_lab.lm.recipes`)::

    python -m golore_lab pretrain --recipe paper-60m --plan-only      # what it needs here; starts nothing
    python -m golore_lab pretrain --recipe paper-60m --prepare-only   # tokenize C4 once
    torchrun --standalone --nproc-per-node 2 -m golore_lab pretrain --recipe paper-60m --out runs/60m
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
from .config import finite_float, positive_int, run_program, thread_count
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

    The token arrays stay as they are given (a memory map for a prepared corpus): each batch reads only its own
    windows and converts them to int64, so a corpus of billions of tokens is never materialised in memory.
    ``keep_vocab``: the model's vocabulary is ``model_cfg``'s (a ``--model-config``), checked against the
    corpus' largest token id; otherwise it is the corpus'. ``source``: what the corpus was made from (recorded
    in :meth:`options` when given, so a resume with other data names it).
    """

    def __init__(self, corpus: Corpus, model_cfg: LlamaConfig, seq_len: int | None = None,
                 eval_windows: int = 48, eval_batch: int = 16, keep_vocab: bool = False,
                 source: dict | None = None):
        if keep_vocab:
            from .configs import check_vocabulary

            check_vocabulary(model_cfg, max_token_id(corpus), source=f"the corpus {corpus.path}")
            self.model_cfg = model_cfg
        else:
            self.model_cfg = replace(model_cfg, vocab_size=corpus.vocab_size)
        self.seq_len = model_cfg.max_seq_len if seq_len is None else seq_len
        if not 1 <= self.seq_len <= self.model_cfg.max_seq_len:
            raise ValueError(f"Invalid seq_len: {self.seq_len} (must be in [1, max_seq_len = {model_cfg.max_seq_len}])")
        self.train_tokens, self.val_tokens = corpus.train, corpus.val
        self.n_train = (len(self.train_tokens) - 1) // self.seq_len
        if self.n_train < 1:
            raise ValueError(f"Invalid seq_len: {self.seq_len} (the training split has {len(self.train_tokens)} "
                             "tokens, not one window)")
        n_val = (len(self.val_tokens) - 1) // self.seq_len
        if eval_windows < 1 or eval_windows > n_val:
            raise ValueError(f"Invalid eval_windows: {eval_windows} (validation has {n_val} windows of {self.seq_len})")
        self.eval_windows, self.eval_batch = eval_windows, eval_batch
        self.corpus_files = dict(corpus.manifest.get("files", {}))
        self.source = source
        self._eval_starts = torch.linspace(0, n_val - 1, eval_windows).round().long() * self.seq_len
        self._offsets = torch.arange(self.seq_len + 1)

    def _windows(self, tokens, starts: torch.Tensor) -> torch.Tensor:
        index = (starts[:, None] + self._offsets).numpy()
        return torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))

    def build_model(self, seed: int) -> nn.Module:
        return build_model(self.model_cfg, seed)

    def options(self) -> dict:
        """The model's shape, the sequence length, the evaluation windows and the corpus (its files' sha256)."""
        out = {"model": asdict(self.model_cfg), "seq_len": self.seq_len, "eval_windows": self.eval_windows,
               "eval_batch": self.eval_batch, "corpus": self.corpus_files}
        return {**out, "data": self.source} if self.source else out

    def activation_bytes(self, micro_batch: int, checkpoint: bool = False) -> int:
        c = self.model_cfg
        return llama_activation_bytes(c.dim, c.n_layers, c.hidden_dim, c.vocab_size, micro_batch, self.seq_len,
                                      eval_batch=min(self.eval_batch, self.eval_windows), checkpoint=checkpoint)

    def param_groups(self, model: nn.Module, **subspace) -> list[dict]:
        return llama_param_groups(model, **subspace)

    def batch(self, start: int, count: int, seed: int) -> torch.Tensor:
        """(count, T + 1) token windows at stream positions start .. start + count - 1."""
        return self._windows(self.train_tokens, stream_indices(start, count, self.n_train, seed) * self.seq_len)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def count_tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for first in range(0, self.eval_windows, self.eval_batch):
            starts = self._eval_starts[first:first + self.eval_batch]
            windows = self._windows(self.val_tokens, starts).to(next(model.parameters()).device)
            logits = model(windows[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"))
            count += windows[:, 1:].numel()
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf}


def max_token_id(corpus: Corpus) -> int:
    """The largest token id of a corpus: its manifest's ``max_token_id`` (a prepared corpus), else the arrays'."""
    if "max_token_id" in corpus.manifest:
        return int(corpus.manifest["max_token_id"])
    return int(max(corpus.train.max(initial=0), corpus.val.max(initial=0)))


#: the TrainConfig fields whose default is the model preset's recipe (resolved after parsing)
RECIPE_FIELDS = frozenset(f.name for f in fields(TrainConfig)) - {"method", "optimizer", "path"}


#: program options a recipe sets (besides the TrainConfig fields), with their value when neither gives one
DATA_OPTIONS = {"data": None, "text_field": "text", "data_config": None, "val_data": None, "val_split": None,
                "tokenizer": None, "max_tokens": None, "max_documents": None, "max_val_documents": None,
                "model_config": None, "seq_len": None, "eval_windows": 48}


def build_parser() -> argparse.ArgumentParser:
    from .recipes import MAX_HOURS, PRETRAIN_RECIPES

    parser = argparse.ArgumentParser(prog="python -m golore_lab pretrain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="cpu", choices=["tiny", "cpu", "late", "60m", "350m", "1b"],
                        help="model preset and recipe")
    parser.add_argument("--recipe", default=None, choices=sorted(PRETRAIN_RECIPES),
                        help="the authors' pre-training command (golore_lab.lm.recipes); explicit options override "
                             "its values; checked against this machine before it starts")
    parser.add_argument("--model-config", default=None, metavar="NAME_OR_PATH",
                        help="a Hugging Face LLaMA config.json, or llama_60m / llama_130m / llama_350m / llama_1b; "
                             "the vocabulary is the config's (checked against the corpus)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="tokens per example (default: the preset's)")
    parser.add_argument("--eval-windows", type=positive_int, default=None,
                        help="validation windows per evaluation (default: 48, or the recipe's)")
    data = parser.add_argument_group("data (default: the built-in corpus, Shakespeare + BBC News, package BPE)")
    data.add_argument("--data", default=None, metavar="PATH_OR_NAME",
                      help="text / JSON Lines (.gz: C4 shards) / Parquet files, a folder or glob, or a Hugging Face "
                           "datasets name (golore_lab.lm.corpus); tokenized once into the cache")
    data.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                      help="with --data: bpe, bpe:V, or any transformers tokenizer name or folder (default: bpe)")
    data.add_argument("--text-field", default=None, help="JSON / Parquet field holding the text (default: text)")
    data.add_argument("--data-config", default=None, help="datasets configuration (en for allenai/c4)")
    data.add_argument("--val-data", default=None, metavar="PATH_OR_NAME",
                      help="validation files (default: every 20th document of --data)")
    data.add_argument("--val-split", default=None, help="datasets split for validation (validation for C4)")
    data.add_argument("--max-tokens", type=positive_int, default=None, help="stop reading --data at this many tokens")
    data.add_argument("--max-documents", type=positive_int, default=None, help="read at most this many documents")
    data.add_argument("--max-val-documents", type=positive_int, default=None,
                      help="read at most this many validation documents (default: --max-documents)")
    parser.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB,
                        help="BPE vocabulary of the built-in corpus")
    parser.add_argument("--cache", type=Path, default=None, help="data cache root (default: $GOLORE_LAB_CACHE)")
    parser.add_argument("--threads", type=thread_count, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--max-hours", type=finite_float, default=MAX_HOURS,
                        help="a recipe estimated to take longer here is not started (exit status 3)")
    parser.add_argument("--plan-only", action="store_true",
                        help="with --recipe: print what the run needs here (inputs, memory, time) and exit")
    parser.add_argument("--prepare-only", action="store_true",
                        help="tokenize the corpus into the cache (as the run would) and exit")
    # method, optimizer and path too: a --recipe sets them (without one they are TrainConfig's defaults)
    add_train_arguments(parser, deferred=frozenset(f.name for f in fields(TrainConfig)))
    return parser


def resolve(args) -> tuple[TrainConfig, dict]:
    """The run's TrainConfig and data options: explicit options, else the recipe's, else the preset's."""
    from .recipes import PRETRAIN_RECIPES

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.recipe:
        chosen = PRETRAIN_RECIPES[args.recipe]
        cfg = TrainConfig(**{**chosen["train"], **given})
    else:
        chosen = {}
        cfg = recipe(args.model, **given)
    options = {}
    for name, default in DATA_OPTIONS.items():
        value = getattr(args, name)
        options[name] = value if value is not None else chosen.get(name, default)
    if options["tokenizer"] is not None and options["data"] is None:
        raise ValueError(f"Invalid tokenizer: {options['tokenizer']!r} without --data (the built-in corpus has its "
                         "own BPE; --vocab-size sets its size)")
    return cfg, options


def model_config(args, options: dict) -> tuple[LlamaConfig, bool]:
    """The model's shape and whether its vocabulary is its own (a --model-config) rather than the corpus'."""
    if options["model_config"] is None:
        return LlamaConfig.preset(args.model), False
    from .configs import llama_config, load_model_config, max_positions

    hf = load_model_config(options["model_config"])
    seq = options["seq_len"] or min(LlamaConfig.preset(args.model).max_seq_len, max_positions(hf))
    return llama_config(hf, max_seq_len=seq), True


def load_data(args, options: dict, progress: bool):
    """The corpus of the run: --data prepared (once) into the cache, or the built-in one."""
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if options["data"] is None:
        return ensure_corpus(args.cache, args.vocab_size, log=log), None
    import fcntl

    from .corpus import load_token_corpus, prepare_corpus
    from .fetch import cache_root

    # Under torchrun every rank gets here: the first to take the lock tokenizes, the others then find the cache.
    lock = Path(args.cache or cache_root()) / "corpora" / ".prepare.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        path = prepare_corpus(options["data"], options["tokenizer"] or "bpe", text_field=options["text_field"],
                              config=options["data_config"], val_data=options["val_data"],
                              val_split=options["val_split"], max_documents=options["max_documents"],
                              max_tokens=options["max_tokens"], max_val_documents=options["max_val_documents"],
                              root=args.cache, progress=progress, log=log)
    source = {k: options[k] for k in ("data", "tokenizer", "text_field", "data_config", "val_data", "val_split")
              if options[k] is not None}
    return load_token_corpus(path), source


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        cfg, options = resolve(args)
        model_cfg, keep_vocab = model_config(args, options)
        if args.recipe:
            from .recipes import CANNOT_RUN, corpus_token_budget, pretrain_plan

            if options["max_tokens"] is None and options["data"] is not None and options["val_split"] is not None:
                options["max_tokens"] = corpus_token_budget(cfg.steps, cfg.batch_size, options["seq_len"]
                                                            or model_cfg.max_seq_len)
        if args.recipe and not args.prepare_only:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                from .train import _distributed

                _distributed(cfg.fsdp)  # the ranks agree on the plan's measured time
            plan = pretrain_plan(args.recipe, cfg, options, model_cfg, args.max_hours)
            if int(os.environ.get("RANK", "0")) == 0:
                print(plan.describe(), file=sys.stderr)
            if args.plan_only or plan.blockers():
                return CANNOT_RUN if plan.blockers() else 0
        elif args.plan_only:
            raise ValueError("Invalid plan_only: True without --recipe")
        corpus, source = load_data(args, options, cfg.progress)
        if args.prepare_only:
            print(f"{corpus.path}: vocab {corpus.vocab_size}, {len(corpus.train):,} train / {len(corpus.val):,} "
                  "val tokens")
            return 0
        task = LMTask(corpus, model_cfg, seq_len=options["seq_len"], eval_windows=options["eval_windows"],
                      keep_vocab=keep_vocab, source=source)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    status, result = run_program(parser, lambda: train(task, cfg))
    if status == 0 and result.final and int(os.environ.get("RANK", "0")) == 0:
        print(json_row({"step": result.step, **result.final}))
    return status
