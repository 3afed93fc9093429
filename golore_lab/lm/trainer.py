"""The training step, the evaluation and the loop's state: :class:`Trainer` (after torchtitan's ``Trainer``).

:meth:`Trainer.train_step` is one optimizer step (lr from the schedule, ``n_micro`` micro-batches, the path's
refresh hooks, clipping, the divergence check); :meth:`Trainer.evaluate` the task's validation, checked the same
way; :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict` what a checkpoint holds besides the weights and
the optimizer (step, data position, tokens, the loss window, the metric names, the CPU RNG, the run's identity,
the starting losses); :meth:`Trainer.checkpoint` writes one through the path, after checking the model it holds.
:class:`StopSignals` turns SIGINT and SIGTERM into a request the loop honours at the next safe point.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from golore_lab.fileio import atomic_write_text

from .config import TrainConfig, config_dict, lr_factor, resume_changes, resume_refused
from .paths import TrainPath, barrier, micro_steps
from .runfolder import SWITCHES, RunError, RunInterrupted

#: A finite training or validation loss above this multiple of its starting value stops the run as diverged
#: (the first step's training loss; the step-0 validation loss). A cross-entropy starts near log(classes), the
#: uniform prediction, and falls: ten times that is far worse than the untrained model.
DIVERGENCE_FACTOR = 10.0


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def divergence(name: str, value: float, start: float | None) -> str | None:
    """Why ``value`` of metric ``name`` means the run diverged, as "is ..." (None if it does not): not finite,
    or -- for a loss -- above :data:`DIVERGENCE_FACTOR` times its starting value ``start``."""
    if not math.isfinite(value):
        return f"is {value}"
    if name.endswith("loss") and start is not None and start > 0 and value > DIVERGENCE_FACTOR * start:
        return f"is {value:.6g}, more than {DIVERGENCE_FACTOR:g} times its starting value {start:.6g},"
    return None


class StopSignals:
    """While entered, SIGINT and SIGTERM only record a request (and say so); the loop stops at its next safe
    point -- between steps -- writes a checkpoint and says which step is kept. Outside the main thread, where
    Python cannot install handlers, nothing changes."""

    NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

    def __init__(self, say):
        self.say, self.signum, self._old = say, 0, {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.say(f"received {self.NAMES[signum]}: stopping after the current step (and its checkpoint)")
        self.signum = self.signum or signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.NAMES}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def requested(self, world: int) -> int:
        """The signal that asked to stop (0: none), the same on every rank."""
        if world == 1:
            return self.signum
        flag = torch.tensor(self.signum)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


class Trainer:
    """One run's step, evaluation and state, over a :class:`~golore_lab.lm.paths.TrainPath`."""

    def __init__(self, task, cfg: TrainConfig, path: TrainPath, device: torch.device, rank: int, world: int,
                 micro: int, identity: dict, checkpoint_path: Path | None):
        self.task, self.cfg, self.path, self.device = task, cfg, path, device
        self.rank, self.world, self.micro, self.identity = rank, world, micro, identity
        self.checkpoint_path = checkpoint_path
        self.accumulate = cfg.batch_size // world // micro
        self.base_lrs = [g["lr"] for g in path.opt.param_groups]
        self.step = self.position = self.tokens = 0
        self.window, self.metric_names, self.saved_step = [0.0, 0], None, None
        self.start_losses: dict[str, float] = {}
        self.grad_norm, self.evaluated_at = None, None
        self.lr_now = self.base_lrs
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 \
            else contextlib.nullcontext
        self.started, self.started_tokens = time.perf_counter(), 0

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The loop's state for a checkpoint (the path adds the weights and the optimizer's state)."""
        return {"step": self.step, "position": self.position, "tokens": self.tokens, "window": self.window,
                "metric_names": self.metric_names, "rng_cpu": torch.get_rng_state(), "config": config_dict(self.cfg),
                "identity": self.identity, "start_losses": self.start_losses}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's ``state`` (refused, naming the differences, if its identity differs)."""
        changes = resume_changes(state["identity"], self.identity)
        if changes:
            raise resume_refused(self.checkpoint_path, changes)
        self.path.load(self.checkpoint_path, state)
        torch.set_rng_state(state["rng_cpu"])
        self.step, self.position, self.tokens = state["step"], state["position"], state["tokens"]
        self.window, self.metric_names = list(state["window"]), list(state["metric_names"])
        self.saved_step, self.start_losses = state["step"], dict(state.get("start_losses", {}))
        self.started_tokens = self.tokens

    # ---------------------------------------------------------------------------- checks
    def stopped(self, what: str) -> RunError:
        if self.checkpoint_path is None:
            kept = "nothing was saved (no output folder)"
        elif self.saved_step is None:
            kept = "no checkpoint was written"
        else:
            kept = f"the last checkpoint, {self.checkpoint_path} at step {self.saved_step}, is kept"
        return RunError(f"{what}: the run diverged and is stopped; {kept}. Lower --lr ({self.cfg.lr:g} now), or "
                        "raise --warmup-steps or lower --grad-clip")

    def check(self, values: dict[str, float], at: int, training: bool = False) -> None:
        """Stop the run if any of ``values`` (measured at step ``at``, the same on every rank) diverged. The first
        finite value of each metric is its starting value."""
        for name, value in values.items():
            if name not in self.start_losses and math.isfinite(value):
                self.start_losses[name] = value
        for name, value in values.items():
            why = divergence(name, value, self.start_losses.get(name))
            if why:
                raise self.stopped(f"{'training loss' if training else 'validation ' + name} {why} at step {at}")

    # ---------------------------------------------------------------------------- step and evaluation
    def train_step(self) -> float:
        """One optimizer step; returns its mean training loss."""
        cfg, path = self.cfg, self.path
        self.lr_now = [base * lr_factor(self.step, cfg) for base in self.base_lrs]
        for group, value in zip(path.opt.param_groups, self.lr_now):
            group["lr"] = value
        n_micro = micro_steps(path.refresher, self.accumulate, cfg)
        path.before_forward(n_micro)
        loss_sum = torch.zeros((), device=self.device)
        for i in range(n_micro):
            start = self.position + (i * self.world + self.rank) * self.micro
            batch = to_device(self.task.batch(start, self.micro, cfg.seed), self.device)
            with path.no_sync(last=i == n_micro - 1):
                with self.autocast():
                    loss = self.task.loss(path.net, batch)
                try:
                    (loss / n_micro).backward()
                except FloatingPointError as err:  # layer-wise: a step in the backward refused a gradient
                    raise self.stopped(f"{err} at step {self.step + 1}") from None
            loss_sum += loss.detach().float()
            self.tokens += self.task.count_tokens(batch) * self.world
        step_loss = float(loss_sum) / n_micro
        self.check({"train_loss": self._mean_over_ranks(step_loss)}, self.step + 1, training=True)
        self.position += n_micro * self.world * self.micro
        path.after_backward()
        if cfg.grad_clip > 0:
            self.grad_norm = path.clip(cfg.grad_clip)
            if not math.isfinite(self.grad_norm):
                raise self.stopped(f"gradient norm is {self.grad_norm} at step {self.step + 1}")
        try:
            path.opt.step()
        except FloatingPointError as err:  # the subspace optimizers refuse non-finite gradients
            raise self.stopped(f"{err} at step {self.step + 1}") from None
        path.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.window = [self.window[0] + step_loss, self.window[1] + 1]
        return step_loss

    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics at the current step (rank 0; every rank with FSDP), checked."""
        metrics = {}
        if self.rank == 0 or self.path.every_rank_evaluates:  # a sharded model's forward all-gathers
            model = self.path.model
            model.eval()
            with torch.no_grad(), self.autocast():
                metrics = {k: float(v) for k, v in self.task.evaluate(model).items()}
            model.train()
        if self.world > 1 and not self.path.every_rank_evaluates:   # every rank stops together, on rank 0's numbers
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        self.check(metrics, self.step)
        self.evaluated_at = self.step
        return metrics

    def _mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        reduced = torch.tensor([value], device=self.device)
        dist.all_reduce(reduced)
        return float(reduced) / self.world

    def row(self, evaluate: bool) -> dict:
        """The metrics row of this step: the training loss averaged over the steps since the last row (and over
        the ranks), throughput, and with ``evaluate`` the validation metrics."""
        train_loss = self._mean_over_ranks(self.window[0] / max(1, self.window[1]))
        self.window = [0.0, 0]
        elapsed = time.perf_counter() - self.started
        row = {"step": self.step, "examples": self.position, "tokens": self.tokens, "lr": self.lr_now[0],
               "train_loss": train_loss, "grad_norm": self.grad_norm, "elapsed_s": elapsed,
               "tokens_per_s": (self.tokens - self.started_tokens) / max(elapsed, 1e-9)}
        return {**row, **(self.evaluate() if evaluate else {})}

    # ---------------------------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        """Write the checkpoint of this step, after evaluating the model it holds (unless this step did): an
        exploded model stops the run and never replaces the last good checkpoint."""
        if self.checkpoint_path is None:
            return
        if self.evaluated_at != self.step:
            self.evaluate()
        self.path.save(self.checkpoint_path, self.state_dict(), self.step, self.saved_step)
        if self.rank == 0 and self.cfg.spec.auto:  # the same log on every rank, fsdp too
            atomic_write_text(self.checkpoint_path.parent / SWITCHES, json.dumps(self.path.switch_log(), indent=1)
                              + "\n")
        self.saved_step = self.step
        barrier(self.world)

    def kept(self) -> str:
        """What the run folder holds now, for a message."""
        if self.checkpoint_path is None:
            return "nothing was saved (no output folder)"
        if self.saved_step is None:
            return f"no checkpoint was written yet in {self.checkpoint_path.parent}"
        return f"the last checkpoint, {self.checkpoint_path} at step {self.saved_step}, is kept"

    def interrupted(self, signum: int) -> RunInterrupted:
        """Stop at this safe point: checkpoint the steps trained since the last one; the error says what is kept."""
        if self.checkpoint_path is not None and self.step > (self.saved_step or 0):
            self.checkpoint()
        name = StopSignals.NAMES.get(signum, f"signal {signum}")
        then = ("continue it with --resume" if self.checkpoint_path is not None else "nothing to resume")
        return RunInterrupted(f"stopped by {name} after step {self.step} of {self.cfg.steps}: {self.kept()}; "
                              f"{then}", signum)
