"""A generic training loop for Full, GaLore, GoLore@x% and large-batch GaLore, shared by pre-training and fine-tuning.

What differs between experiments is a :class:`Task` (model, data stream, loss, evaluation); everything the
paper holds fixed across methods lives here, so that methods differ *only* in the optimizer:

* optimizer: ``method`` in {full, galore, golore, lb-galore} x ``optimizer`` in {adamw, sgd (heavy-ball)}
  (:func:`make_optimizer`). GoLore@x% is SVD projections for steps t < K and random ones from K on, with
  K = round((1 - x) * T) for ``switch_fraction`` x; L.B. GaLore is GaLore fed ``refresh_batch_factor`` times
  the batch at refresh steps (``microbatches(opt, base, refresh)``), for both the SVD and that step;
* learning rate eta_t = lr * s(t): linear warm-up over ``warmup_steps``, then cosine (or linear) decay to
  ``min_lr_ratio * lr`` at step T (:func:`lr_factor`);
* clipping of the *full* gradient, ``||G||_F <= grad_clip`` over all parameters, before the optimizer sees it;
* gradient accumulation: a step averages ``n_micro`` micro-batches of ``micro_batch_size`` examples per rank;
* DDP through ``torchrun`` (``torch.distributed`` initialised from its environment variables; gloo on CPU).
  Rank k of W takes examples ``[p + (i W + k) m, p + (i W + k + 1) m)`` of micro-step i, so a run on W ranks
  sees exactly the examples a 1-rank run with the same global batch sees;
* data position = number of training examples consumed; a task's example stream is a pure function of
  (seed, index), so a checkpoint (model, optimizer, position, RNG, step) resumes bit-identically;
* evaluation every ``eval_every`` steps (on rank 0), metrics appended to ``metrics.csv`` / ``metrics.jsonl``
  as the run goes, a progress bar with tokens/s, atomic checkpoints, optional bf16 autocast.

Example (see :mod:`golore_lab.lm.pretrain` for a full task)::

    cfg = TrainConfig(method="golore", optimizer="adamw", steps=200, batch_size=16, lr=1e-3, rank=32)
    result = train(task, cfg)          # result.history: list of logged rows
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

METHODS = ("full", "galore", "golore", "lb-galore")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT = "checkpoint.pt"
#: fields that may differ between a run and its resumption (everything else must match the checkpoint)
RESUMABLE_CHANGES = {"resume", "stop_at", "progress", "out_dir", "checkpoint_every", "device"}


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


@dataclass
class TrainConfig:
    """Everything the loop needs besides the task. Invalid values raise ``ValueError`` naming the value."""

    method: str = "full"
    optimizer: str = "adamw"
    steps: int = 200
    batch_size: int = 16               # global examples per step (all ranks, all micro-batches)
    micro_batch_size: int | None = None  # examples per rank per micro-batch; default batch_size / world
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
    grad_clip: float = 1.0             # 0 disables
    rank: int = 32
    update_proj_gap: int = 20
    scale: float = 1.0
    proj_type: str = "std"
    switch_fraction: float = 0.2       # GoLore@x%: random projections for the last x of the steps
    refresh_batch_factor: int = 4      # L.B. GaLore: refresh-step batch = factor * batch_size
    state_on_refresh: str = "project"
    eval_every: int = 25
    log_every: int = 5
    checkpoint_every: int = 0          # 0: only at the end (and at stop_at)
    seed: int = 0
    out_dir: str | None = None
    resume: bool = False
    stop_at: int | None = None         # stop after this step (schedule still uses `steps`); resume later
    bf16: bool = False
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        choices = {"method": METHODS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "device": ("auto", "cpu", "cuda")}
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
        if not 0.0 <= self.switch_fraction <= 1.0:
            raise ValueError(f"Invalid switch_fraction: {self.switch_fraction} (must be in [0, 1])")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"Invalid min_lr_ratio: {self.min_lr_ratio} (must be in [0, 1])")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"Invalid betas: {self.betas} (two values in [0, 1))")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"Invalid warmup_steps: {self.warmup_steps} (must be < steps = {self.steps})")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"Invalid stop_at: {self.stop_at} (must be in [1, steps = {self.steps}])")

    @property
    def switch_step(self) -> int | None:
        """K for GoLore@x%: SVD refreshes before step K, random from K on (None unless method is golore)."""
        return round((1.0 - self.switch_fraction) * self.steps) if self.method == "golore" else None


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
    :attr:`TrainConfig.switch_step` and random after (``golore``).
    """
    if cfg.method == "full":
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


