"""A generic training loop for Full, GaLore, GoLore@x% and large-batch GaLore, shared by pre-training and fine-tuning.

What differs between experiments is a :class:`Task` (model, data stream, loss, evaluation); everything the
paper holds fixed across methods lives here, so that methods differ *only* in the optimizer:

* optimizer: ``method`` in {full, galore, golore@X, golore@auto, lb-galore} (:mod:`golore_lab.methods`) x
  ``optimizer`` in {adamw, sgd (heavy-ball)} (:func:`make_optimizer`). GoLore@X% is SVD projections for steps
  t < K and random ones from K on, with K = round((1 - X/100) * T); GoLore@auto switches each matrix on its
  own when the optimizer's test finds its SVD subspace noise-dominated (``switch_step="auto"``; not with
  ``fsdp``); L.B. GaLore is GaLore fed ``refresh_batch_factor`` times
  the batch at refresh steps (``microbatches(opt, base, refresh)``), for both the SVD and that step;
* learning rate eta_t = lr * s(t): linear warm-up over ``warmup_steps``, then cosine (or linear) decay to
  ``min_lr_ratio * lr`` at step T (:func:`lr_factor`);
* clipping of the *full* gradient, ``||G||_F <= grad_clip`` over all parameters, before the optimizer sees it
  (with ``path="wrapper"``: of the gradients the torch optimizer sees, i.e. the factors' P^T G, norm <= ||G||,
  :meth:`golore_lab.wrapper.SubspaceModel.clip_grad_norm_`);
* ``path``: ``"optimizer"`` (default) trains the task's model with ``SubspaceAdamW`` / ``SubspaceSGD``;
  ``"wrapper"`` wraps the same matrices (the task's first parameter group) with
  :class:`golore_lab.wrapper.SubspaceModel` and trains its low-rank factors and the full parameters with plain
  ``torch.optim.AdamW`` / ``torch.optim.SGD``, calling its refresh protocol (GoLore's random refreshes before the
  forward, SVD ones after backward; L.B. GaLore's larger batch when ``refresh_due()``). Same algorithm, same
  seeds; under DDP only the factors are all-reduced between refreshes. Checkpoints hold the merged weights
  under ``"model"`` (a plain state dict of the task's architecture) and the wrapper's own state for resuming;
* gradient accumulation: a step averages ``n_micro`` micro-batches of ``micro_batch_size`` examples per rank;
  left unset, the micro-batch is the rank's whole share of the batch unless the step's estimated memory
  (:mod:`golore_lab.lm.memory`) exceeds what the machine has, in which case the largest one that fits is used;
* DDP through ``torchrun`` (``torch.distributed`` initialised from its environment variables; gloo on CPU).
  Rank k of W takes examples ``[p + (i W + k) m, p + (i W + k + 1) m)`` of micro-step i, so a run on W ranks
  sees exactly the examples a 1-rank run with the same global batch sees;
* FSDP2 with ``fsdp`` (under ``torchrun``, at any world size; path "optimizer"): the model is sharded with
  :func:`golore_lab.distributed.shard_model` before the optimizer's groups are built, each rank takes its rows of
  every batch as under DDP, gradients are reduce-scattered at every micro-batch, clipping takes the global norm
  of the sharded gradients, every rank evaluates (the forward all-gathers; rank 0 writes), the checkpoint is a
  ``torch.distributed.checkpoint`` folder ``checkpoint/`` (:func:`save_sharded_checkpoint`), and the returned
  model is the plain one with the full weights on every rank;
* data position = number of training examples consumed; a task's example stream is a pure function of
  (seed, index), so a checkpoint (model, optimizer, position, RNG, step) resumes bit-identically;
* evaluation every ``eval_every`` steps (on rank 0), a progress bar with tokens/s, optional bf16 autocast;
* divergence is an error: a non-finite training or validation loss (or gradient) stops the run with
  :class:`RunError`, keeping the last checkpoint.

A run folder (``out_dir``) holds one run (:class:`RunFolder`): ``checkpoint.pt`` (written to a temporary file
and renamed; with ``fsdp`` the folder ``checkpoint/``, written under a temporary name and renamed),
``metrics.jsonl`` and ``metrics.csv`` (one line appended per logged row; on ``resume`` both are rewritten from the
rows up to the checkpoint's step, through a temporary file), ``switches.json`` (GoLore@auto: the optimizer's
``switch_log``, the wrapper's on path "wrapper", at the last checkpoint, rewritten atomically), and ``.lock``,
which one process holds while it trains there. A new run into a folder that holds a run is refused unless
``overwrite`` moves that run aside; ``resume`` refuses a configuration whose result would differ from the
checkpoint's (:data:`RESUME_MAY_CHANGE` lists the options that may change).

Example (see :mod:`golore_lab.lm.pretrain` for a full task)::

    cfg = TrainConfig(method="golore@20", optimizer="adamw", steps=200, batch_size=16, lr=1e-3, rank=32)
    result = train(task, cfg)          # result.history: list of logged rows
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from golore_lab.fileio import append_bytes, atomic_write_text, temporary_path
from golore_lab.methods import Method, parse

from . import memory

OPTIMIZERS = ("adamw", "sgd")
PATHS = ("optimizer", "wrapper")
SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_DIR = "checkpoint"          # with fsdp: a torch.distributed.checkpoint folder, holding STATE too
STATE = "state.pt"
#: GoLore@auto's per-matrix switch records (``switch_log`` of the optimizer, or of the wrapper) in a run folder
SWITCHES = "switches.json"
#: The :class:`TrainConfig` fields a resumed run may change: where it stops, how it is watched and saved, and the
#: device. Every other field, and every option of the task (:meth:`Task.options`), is part of the run's identity
#: (:func:`run_identity`) and must match the checkpoint's, because changing it changes the result.
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "stop_at", "out_dir", "checkpoint_every", "log_every",
                               "progress", "device"})


class RunError(RuntimeError):
    """A run stopped for a reason the user must act on (divergence, a full disk, a folder in use, too little
    memory); the message says what is on disk and what to do."""


class Task(Protocol):
    """What an experiment supplies to :func:`train`. ``seed`` fixes the model init and the example stream."""

    def build_model(self, seed: int) -> nn.Module:
        """A fresh model, initialised from ``seed`` only."""

    def param_groups(self, model: nn.Module, **subspace) -> list[dict]:
        """Parameter groups; the subspace matrices' group gets the ``subspace`` keys (rank, ...)."""

    def batch(self, start: int, count: int, seed: int) -> Any:
        """Examples ``start .. start+count-1`` of the (infinite, seeded) training stream, as tensors."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of ``model`` on ``batch`` (a scalar to back-propagate)."""

    def count_tokens(self, batch: Any) -> int:
        """Tokens (or examples) in ``batch``, for the throughput figure."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics (deterministic, no grad), e.g. ``{"val_loss": .., "val_ppl": ..}``."""

    def options(self) -> dict:
        """Everything besides the :class:`TrainConfig` that the result depends on -- data, model shape,
        evaluation -- as plain JSON values; ``resume`` refuses a task whose options differ from the checkpoint's."""

    def activation_bytes(self, micro_batch: int) -> int:
        """Peak bytes of activations of a training micro-batch of this many examples, or of an evaluation
        batch if that is larger (:mod:`golore_lab.lm.memory`)."""


