"""The training loop's configuration: :class:`TrainConfig`, its command-line flags, and a run's identity.

:class:`TrainConfig` is everything :func:`golore_lab.lm.train.train` needs besides the task; its
``__post_init__`` refuses every invalid value with a ``ValueError`` naming it (the method's own settings --
rank, ``update_proj_gap``, ``scale``, ``proj_type`` -- are checked once more by the optimizer's spec when it is
built). :func:`add_train_arguments` adds one flag per field to a parser; the programs whose defaults depend on
a preset pass the fields they resolve after parsing (``deferred``), whose default is then ``None``.

A run's identity (:func:`run_identity`) is what its result depends on: every field but
:data:`RESUME_MAY_CHANGE`, and the task's options. A checkpoint records it, and ``resume`` refuses a run whose
identity differs (:func:`identity_changes` names the differences).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, fields
from typing import Any

from golore_lab.methods import Method, parse
from golore_lab.spec import check_adamw, check_sgd, check_subspace

OPTIMIZERS = ("adamw", "sgd")
PATHS = ("optimizer", "wrapper")
SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
#: The most steps and the largest global batch a run may ask for: beyond them a run would not end in any
#: lifetime on the machines the package targets (a step of 10^6 examples of the CPU preset takes hours), and a
#: typo (``--steps 1e12``) must not look like a hang.
MAX_STEPS = 10**9
MAX_BATCH = 10**6
#: The :class:`TrainConfig` fields a resumed run may change: where it stops, how it is watched and saved, and the
#: device. Every other field, and every option of the task, is part of the run's identity (:func:`run_identity`)
#: and must match the checkpoint's, because changing it changes the result.
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "stop_at", "out_dir", "checkpoint_every", "log_every",
                               "progress", "device"})


@dataclass
class TrainConfig:
    """Everything the loop needs besides the task. Invalid values raise ``ValueError`` naming the value."""

    method: str = "full"               # full, galore, golore@X, golore@auto, lb-galore (golore_lab.methods)
    optimizer: str = "adamw"
    path: str = "optimizer"            # "wrapper": SubspaceModel + torch.optim (see golore_lab.lm.train)
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
    layerwise: bool = False            # each parameter's step in the backward pass (golore_lab.optim.layerwise)
    checkpoint_activations: bool = False   # recompute each block in the backward instead of keeping its tensors
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        parse(self.method)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"Invalid {f.name}: {value} (must be a finite number)")
        choices = {"optimizer": OPTIMIZERS, "path": PATHS, "schedule": SCHEDULES, "device": DEVICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Invalid {name}: {getattr(self, name)!r} (choose from {', '.join(allowed)})")
        self._check_sizes()
        self._check_optimizer()
        self._check_combinations()

    def _check_sizes(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "log_every", "refresh_batch_factor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        for name, most in (("steps", MAX_STEPS), ("batch_size", MAX_BATCH)):
            if getattr(self, name) > most:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be <= {most:.0e})")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"Invalid micro_batch_size: {self.micro_batch_size} (must be >= 1)")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"Invalid batch_size: {self.batch_size} (must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size})")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"Invalid warmup_steps: {self.warmup_steps} (must be in [0, steps = {self.steps}))")
        if self.checkpoint_every < 0:
            raise ValueError(f"Invalid checkpoint_every: {self.checkpoint_every} (must be >= 0)")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"Invalid stop_at: {self.stop_at} (must be in [1, steps = {self.steps}])")

    def _check_optimizer(self) -> None:
        """The optimizer's values through the package's one spec (the messages every API gives), then what a
        *training run* cannot use: each refused value gives NaN or a run that diverges whatever the lr."""
        check_subspace(dict(rank=self.rank, update_proj_gap=self.update_proj_gap, scale=self.scale,
                            proj_type=self.proj_type, state_on_refresh=self.state_on_refresh,
                            switch_step=self.switch_step, seed=self.seed))
        check_adamw(dict(lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay))
        check_sgd(dict(lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                       weight_decay=self.weight_decay, nesterov=self.nesterov))
        if not self.lr > 0:
            raise ValueError(f"Invalid lr: {self.lr} (must be > 0)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"Invalid min_lr_ratio: {self.min_lr_ratio} (must be in [0, 1])")
        if self.optimizer == "adamw" and not self.eps > 0:
            # eps = 0 divides 0 by 0 in every coordinate whose gradient is still 0: NaN at the first step
            raise ValueError(f"Invalid eps: {self.eps} (must be > 0 with adamw)")
        if self.momentum > 1.0:
            # above 1 the heavy-ball buffer grows geometrically: the run diverges whatever the learning rate
            raise ValueError(f"Invalid momentum: {self.momentum} (must be in [0, 1])")
        if not 0.0 <= self.dampening <= 1.0:
            raise ValueError(f"Invalid dampening: {self.dampening} (must be in [0, 1])")
        if self.lr * self.weight_decay >= 1:
            # decoupled decay multiplies each weight by 1 - lr wd, coupled decay adds lr wd W to the step:
            # lr wd >= 1 zeroes or flips every weight at the first step
            raise ValueError(f"Invalid weight_decay: {self.weight_decay} (must be < 1 / lr = {1 / self.lr:g}: each "
                             "step scales the weights by 1 - lr * weight_decay)")
        if self.grad_clip < 0:
            raise ValueError(f"Invalid grad_clip: {self.grad_clip} (must be >= 0; 0 disables clipping)")

    def _check_combinations(self) -> None:
        if self.resume and self.overwrite:
            raise ValueError("Invalid overwrite: True with resume (resume continues the run in the folder; "
                             "overwrite moves it aside to start a new one)")
        if self.path == "wrapper" and self.spec.full:
            raise ValueError("Invalid path: 'wrapper' with method 'full' (the wrapper trains galore, golore@X and "
                             "lb-galore; full training uses path 'optimizer')")
        if self.path == "wrapper" and self.fsdp:
            raise ValueError("Invalid path: 'wrapper' with fsdp (FSDP2 shards the task's own matrices, which the "
                             "subspace optimizers train directly; use path 'optimizer' with fsdp, or drop fsdp)")
        if self.layerwise and self.path == "wrapper":
            raise ValueError("Invalid layerwise: True with path 'wrapper' (its factors are trained by a plain torch "
                             "optimizer; layer-wise steps are the subspace optimizer's: use path 'optimizer')")
        if self.layerwise and self.grad_clip > 0:
            raise ValueError(f"Invalid grad_clip: {self.grad_clip} with layerwise (the global norm needs every "
                             "gradient before the first update, and in-backward each parameter is updated as soon "
                             "as its gradient exists: use --grad-clip 0)")
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

    @property
    def subspace(self) -> dict:
        """The subspace keys of the task's first parameter group (none for ``full``)."""
        return {} if self.spec.full else dict(rank=self.rank, update_proj_gap=self.update_proj_gap,
                                              scale=self.scale, proj_type=self.proj_type)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Every field of ``cfg`` as plain JSON values (what checkpoints and result caches record)."""
    return json.loads(json.dumps({f.name: getattr(cfg, f.name) for f in fields(cfg)}))


def run_identity(cfg: TrainConfig, task, micro_batch_size: int) -> dict[str, Any]:
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


def resume_changes(saved: dict, identity: dict) -> list[str]:
    """:func:`identity_changes` of a checkpoint's identity against this run's; a field added since the checkpoint
    was written counts as having had its default (the behaviour the run had)."""
    defaults = {k: v for k, v in config_dict(TrainConfig()).items() if k in identity["train"]}
    return (identity_changes({**defaults, **saved["train"]}, identity["train"])
            + identity_changes(saved["task"], identity["task"], "task."))


def resume_refused(path, changes: list[str]) -> ValueError:
    """The error of a ``resume`` whose configuration differs from the checkpoint's at ``path`` by ``changes``."""
    allowed = ", ".join("--" + name.replace("_", "-") for name in sorted(RESUME_MAY_CHANGE - {"resume", "overwrite"}))
    return ValueError(f"--resume: {path} was written with another configuration ({'; '.join(changes)}); a resumed "
                      f"run may change only {allowed}")


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