def micro_steps(opt: torch.optim.Optimizer, base: int, cfg: TrainConfig) -> int:
    """Micro-batches for the next step: ``base``, or ``factor * base`` before an L.B. GaLore refresh."""
    if cfg.method != "lb-galore":
        return base
    from golore_lab import microbatches

    return microbatches(opt, base, base * cfg.refresh_batch_factor)


# ----------------------------------------------------------------------------------------- plumbing
def _distributed() -> tuple[int, int]:
    """(rank, world); initialises the default process group from torchrun's env vars when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
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


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` to a temporary name, then rename: a crash never leaves a partial checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class MetricsLog:
    """Rows appended to ``metrics.csv`` and ``metrics.jsonl`` (flushed each row); kept in memory too."""

    BASE = ["step", "examples", "tokens", "lr", "train_loss", "grad_norm", "elapsed_s", "tokens_per_s"]

    def __init__(self, out_dir: Path | None, metric_names: list[str], resume_step: int | None):
        self.fields = self.BASE + [m for m in metric_names if m not in self.BASE]
        self.rows: list[dict] = []
        self.out_dir = out_dir
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        jsonl = out_dir / "metrics.jsonl"
        if resume_step is not None and jsonl.exists():  # keep what the checkpoint had seen, drop the rest
            self.rows = [r for r in map(json.loads, jsonl.read_text().splitlines()) if r["step"] <= resume_step]
        self._jsonl = open(jsonl, "w")
        self._csv_file = open(out_dir / "metrics.csv", "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.fields, restval="", extrasaction="ignore")
        self._csv.writeheader()
        for row in self.rows:
            self._write(row)

    def _write(self, row: dict) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._csv.writerow(row)
        self._csv_file.flush()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.out_dir is not None:
            self._write(row)

    def close(self) -> None:
        if self.out_dir is not None:
            self._jsonl.close()
            self._csv_file.close()


@dataclass
class TrainResult:
    """What :func:`train` returns: the logged rows, the (unwrapped) model and the last evaluation."""

    history: list[dict]
    model: nn.Module
    final: dict[str, float] = field(default_factory=dict)
    step: int = 0


# --------------------------------------------------------------------------------------------- loop
def train(task: Task, cfg: TrainConfig) -> TrainResult:
    """Train ``task`` with ``cfg``; see the module docstring for what is held fixed across methods."""
    rank, world = _distributed()
    device = _device(cfg)
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (world * micro):
        raise ValueError(f"Invalid batch_size: {cfg.batch_size} (must be a multiple of world size {world} x "
                         f"micro_batch_size {micro})")
    accumulate = cfg.batch_size // (world * micro)
    model = task.build_model(cfg.seed).to(device)
    subspace = {} if cfg.method == "full" else dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
                                                     scale=cfg.scale, proj_type=cfg.proj_type)
    opt = make_optimizer(task.param_groups(model, **subspace), cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext

    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt_path = out_dir / CHECKPOINT if out_dir else None
    step, position, tokens, window, metric_names, resumed = 0, 0, 0, [0.0, 0], None, None
    if cfg.resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        changed = [f"{k}: {v!r} -> {getattr(cfg, k)!r}" for k, v in state["config"].items()
                   if k not in RESUMABLE_CHANGES and v != getattr(cfg, k)]
        if changed:
            raise ValueError(f"--resume: {ckpt_path} was written with another configuration ({'; '.join(changed)})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        step, position, tokens = state["step"], state["position"], state["tokens"]
        window, metric_names, resumed = list(state["window"]), list(state["metric_names"]), state["step"]

    def evaluate() -> dict[str, float]:
        metrics = {}
        if rank == 0:
            model.eval()
            with torch.no_grad(), autocast():
                metrics = {k: float(v) for k, v in task.evaluate(model).items()}
            model.train()
        if world > 1:
            dist.barrier()
        return metrics

    first = evaluate() if step == 0 else {}
    if metric_names is None:
        metric_names = sorted(first)
        if world > 1:  # ranks other than 0 did not evaluate; take rank 0's names
            names = [metric_names]
            dist.broadcast_object_list(names, src=0)
            metric_names = names[0]
    log = MetricsLog(out_dir if rank == 0 else None, metric_names, resumed)
    if step == 0:
        log.append({"step": 0, "examples": 0, "tokens": 0, "lr": cfg.lr * lr_factor(0, cfg), **first})

    def checkpoint() -> None:
        if rank == 0 and ckpt_path is not None:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "position": position,
                "tokens": tokens, "window": window, "metric_names": metric_names, "rng_cpu": torch.get_rng_state(),
                "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
            })
        if world > 1:
            dist.barrier()

    from tqdm.auto import tqdm

    last = cfg.steps if cfg.stop_at is None else cfg.stop_at
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress or rank != 0,
               unit="step", dynamic_ncols=True, desc=f"{cfg.method}/{cfg.optimizer}")
    start_time, start_tokens, grad_norm = time.perf_counter(), tokens, float("nan")
    model.train()
    while step < last:
        lr_now = [base * lr_factor(step, cfg) for base in base_lrs]
        for group, value in zip(opt.param_groups, lr_now):
            group["lr"] = value
        n_micro = micro_steps(opt, accumulate, cfg)
        loss_sum = torch.zeros((), device=device)
        for i in range(n_micro):
            batch = _to(task.batch(position + (i * world + rank) * micro, micro, cfg.seed), device)
            sync = net.no_sync() if world > 1 and i < n_micro - 1 else contextlib.nullcontext()
            with sync:
                with autocast():
                    loss = task.loss(net, batch)
                (loss / n_micro).backward()
            loss_sum += loss.detach().float()
            tokens += task.count_tokens(batch) * world
        position += n_micro * world * micro
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window[0] += float(loss_sum) / n_micro
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
            row = {"step": step, "examples": position, "tokens": tokens, "lr": lr_now[0], "train_loss": train_loss,
                   "grad_norm": grad_norm, "elapsed_s": elapsed,
                   "tokens_per_s": (tokens - start_tokens) / max(elapsed, 1e-9)}
            if evaluating:
                row.update(evaluate())
            log.append(row)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last:
            checkpoint()
    bar.close()
    log.close()
    final = {k: v for k, v in (log.rows[-1] if log.rows else {}).items() if k in metric_names}
    return TrainResult(history=log.rows, model=model, final=final, step=step)


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
            parser.add_argument(flag, type=float, nargs=2, default=default, metavar=("BETA1", "BETA2"),
                                help=f"(default: {default})")
        elif f.name in ("method", "optimizer", "schedule", "device"):
            allowed = {"method": METHODS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                       "device": ("auto", "cpu", "cuda")}[f.name]
            parser.add_argument(flag, choices=allowed, default=default, help="(default: %(default)s)")
        else:
            kind = {int: int, float: float, str: str}.get(type(default), str)
            if f.name in ("micro_batch_size", "stop_at"):
                kind = int
            parser.add_argument(flag, type=kind, default=default, help="(default: %(default)s)")


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments (raises ``ValueError`` naming a bad value)."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