@dataclass
class TrainConfig:
    """Everything the loop needs besides the task. Invalid values raise ``ValueError`` naming the value."""

    method: str = "full"               # full, galore, golore@X, golore@auto, lb-galore (golore_lab.methods)
    optimizer: str = "adamw"
    path: str = "optimizer"            # "wrapper": SubspaceModel + torch.optim (see the module docstring)
    steps: int = 200
    batch_size: int = 16               # global examples per step (all ranks, all micro-batches)
    micro_batch_size: int | None = None  # examples per rank per micro-batch; default: the largest that fits
    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9              # heavy-ball, as torch.optim.SGD (sgd only)
    dampening: float = 0.0
    nesterov: bool = False
    grad_clip: float = 1.0             # 0 disables; path "wrapper" clips the factors' gradients P^T G
    rank: int = 32
    update_proj_gap: int = 20
    scale: float = 1.0
    proj_type: str = "std"
    refresh_batch_factor: int = 4      # L.B. GaLore: refresh-step batch = factor * batch_size
    state_on_refresh: str = "project"
    eval_every: int = 25
    log_every: int = 5
    checkpoint_every: int = 0          # 0: only at the end (and at stop_at)
    seed: int = 0
    out_dir: str | None = None
    resume: bool = False
    overwrite: bool = False            # a new run into a folder that holds one moves the old run aside
    stop_at: int | None = None         # stop after this step (schedule still uses `steps`); resume later
    bf16: bool = False
    fsdp: bool = False                 # shard the model with FSDP2 under torchrun (path "optimizer" only)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        parse(self.method)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"Invalid {f.name}: {value} (must be a finite number)")
        choices = {"optimizer": OPTIMIZERS, "path": PATHS, "schedule": SCHEDULES, "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r} (choose from {', '.join(allowed)})")
        positive = ["steps", "batch_size", "rank", "update_proj_gap", "eval_every", "log_every", "refresh_batch_factor"]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"Invalid micro_batch_size: {self.micro_batch_size} (must be >= 1)")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"Invalid batch_size: {self.batch_size} (must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size})")
        if not self.lr > 0:
            raise ValueError(f"Invalid lr: {self.lr} (must be > 0)")
        for name in ("warmup_steps", "checkpoint_every", "weight_decay", "grad_clip", "momentum", "dampening"):
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 0)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"Invalid min_lr_ratio: {self.min_lr_ratio} (must be in [0, 1])")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"Invalid betas: {self.betas} (two values in [0, 1))")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"Invalid warmup_steps: {self.warmup_steps} (must be < steps = {self.steps})")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"Invalid stop_at: {self.stop_at} (must be in [1, steps = {self.steps}])")
        if self.resume and self.overwrite:
            raise ValueError("Invalid overwrite: True with resume (resume continues the run in the folder; "
                             "overwrite moves it aside to start a new one)")
        if self.path == "wrapper" and self.spec.full:
            raise ValueError("Invalid path: 'wrapper' with method 'full' (the wrapper trains galore, golore@X and "
                             "lb-galore; full training uses path 'optimizer')")
        if self.path == "wrapper" and self.fsdp:
            raise ValueError("Invalid path: 'wrapper' with fsdp (FSDP2 shards the task's own matrices, which the "
                             "subspace optimizers train directly; use path 'optimizer' with fsdp, or drop fsdp)")
        if self.path == "wrapper" and self.optimizer == "sgd" and self.weight_decay:
            raise ValueError(f"Invalid weight_decay: {self.weight_decay} with path 'wrapper' and optimizer 'sgd' "
                             "(torch.optim.SGD's coupled decay would shrink the factors, not the merged weights; "
                             "use weight_decay 0, optimizer adamw, or path optimizer)")

    @property
    def spec(self) -> Method:
        """The parsed :attr:`method`."""
        return parse(self.method)

    @property
    def switch_step(self) -> int | str | None:
        """K for GoLore@X%: SVD refreshes before step K, random from K on; "auto" for GoLore@auto (None for the
        other methods)."""
        return self.spec.switch_step(self.steps)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Every field of ``cfg`` as plain JSON values (what checkpoints and result caches record)."""
    return json.loads(json.dumps({f.name: getattr(cfg, f.name) for f in fields(cfg)}))


def run_identity(cfg: TrainConfig, task: Task, micro_batch_size: int) -> dict[str, Any]:
    """What a run's result depends on: every field of ``cfg`` but :data:`RESUME_MAY_CHANGE` (with the micro-batch
    the run trains with, chosen or given) and the task's options. A checkpoint records it; ``resume`` compares."""
    train = {k: v for k, v in config_dict(cfg).items() if k not in RESUME_MAY_CHANGE}
    train["micro_batch_size"] = micro_batch_size
    return json.loads(json.dumps({"train": train, "task": task.options()}))


