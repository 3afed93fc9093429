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
* divergence is an error: a non-finite training or validation loss (or gradient, or a validation metric such
  as a perplexity that overflows), or a finite loss above :data:`DIVERGENCE_FACTOR` times its starting value
  (the first step's training loss; the step-0 validation loss), stops the run with :class:`RunError` naming the
  step, keeping the last checkpoint. Before a checkpoint is written the model it holds is evaluated (if that
  step did not evaluate anyway), so an exploded model never replaces the last good checkpoint. Metrics files
  never hold NaN or Infinity: a non-finite value is written as JSON ``null`` (an empty CSV field).

The loop is in parts: configuration (:mod:`golore_lab.lm.config`: :class:`TrainConfig`, its flags, the run's
identity), the run folder (:mod:`golore_lab.lm.runfolder`: checkpoints, lock, metrics, and every damaged file
answered by name), the three paths (:mod:`golore_lab.lm.paths`: optimizer, wrapper, FSDP behind one interface)
and the step (:mod:`golore_lab.lm.trainer`: ``Trainer.train_step`` / ``evaluate`` / ``state_dict``).
:func:`train` reads top to bottom. A new run into a folder that holds a run is refused unless ``overwrite`` moves
that run aside; ``resume`` refuses a configuration whose result would differ from the checkpoint's
(:data:`RESUME_MAY_CHANGE` lists the options that may change), and in a folder stopped before its first
checkpoint starts from step 0. SIGINT and SIGTERM stop the run between two steps, after a checkpoint of the last
one (:class:`~golore_lab.lm.runfolder.RunInterrupted`).

Example (see :mod:`golore_lab.lm.pretrain` for a full task)::

    cfg = TrainConfig(method="golore@20", optimizer="adamw", steps=200, batch_size=16, lr=1e-3, rank=32)
    result = train(task, cfg)          # result.history: list of logged rows
"""
from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from . import memory
from .config import (OPTIMIZERS, PATHS, RESUME_MAY_CHANGE, SCHEDULES, TrainConfig, add_train_arguments,  # noqa: F401
                     config_dict, finite_float, identity_changes, lr_factor, resume_refused, run_identity)
from .paths import (block_list, full_copy, make_optimizer, make_path, micro_steps, unwrapped_copy,  # noqa: F401
                    wrap_model)
from .metrics import MetricsLog, json_row, read_metrics, reconcile_metrics  # noqa: F401
from .runfolder import (CHECKPOINT, CHECKPOINT_DIR, STATE, SWITCHES, RunError, RunFolder, RunInterrupted,  # noqa: F401
                        load_checkpoint, save_checkpoint, saved_state)
from .trainer import DIVERGENCE_FACTOR, StopSignals, Trainer  # noqa: F401


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
        batch if that is larger (:mod:`golore_lab.lm.memory`). A task may take ``checkpoint=True`` too: the
        bytes with activation checkpointing."""


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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prepare_folder(folder: RunFolder, cfg: TrainConfig) -> bool:
    """:meth:`RunFolder.prepare` for ``cfg``: whether the run resumes from a checkpoint."""
    return folder.prepare(cfg.resume, cfg.overwrite, _say)


# --------------------------------------------------------------------------------------------- loop
def train(task: Task, cfg: TrainConfig) -> TrainResult:
    """Train ``task`` with ``cfg``; see the module docstring for what is held fixed across methods.

    Raises ``ValueError`` for a configuration that cannot run (or a ``resume`` that would change the result) and
    :class:`RunError` when the run cannot go on (folder in use, damaged or holding another run, too little memory,
    divergence, a failed write; :class:`RunInterrupted` for SIGINT / SIGTERM).
    """
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    saved = saved_state(out_dir) if cfg.resume and out_dir is not None else None
    if saved is not None and (saved.name == STATE) != cfg.fsdp:  # the format says how it was trained
        sharded = saved.name == STATE
        raise resume_refused(saved.parent if sharded else saved, [f"fsdp: {sharded!r} -> {cfg.fsdp!r}"])
    if cfg.resume and out_dir is None:
        raise ValueError("Invalid resume: True without an output folder (--out) to resume from")
    rank, world = _distributed(cfg.fsdp)
    folder = RunFolder(out_dir) if out_dir is not None and rank == 0 else None
    if folder is not None:
        folder.lock()
    try:
        resuming = _prepare_folder(folder, cfg) if folder is not None else False
        with StopSignals(_say) as signals:
            return _train(task, cfg, rank, world, out_dir, resuming, signals)
    finally:
        if folder is not None:
            folder.unlock()


def _micro_batch(task: Task, cfg: TrainConfig, path, device, per_rank: int, given: int | None, rank: int) -> int:
    """The micro-batch: ``given``, or the rank's whole share unless the step's memory would not fit."""
    available = memory.available_bytes(device)
    if available is not None and device.type == "cpu":
        available //= memory.local_world_size()  # the ranks on this machine share its memory
    def need(m: int) -> memory.StepMemory:
        allocator = memory.ALLOCATOR_CHECKPOINTED if cfg.checkpoint_activations else memory.ALLOCATOR
        return memory.StepMemory.of(path.fixed_bytes(per_rank // m), _activation_bytes(task, m, cfg), allocator)

    try:
        micro, note = memory.choose_micro_batch(per_rank, need, available, given)
    except MemoryError as err:
        raise RunError(f"not enough memory: {err}") from None
    if note and rank == 0:
        _say(note)
    return micro


def _activation_bytes(task: Task, micro_batch: int, cfg: TrainConfig) -> int:
    """The task's activation bytes, checkpointed when the run checkpoints and the task can count that (a task
    whose ``activation_bytes`` takes no ``checkpoint`` keyword is counted without: an over-estimate)."""
    if cfg.checkpoint_activations and "checkpoint" in inspect.signature(task.activation_bytes).parameters:
        return task.activation_bytes(micro_batch, checkpoint=True)
    return task.activation_bytes(micro_batch)


def _train(task: Task, cfg: TrainConfig, rank: int, world: int, out_dir: Path | None, resuming: bool,
           signals: StopSignals) -> TrainResult:
    device = _device(cfg)
    per_rank, remainder = divmod(cfg.batch_size, world)
    if remainder or per_rank < 1:
        raise ValueError(f"Invalid batch_size: {cfg.batch_size} (must be a multiple of world size {world})")
    if world > 1:
        resuming = _broadcast(resuming)   # rank 0 has prepared the folder before anyone reads it
    ckpt_path = out_dir / (CHECKPOINT_DIR if cfg.fsdp else CHECKPOINT) if out_dir else None
    state = load_checkpoint(saved_state(out_dir), device, sharded=cfg.fsdp) if resuming else None
    given = cfg.micro_batch_size or (state["identity"]["train"]["micro_batch_size"] if state else None)
    if given is not None and per_rank % given:
        raise ValueError(f"Invalid batch_size: {cfg.batch_size} (must be a multiple of world size {world} x "
                         f"micro_batch_size {given})")

    path = make_path(task, cfg, device, world, rank)
    micro = _micro_batch(task, cfg, path, device, per_rank, given, rank)
    path.build_optimizer()
    trainer = Trainer(task, cfg, path, device, rank, world, micro, run_identity(cfg, task, micro), ckpt_path)
    rows = []
    if state is not None:
        trainer.load_state_dict(state)
        rows = reconcile_metrics(out_dir, trainer.step, _say) if rank == 0 else []

    first = trainer.evaluate() if trainer.step == 0 else {}
    trainer.metric_names = trainer.metric_names or sorted(first)
    log = MetricsLog(out_dir if rank == 0 else None, trainer.metric_names, rows)
    if trainer.step == 0:
        log.append({"step": 0, "examples": 0, "tokens": 0, "lr": cfg.lr * lr_factor(0, cfg), **first})

    from tqdm.auto import tqdm

    last = cfg.steps if cfg.stop_at is None else cfg.stop_at
    bar = tqdm(total=cfg.steps, initial=trainer.step, disable=not cfg.progress or rank != 0,
               unit="step", dynamic_ncols=True, desc=f"{cfg.method}/{cfg.optimizer}")
    path.model.train()
    with bar:
        while trainer.step < last:
            signum = signals.requested(world)
            if signum:
                raise trainer.interrupted(signum)
            trainer.train_step()
            bar.update(1)
            evaluating = trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps
            if trainer.step % cfg.log_every == 0 or evaluating:
                log.append(trainer.row(evaluating), kept=trainer.kept())
                bar.set_postfix(loss=f"{log.rows[-1]['train_loss']:.3f}", refresh=False)
            if (cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0) or trainer.step == last:
                trainer.checkpoint()
    final = {k: v for k, v in (log.rows[-1] if log.rows else {}).items() if k in trainer.metric_names}
    return TrainResult(history=log.rows, model=path.final_model(task, device), final=final, step=trainer.step,
                       wrapped=path.model if cfg.path == "wrapper" else None, micro_batch_size=micro,
                       switch_log=path.switch_log())


def _broadcast(value):
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