# ---------------------------------------------------------------------------------------------- argparse
def finite_float(text: str) -> float:
    """``argparse`` type: a finite float (``inf`` and ``nan`` are refused, naming the value)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1 (0 and negatives are refused, not read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


#: ``--threads``: at most this many (``torch.set_num_threads`` takes a C int; far more threads than cores only
#: slows a run down)
MAX_THREADS = 1024


def thread_count(text: str) -> int:
    """``argparse`` type of ``--threads``: an integer in [1, :data:`MAX_THREADS`]."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_THREADS}")
    return value


def add_train_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None,
                        deferred: frozenset[str] = frozenset()) -> None:
    """Add one ``--flag`` per :class:`TrainConfig` field to ``parser`` (defaults from ``defaults``).

    The fields in ``deferred`` get the default ``None`` ("not given"): the program resolves them after parsing
    from its preset (their help says so).
    """
    defaults = defaults or TrainConfig()
    allowed = {"optimizer": OPTIMIZERS, "path": PATHS, "schedule": SCHEDULES, "device": DEVICES}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.name in deferred else getattr(defaults, f.name)
        shown = "the preset's" if f.name in deferred else getattr(defaults, f.name)
        kwargs = dict(default=default, dest=f.name, help=f"(default: {shown})")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "betas":
            parser.add_argument(flag, type=finite_float, nargs=2, metavar=("BETA1", "BETA2"), **kwargs)
        elif f.name == "method":
            parser.add_argument(flag, metavar="{full,galore,golore@X,golore@auto,lb-galore}", **{
                **kwargs, "help": "golore@X: GaLore, then random subspaces for the last X%% of the steps; "
                                  "golore@auto: each matrix switches when the optimizer finds its SVD subspace "
                                  f"noise-dominated (default: {shown})"})
        elif f.name in allowed:
            parser.add_argument(flag, choices=allowed[f.name], **kwargs)
        else:
            kind = {int: int, float: finite_float, str: str}.get(type(value), str)
            parser.add_argument(flag, type=int if f.name in ("micro_batch_size", "stop_at") else kind, **kwargs)


def run_program(parser: argparse.ArgumentParser, call):
    """Run ``call()`` for a program built on the loop, mapping its failures to the documented exit statuses:
    a bad option or configuration (``ValueError``, ``FileNotFoundError``) exits 2 with the parser's usage line; a
    run that stopped (:class:`~golore_lab.lm.runfolder.RunError`: divergence, a damaged or unwritable folder, a
    full disk, too little memory) returns 1; SIGINT / SIGTERM return 128 + the signal (130, 143) once the
    checkpoint of the last step is written. Returns ``(status, result)``; status 0 when ``call`` returned."""
    from .runfolder import RunError, RunInterrupted

    try:
        return 0, call()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    except RunInterrupted as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 128 + err.signum, None
    except RunError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1, None