def identity_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``"name: old -> new"`` for every leaf that differs between two :func:`run_identity` dicts."""
    changes = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            changes += identity_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


# ------------------------------------------------------------------------------------- pure pieces
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """s(t) in eta_t = lr * s(t): (t+1)/W for t < W, then cosine / linear decay from 1 to ``min_lr_ratio`` at T.

    cosine: s = m + (1 - m) (1 + cos(pi p)) / 2,  linear: s = m + (1 - m)(1 - p),  p = (t - W) / (T - W).
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def stream_indices(start: int, count: int, n: int, seed: int) -> torch.Tensor:
    """Indices into a dataset of ``n`` examples for positions ``start .. start+count-1`` of an endless stream.

    Position i is example perm_e[i mod n] with e = i // n and perm_e a permutation seeded by (seed, e): every
    epoch visits each example once, and any position is computed in O(1) from (seed, i) -- which is what makes
    the data position a single integer in the checkpoint.
    """
    positions = torch.arange(start, start + count)
    out = torch.empty(count, dtype=torch.long)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        mask = positions.div(n, rounding_mode="floor") == epoch
        out[mask] = _epoch_permutation(n, seed, epoch)[positions[mask] % n]
    return out


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer for ``cfg.method`` x ``cfg.optimizer`` over ``groups`` (subspace keys only in group 0).

    ``full`` is plain ``torch.optim.AdamW`` / ``torch.optim.SGD``; the others are the package's
    ``SubspaceAdamW`` / ``SubspaceSGD`` with SVD projections (``galore``, ``lb-galore``) or SVD until
    :attr:`TrainConfig.switch_step` and random after (``golore@X``). With ``cfg.path == "wrapper"`` the groups are
    :func:`wrap_model`'s (factors, full parameters) and the optimizer is the plain torch one, as for ``full``.
    """
    if cfg.spec.full or cfg.path == "wrapper":
        plain = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in groups]
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(plain, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(plain, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    from golore_lab import SubspaceAdamW, SubspaceSGD

    subspace = dict(projection="svd", switch_step=cfg.switch_step, state_on_refresh=cfg.state_on_refresh, seed=cfg.seed)
    if cfg.optimizer == "adamw":
        return SubspaceAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **subspace)
    return SubspaceSGD(groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                       weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, **subspace)


def micro_steps(opt, base: int, cfg: TrainConfig) -> int:
    """Micro-batches for the next step: ``base``, or ``factor * base`` before an L.B. GaLore refresh.

    ``opt`` is whatever knows the refresh schedule: the subspace optimizer, or the ``SubspaceModel`` of the
    wrapper path (both have ``refresh_due()``).
    """
    if not cfg.spec.large_batch:
        return base
    from golore_lab import microbatches

    return microbatches(opt, base, base * cfg.refresh_batch_factor)


def wrap_model(model: nn.Module, groups: list[dict], cfg: TrainConfig) -> tuple[nn.Module, list[dict]]:
    """The wrapper path's model and groups: ``SubspaceModel`` over the linears whose weights are in ``groups[0]``.

    ``groups`` are the task's optimizer-path groups (subspace matrices first). Each matrix must be the weight of
    an ``nn.Linear``; its layer is wrapped with the subspace keys of ``cfg`` and seeded with the matrix's index in
    the optimizer path's parameter list (so GoLore draws the same bases). Returns the ``SubspaceModel`` and the
    same groups with each matrix replaced by its factor (and each wrapped linear's bias by the wrapper's copy),
    every other key kept -- ready for :func:`make_optimizer`.
    """
    from golore_lab.wrapper import SubspaceModel

    linears = {id(mod.weight): (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    param_names = {id(p): name for name, p in model.named_parameters()}
    flat = [p for group in groups for p in group["params"]]
    positions, old = {}, {}
    for p in groups[0]["params"]:
        if id(p) not in linears:
            name = param_names.get(id(p), tuple(p.shape))
            raise ValueError(f"Invalid path: 'wrapper' wraps nn.Linear layers, but subspace parameter {name!r} is "
                             "not the weight of one (use path 'optimizer')")
        name, mod = linears[id(p)]
        positions[name] = next(i for i, q in enumerate(flat) if q is p)
        old[name] = mod
    wrapped = SubspaceModel(model, rank=cfg.rank, target_modules=list(positions), scale=cfg.scale,
                            update_proj_gap=cfg.update_proj_gap, proj_type=cfg.proj_type, projection="svd",
                            switch_step=cfg.switch_step, state_on_refresh=cfg.state_on_refresh, seed=cfg.seed,
                            positions=positions)
    if set(wrapped.layers) != set(positions):  # target_modules match by substring: check nothing else was caught
        extra = sorted(set(wrapped.layers) - set(positions))
        raise ValueError(f"Invalid path: 'wrapper' would also wrap {extra}, whose weights the task trains in full")
    new = {}
    for name, layer in wrapped.layers.items():
        new[id(old[name].weight)] = layer.factor
        if old[name].bias is not None:
            new[id(old[name].bias)] = layer.bias
    out = [{**group, "params": [new.get(id(p), p) for p in group["params"]]} for group in groups]
    return wrapped, out


@torch.no_grad()
def unwrapped_copy(wrapped: nn.Module) -> nn.Module:
    """A copy of the ``SubspaceModel``'s inner model with every wrapped layer back as an ``nn.Linear`` holding the
    merged weight W + scale·P B: the task's own architecture (``state_dict`` = ``wrapped.merged_state_dict()``)."""
    model = copy.deepcopy(wrapped.model)
    for name, layer in wrapped.layers.items():
        weight = layer.merged_weight()
        linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    device=weight.device, dtype=weight.dtype)   # no init: the global RNG is untouched
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def block_list(model: nn.Module) -> str:
    """The name of the ``nn.ModuleList`` holding most of ``model``'s parameters: its blocks, which FSDP2 shards one
    by one (``layers`` of the LLaMA, ``encoder.encoder.layer`` of the MiniLM classifier)."""
    lists = [(sum(p.numel() for p in module.parameters()), name) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList)]
    if not lists:
        raise ValueError(f"Invalid fsdp: True for a {type(model).__name__}, which has no nn.ModuleList of blocks to "
                         "shard")
    return max(lists)[1]


def full_copy(task: Task, sharded: nn.Module, seed: int, device: torch.device) -> nn.Module:
    """The task's plain model holding the full weights of the FSDP2-sharded ``sharded`` (a collective: every rank
    gets them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    model = task.build_model(seed).to(device)
    model.load_state_dict(weights)
    return model


# ----------------------------------------------------------------------------------------- plumbing
def _distributed(fsdp: bool = False) -> tuple[int, int]:
    """(rank, world); initialises the default process group from torchrun's env vars when WORLD_SIZE > 1, or at
    any world size with ``fsdp`` (FSDP2 shards over a process group, of one rank too); ``fsdp`` without
    torchrun is a ``ValueError``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = all(name in os.environ for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"))
    if fsdp and not dist.is_initialized() and not launched:
        raise ValueError("Invalid fsdp: True without torchrun (FSDP2 shards over a process group: run under "
                         "`torchrun --standalone --nproc-per-node N ...`, or drop --fsdp)")
    if (world > 1 or fsdp) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and os.environ.get("GOLORE_LAB_DEVICE") != "cpu" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _RecordingWriter:
    """The file object ``torch.save`` writes through: keeps the first ``OSError`` of a write, which torch's
    serializer replaces by its own ``RuntimeError`` (a full disk reads ``unexpected pos ...`` otherwise)."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(path: Path, payload: dict, previous_step: int | None = None) -> None:
    """``torch.save`` to a temporary name, fsync, then rename: a crash never leaves a partial checkpoint.

    A failed write removes its temporary file and raises :class:`RunError` saying the previous checkpoint (at
    ``previous_step``, if any) is intact -- for a full disk, "no space left while writing the checkpoint".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    writer = None
    try:
        with open(tmp, "wb") as handle:
            writer = _RecordingWriter(handle)
            torch.save(payload, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        if not isinstance(cause, OSError):
            raise
        kept = (f"the previous checkpoint at step {previous_step} is intact ({path})" if previous_step is not None
                else f"no earlier checkpoint exists in {path.parent}")
        what = ("no space left while writing the checkpoint" if cause.errno == errno.ENOSPC
                else f"writing the checkpoint failed ({cause})")
        raise RunError(f"{what}; {kept}") from err


def saved_state(out_dir: Path) -> Path | None:
    """The file holding a run's non-tensor state: ``checkpoint.pt``, or ``checkpoint/state.pt`` of an fsdp run (or
    of the previous fsdp checkpoint, if a kill came between the two renames of :func:`save_sharded_checkpoint`;
    :meth:`RunFolder.recover` puts it back). None when the folder holds no checkpoint."""
    for path in (out_dir / CHECKPOINT, out_dir / CHECKPOINT_DIR / STATE, RunFolder(out_dir).replaced / STATE):
        if path.exists():
            return path
    return None


def save_sharded_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, payload: dict,
                            step: int, previous_step: int | None = None) -> None:
    """The fsdp checkpoint, a collective: a ``torch.distributed.checkpoint`` folder ``path`` holding the model's
    and the optimizer's state dicts (``get_state_dict``: each rank writes its shards) and :data:`STATE`, the
    non-tensor ``payload`` (rank 0's ``torch.save``).

    Written under a temporary name (``.checkpoint.<step>.tmp``, the same on every rank); once every rank's shards
    are written, rank 0 adds :data:`STATE` and renames: the old folder to ``.checkpoint.old``, the new one into
    place, then deletes the old. A kill between the two renames leaves the old checkpoint whole under
    ``.checkpoint.old``, which the next run puts back (:meth:`RunFolder.recover`). A failed write raises
    :class:`RunError` saying the previous checkpoint is intact.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{step}.tmp")
    leader = dist.get_rank() == 0

    def failed(err: BaseException) -> RunError:
        if leader:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = (f"the previous checkpoint at step {previous_step} is intact ({path})" if previous_step is not None
                else f"no earlier checkpoint exists in {path.parent}")
        return RunError(f"writing the checkpoint failed ({err}); {kept}")

    model_state, optim_state = get_state_dict(model, opt)
    try:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    except Exception as err:  # every rank: DCP gathers the ranks' failures
        raise failed(err) from err
    if leader:
        try:
            save_checkpoint(tmp / STATE, payload)
        except RunError as err:
            raise failed(err.__cause__ or err) from err
        old = RunFolder(path.parent).replaced
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def load_sharded_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load the model's and the optimizer's state of :func:`save_sharded_checkpoint`'s folder ``path`` (a
    collective; at another world size the shards are re-cut)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class RunFolder:
    """The folder of one run: :data:`RUN_FILES`, and ``.lock``, held (``fcntl.flock``) by the process training there.

    ``lock()`` refuses a second process naming the first; ``stale_temporaries()`` are the hidden temporary files
    that killed writers left behind (safe to delete once the lock is held); ``move_aside()`` moves the run files
    to a sibling folder ``<name>.replaced-<time>`` and returns it.
    """

    RUN_FILES = (CHECKPOINT, CHECKPOINT_DIR, "metrics.jsonl", "metrics.csv", SWITCHES, "test_metrics.json")
    LOCK = ".lock"

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{self.path} is in use by another run (process {holder}); wait for it to end, or "
                           "choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    @property
    def replaced(self) -> Path:
        """Where :func:`save_sharded_checkpoint` keeps the previous checkpoint folder between its two renames."""
        return self.path / f".{CHECKPOINT_DIR}.old"

    def recover(self) -> bool:
        """Put back the previous fsdp checkpoint a kill left under :attr:`replaced` (True), or delete it if the new
        one is in place."""
        if not self.replaced.is_dir():
            return False
        if (self.path / CHECKPOINT_DIR).exists():
            shutil.rmtree(self.replaced)
            return False
        os.replace(self.replaced, self.path / CHECKPOINT_DIR)
        return True

    def existing(self) -> list[str]:
        """The run files present in the folder."""
        return [name for name in self.RUN_FILES if (self.path / name).exists()]

    def stale_temporaries(self) -> list[Path]:
        pattern = re.compile(r"\.(%s)\.\d+\.tmp" % "|".join(map(re.escape, self.RUN_FILES)))
        return sorted(p for p in self.path.glob(".*.tmp") if pattern.fullmatch(p.name))

    def move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{n}")
        aside.mkdir()
        for name in self.existing():
            os.replace(self.path / name, aside / name)
        return aside


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The rows of a ``metrics.jsonl``, and a note if its last line was torn (cut by a kill) and is dropped.

    Only the last line can be torn (rows are appended whole, one write each); an unreadable earlier line is a
    ``ValueError`` naming it.
    """
    if not path.exists():
        return [], None
    lines = path.read_bytes().split(b"\n")
    rows, note = [], None
    complete, tail = lines[:-1], lines[-1]   # a file that ends with "\n" has an empty tail
    for number, line in enumerate(complete, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(complete) and not tail:
                note = f"{path}: dropped its unreadable last line {number}"
                break
            raise ValueError(f"{path}: line {number} is not a metrics row ({line[:60]!r}...); the file is damaged "
                             "beyond its last line") from None
    if tail:
        note = f"{path}: dropped its torn last line {len(lines)} ({len(tail)} bytes without a newline)"
    return rows, note


class MetricsLog:
    """Rows appended to ``metrics.csv`` and ``metrics.jsonl`` (one whole line per write); kept in memory too.

    A new log writes both files with no rows (the CSV with its header); a resumed one rewrites both, through a
    temporary file and a rename, from ``rows`` -- the JSON lines already reconciled with the checkpoint -- so that
    a kill at any moment leaves the old files or the new ones.
    """

    BASE = ["step", "examples", "tokens", "lr", "train_loss", "grad_norm", "elapsed_s", "tokens_per_s"]

    def __init__(self, out_dir: Path | None, metric_names: list[str], rows: list[dict] | None = None):
        self.fields = self.BASE + [m for m in metric_names if m not in self.BASE]
        self.rows: list[dict] = list(rows or [])
        self.out_dir = out_dir
        if out_dir is None:
            return
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        atomic_write_text(self.jsonl, "".join(json.dumps(row) + "\n" for row in self.rows))
        atomic_write_text(self.csv, self._csv_lines(self.rows, header=True))

    def _csv_lines(self, rows: list[dict], header: bool = False) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, restval="", extrasaction="ignore")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.out_dir is not None:
            append_bytes(self.jsonl, (json.dumps(row) + "\n").encode())
            append_bytes(self.csv, self._csv_lines([row]).encode())


@dataclass
class TrainResult:
    """What :func:`train` returns: the logged rows, the (unwrapped) model and the last evaluation."""

    history: list[dict]
    model: nn.Module
    final: dict[str, float] = field(default_factory=dict)
    step: int = 0
    wrapped: nn.Module | None = None   # path "wrapper": the SubspaceModel (``model`` holds its merged weights)
    micro_batch_size: int = 0          # examples per rank per micro-batch the run trained with
    switch_log: list[dict] = field(default_factory=list)  # GoLore@auto: the optimizer's (wrapper's) ``switch_log()``


# --------------------------------------------------------------------------------------------- loop
def train(task: Task, cfg: TrainConfig) -> TrainResult:
    """Train ``task`` with ``cfg``; see the module docstring for what is held fixed across methods.

    Raises ``ValueError`` for a configuration that cannot run (or a ``resume`` that would change the result) and
    :class:`RunError` when the run cannot go on (folder in use or holding another run, too little memory,
    divergence, a failed checkpoint write).
    """
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if cfg.resume:
        saved = saved_state(out_dir) if out_dir is not None else None
        if saved is None:
            expected = CHECKPOINT_DIR if cfg.fsdp else CHECKPOINT
            raise FileNotFoundError(f"--resume: no checkpoint at {out_dir / expected if out_dir else None}")
        sharded = saved.name == STATE  # the checkpoint's format says how it was trained: refused before anything
        if sharded != cfg.fsdp:
            raise resume_refused(saved.parent if sharded else saved, [f"fsdp: {sharded!r} -> {cfg.fsdp!r}"])
    rank, world = _distributed(cfg.fsdp)
    folder = RunFolder(out_dir) if out_dir is not None and rank == 0 else None
    if folder is not None:
        folder.lock()
    try:
        if folder is not None:
            _prepare_folder(folder, cfg)
        return _train(task, cfg, rank, world, out_dir)
    finally:
        if folder is not None:
            folder.unlock()


def resume_refused(path: Path, changes: list[str]) -> ValueError:
    """The error of a ``resume`` whose configuration differs from the checkpoint's at ``path`` by ``changes``."""
    allowed = ", ".join("--" + name.replace("_", "-") for name in sorted(RESUME_MAY_CHANGE - {"resume", "overwrite"}))
    return ValueError(f"--resume: {path} was written with another configuration ({'; '.join(changes)}); a resumed "
                      f"run may change only {allowed}")


def _prepare_folder(folder: RunFolder, cfg: TrainConfig) -> None:
    """Remove killed writers' temporaries; refuse a run a new run would mix with, or with ``overwrite`` move it
    aside."""
    if folder.recover():
        _say(f"put back the checkpoint a killed writer had moved to {folder.replaced}")
    stale = folder.stale_temporaries()
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if stale:
        _say(f"removed {len(stale)} temporary file(s) left by killed writers in {folder.path}")
    held = folder.existing()
    if cfg.resume or not held:
        return
    if not cfg.overwrite:
        raise RunError(f"{folder.path} already holds a run ({', '.join(held)}): continue it with --resume, or start a "
                       "new one with --overwrite (which moves the old one aside)")
    _say(f"--overwrite: moved the run that was in {folder.path} to {folder.move_aside()}")


def _train(task: Task, cfg: TrainConfig, rank: int, world: int, out_dir: Path | None) -> TrainResult:
    device = _device(cfg)
    per_rank, remainder = divmod(cfg.batch_size, world)
    if remainder or per_rank < 1:
        raise ValueError(f"Invalid batch_size: {cfg.batch_size} (must be a multiple of world size {world})")
    if cfg.fsdp and world > 1:
        dist.barrier()  # rank 0 has prepared the folder (put back an interrupted checkpoint) before anyone reads
    ckpt_path = out_dir / (CHECKPOINT_DIR if cfg.fsdp else CHECKPOINT) if out_dir else None
    state = torch.load(saved_state(out_dir), map_location=device, weights_only=True) if cfg.resume else None
    if state is not None and "identity" not in state:
        raise ValueError(f"--resume: {ckpt_path} was written by an earlier version of this program (it records no "
                         "run identity); start a new run with --overwrite")
    given = cfg.micro_batch_size or (state["identity"]["train"]["micro_batch_size"] if state else None)
    if given is not None and per_rank % given:
        raise ValueError(f"Invalid batch_size: {cfg.batch_size} (must be a multiple of world size {world} x "
                         f"micro_batch_size {given})")

    model = task.build_model(cfg.seed).to(device)
    if cfg.fsdp:  # before the groups: fully_shard replaces every parameter by a row-sharded DTensor
        from golore_lab.distributed import shard_model

        shard_model(model, blocks=block_list(model))
    subspace = {} if cfg.spec.full else dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
                                             scale=cfg.scale, proj_type=cfg.proj_type)
    groups = task.param_groups(model, **subspace)
    wrapped = None
    if cfg.path == "wrapper":  # from here on `model` is the SubspaceModel; `wrapped` marks the path
        model, groups = wrap_model(model, groups, cfg)
        wrapped = model

    fixed = memory.model_bytes(model, groups, optimizer=cfg.optimizer, momentum=cfg.momentum,
                               subspace=not cfg.spec.full and wrapped is None)
    available = memory.available_bytes(device)
    if available is not None and device.type == "cpu":
        available //= memory.local_world_size()  # the ranks on this machine share its memory
    try:
        micro, note = memory.choose_micro_batch(
            per_rank, lambda m: memory.StepMemory.of(fixed, task.activation_bytes(m)), available, given)
    except MemoryError as err:
        raise RunError(f"not enough memory: {err}") from None
    if note and rank == 0:
        _say(note)
    accumulate = per_rank // micro
    identity = run_identity(cfg, task, micro)

    opt = make_optimizer(groups, cfg)
    if wrapped is not None:
        wrapped.attach(opt)
    base_lrs = [g["lr"] for g in opt.param_groups]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 and not cfg.fsdp else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext

    step, position, tokens, window, metric_names, rows, saved_step = 0, 0, 0, [0.0, 0], None, [], None
    if state is not None:
        # a field added since the checkpoint was written: the run had that field's default behaviour
        defaults = {k: v for k, v in config_dict(TrainConfig()).items() if k in identity["train"]}
        changes = (identity_changes({**defaults, **state["identity"]["train"]}, identity["train"])
                   + identity_changes(state["identity"]["task"], identity["task"], "task."))
        if changes:
            raise resume_refused(ckpt_path, changes)
        if cfg.fsdp:
            load_sharded_checkpoint(ckpt_path, model, opt)
        else:
            model.load_state_dict(state["model" if wrapped is None else "wrapper"])
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        step, position, tokens = state["step"], state["position"], state["tokens"]
        window, metric_names, saved_step = list(state["window"]), list(state["metric_names"]), state["step"]
        if rank == 0:
            rows = _reconcile_metrics(out_dir, saved_step)

    def stop(what: str) -> RunError:
        if ckpt_path is None:
            kept = "nothing was saved (no output folder)"
        elif saved_step is None:
            kept = "no checkpoint was written"
        else:
            kept = f"the last checkpoint, {ckpt_path} at step {saved_step}, is kept"
        return RunError(f"{what}: the run diverged and is stopped; {kept}. Try a smaller learning rate "
                        f"(--lr {cfg.lr:g} now)")

    def evaluate(at: int) -> dict[str, float]:
        metrics = {}
        if rank == 0 or cfg.fsdp:  # a sharded model's forward all-gathers: every rank runs it
            model.eval()
            with torch.no_grad(), autocast():
                metrics = {k: float(v) for k, v in task.evaluate(model).items()}
            model.train()
        bad = sorted(k for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v))
        if world > 1:  # every rank stops together
            shared = [bad]
            dist.broadcast_object_list(shared, src=0)
            bad = shared[0]
        if bad:
            raise stop(f"validation {bad[0]} is {metrics.get(bad[0], 'not finite')} at step {at}")
        return metrics

    first = evaluate(0) if step == 0 else {}
    if metric_names is None:
        metric_names = sorted(first)
        if world > 1:  # ranks other than 0 did not evaluate; take rank 0's names
            names = [metric_names]
            dist.broadcast_object_list(names, src=0)
            metric_names = names[0]
    log = MetricsLog(out_dir if rank == 0 else None, metric_names, rows)
    if step == 0:
        log.append({"step": 0, "examples": 0, "tokens": 0, "lr": cfg.lr * lr_factor(0, cfg), **first})

    def switch_log() -> list[dict]:
        return (opt if wrapped is None else wrapped).switch_log() if cfg.spec.auto else []

    def checkpoint() -> None:
        nonlocal saved_step
        if cfg.fsdp and ckpt_path is not None:
            save_sharded_checkpoint(ckpt_path, model, opt, {
                "step": step, "position": position, "tokens": tokens, "window": window,
                "metric_names": metric_names, "rng_cpu": torch.get_rng_state(), "config": config_dict(cfg),
                "identity": identity}, step, saved_step)
        elif rank == 0 and ckpt_path is not None:
            weights = {"model": model.state_dict()} if wrapped is None else \
                {"model": wrapped.merged_state_dict(), "wrapper": wrapped.state_dict()}  # plain weights; exact state
            save_checkpoint(ckpt_path, {
                **weights, "optimizer": opt.state_dict(), "step": step, "position": position,
                "tokens": tokens, "window": window, "metric_names": metric_names, "rng_cpu": torch.get_rng_state(),
                "config": config_dict(cfg), "identity": identity,
            }, saved_step)
        if rank == 0 and ckpt_path is not None and cfg.spec.auto:  # the same log on every rank, fsdp too
            atomic_write_text(out_dir / SWITCHES, json.dumps(switch_log(), indent=1) + "\n")
        saved_step = step
        if world > 1:
            dist.barrier()

    from tqdm.auto import tqdm

    last = cfg.steps if cfg.stop_at is None else cfg.stop_at
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress or rank != 0,
               unit="step", dynamic_ncols=True, desc=f"{cfg.method}/{cfg.optimizer}")
    start_time, start_tokens, grad_norm = time.perf_counter(), tokens, float("nan")
    model.train()
    try:
        while step < last:
            lr_now = [base * lr_factor(step, cfg) for base in base_lrs]
            for group, value in zip(opt.param_groups, lr_now):
                group["lr"] = value
            n_micro = micro_steps(opt if wrapped is None else wrapped, accumulate, cfg)
            if wrapped is not None and wrapped.refresh_due() and not wrapped.refresh_needs_gradient():
                wrapped.refresh(opt)  # random bases (GoLore): before the forward, nothing full-size formed or sent
            loss_sum = torch.zeros((), device=device)
            for i in range(n_micro):
                batch = _to(task.batch(position + (i * world + rank) * micro, micro, cfg.seed), device)
                sync = net.no_sync() if net is not model and i < n_micro - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        loss = task.loss(net, batch)
                    (loss / n_micro).backward()
                loss_sum += loss.detach().float()
                tokens += task.count_tokens(batch) * world
            step_loss = float(loss_sum) / n_micro
            finite = torch.tensor(float(math.isfinite(step_loss)), device=device)
            if world > 1:  # every rank stops together
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite:
                raise stop(f"training loss is {step_loss} at step {step + 1}")
            position += n_micro * world * micro
            if wrapped is not None and wrapped.refresh_due():
                wrapped.refresh(opt)  # SVD of this step's full gradient (all-reduced explicitly under DDP)
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if wrapped is None
                                  else wrapped.clip_grad_norm_(cfg.grad_clip))  # GoLore@auto's probes: not in the norm
                if not math.isfinite(grad_norm):
                    raise stop(f"gradient norm is {grad_norm} at step {step + 1}")
            try:
                opt.step()
            except FloatingPointError as err:  # the subspace optimizers refuse non-finite gradients
                raise stop(f"{err} at step {step + 1}") from None
            opt.zero_grad(set_to_none=True)
            step += 1
            window[0] += step_loss
            window[1] += 1
            bar.update(1)
            evaluating = step % cfg.eval_every == 0 or step == cfg.steps
            if step % cfg.log_every == 0 or evaluating:
                train_loss = window[0] / max(1, window[1])
                if world > 1:
                    reduced = torch.tensor([train_loss], device=device)
                    dist.all_reduce(reduced)
                    train_loss = float(reduced) / world
                window = [0.0, 0]
                elapsed = time.perf_counter() - start_time
                row = {"step": step, "examples": position, "tokens": tokens, "lr": lr_now[0],
                       "train_loss": train_loss, "grad_norm": grad_norm, "elapsed_s": elapsed,
                       "tokens_per_s": (tokens - start_tokens) / max(elapsed, 1e-9)}
                if evaluating:
                    row.update(evaluate(step))
                log.append(row)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last:
                checkpoint()
    finally:
        bar.close()
    final = {k: v for k, v in (log.rows[-1] if log.rows else {}).items() if k in metric_names}
    if wrapped is not None:  # hand back the task's own architecture, with the merged weights
        model = unwrapped_copy(wrapped)
    switches = switch_log()
    if cfg.fsdp:  # every rank gets the plain model with the full weights (one all-gather)
        model = full_copy(task, model, cfg.seed, device)
    return TrainResult(history=log.rows, model=model, final=final, step=step, wrapped=wrapped,
                       micro_batch_size=micro, switch_log=switches)


def _reconcile_metrics(out_dir: Path, step: int) -> list[dict]:
    """The rows of ``out_dir/metrics.jsonl`` up to the checkpoint's ``step`` (what the resumed run continues);
    what is dropped -- a torn last line, rows logged after the checkpoint was written -- is said on stderr."""
    rows, note = read_metrics(out_dir / "metrics.jsonl")
    if note:
        _say(note)
    kept = [row for row in rows if row["step"] <= step]
    if len(kept) < len(rows):
        _say(f"{out_dir / 'metrics.jsonl'}: dropped {len(rows) - len(kept)} row(s) logged after the checkpoint's "
             f"step {step}")
    if not kept:
        _say(f"{out_dir / 'metrics.jsonl'}: no rows up to step {step}; the history before the checkpoint is lost")
    return kept


def finite_float(text: str) -> float:
    """``argparse`` type: a finite float (``inf`` and ``nan`` are refused, naming the value)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_train_arguments(parser, defaults: TrainConfig | None = None) -> None:
    """Add one ``--flag`` per :class:`TrainConfig` field to an ``argparse`` parser (defaults from ``defaults``)."""
    defaults = defaults or TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, dest=f.name,
                                help=f"(default: {default})")
        elif f.name == "betas":
            parser.add_argument(flag, type=finite_float, nargs=2, default=default, metavar=("BETA1", "BETA2"),
                                help=f"(default: {default})")
        elif f.name == "method":
            parser.add_argument(flag, default=default, metavar="{full,galore,golore@X,golore@auto,lb-galore}",
                                help="golore@X: GaLore, then random subspaces for the last X%% of the steps; "
                                     "golore@auto: each matrix switches when the optimizer finds its SVD "
                                     "subspace noise-dominated (default: %(default)s)")
        elif f.name in ("optimizer", "path", "schedule", "device"):
            allowed = {"optimizer": OPTIMIZERS, "path": PATHS, "schedule": SCHEDULES,
                       "device": ("auto", "cpu", "cuda")}[f.name]
            parser.add_argument(flag, choices=allowed, default=default, help="(default: %(default)s)")
        else:
            kind = {int: int, float: finite_float, str: str}.get(type(default), str)
            if f.name in ("micro_batch_size", "stop_at"):
                kind = int
            parser.add_argument(flag, type=kind, default=default, help="(default: %(default)s)")
