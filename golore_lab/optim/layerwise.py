"""Layer-wise (in-backward) steps: each parameter is updated, and its gradient freed, as soon as the backward
has produced it (torch's "optimizer step in the backward pass": ``Tensor.register_post_accumulate_grad_hook``),
by the ONE optimizer the model was built with, whose learning rate one scheduler keeps setting.

Usage -- the loop of an ordinary step, with the number of micro-batches announced before the first backward::

    steps = layerwise(opt)                         # hooks on every parameter of opt's groups
    for t in range(T):
        k = microbatches(opt, base=1, refresh=4)   # L.B. GaLore: 4x the batch at a refresh, as without layer-wise
        steps.expect(k)
        for i in range(k):
            (loss_fn(model, batch(t, i)) / k).backward()   # the k-th backward updates each parameter it reaches
        opt.step()                                 # closes the step (see below); zero_grad() is a no-op now
        scheduler.step()

What a parameter keeps between its k micro-batches of one step (G_i: micro-batch i's gradient, P the basis):

* a GoLore matrix (a random basis, which does not depend on the gradient: at a refresh it is drawn at the first
  micro-batch, :func:`golore_lab.projection.derive_seed`) and any subspace matrix between refreshes: the r-sized
  sum Σ_i PᵀG_i (or Σ_i G_i Q), each G_i freed as soon as it is projected -- never the m × n gradient;
* a GaLore matrix at a refresh step (its SVD needs the gradient): G = Σ_i G_i, accumulated in ``p.grad`` by
  autograd as in an ordinary step, projected and freed at the k-th micro-batch. So are a GoLore matrix at a
  refresh when a refresh hook is registered (the hook is shown the (m, n) gradient), a GoLore@auto matrix that
  has not switched (its statistic reads the gradient each step) and every full-space parameter (embeddings,
  norms: there the accumulator *is* the gradient).

Projection is linear, so Σ_i PᵀG_i = Pᵀ Σ_i G_i and the step is the ordinary accumulated one up to the order of
floating-point sums; the rule's regularization (SGD's coupled ``weight_decay``: G + wd·W) is added once, at the
last micro-batch. With k = 1 a layer-wise step is the ordinary one bit for bit (the same operations per parameter;
a parameter's value is not read by the backward after its gradient is formed, checkpointed blocks included:
their recomputation precedes their gradients).

``opt.step()`` closes the step: a parameter that received fewer than k gradients (unused in a micro-batch) takes
its step then, from what it accumulated, and so does any gradient set by hand. A gradient that arrives after a
parameter's step, before ``step()``, is refused (``RuntimeError``: the loop did more backward passes than it
announced).

Non-finite gradients: what in-backward can promise. A parameter whose (projected) gradient is not finite is not
changed, nor is its state, and ``FloatingPointError`` names it -- raised from inside ``backward()``, which stops
there. The parameters whose gradients came earlier in that backward (the layers nearer the output) have already
taken their step, and those of the earlier micro-batches are lost: reload the last checkpoint (the training loop
stops the run and keeps it). ``finite_check = "deferred"`` defers the check as in an ordinary step.

Gradient clipping by the global norm needs every gradient before any update and is impossible in-backward
(the training loop refuses it); what remains possible is clipping each parameter's gradient by its own norm in
a hook registered before :func:`layerwise`, or a norm known before the backward (a fixed scale of the loss).

Under DDP -- ``layerwise(opt, ddp=net)``, ``net`` the ``DistributedDataParallel`` module: DDP's reducer
runs after a parameter's post-accumulate-grad hook, so the hooks cannot step on a reduced gradient; the
optimizer takes over the reduction instead, through DDP's communication hook (``register_comm_hook``). Run
the first k − 1 micro-batches under ``net.no_sync()``, as usual. For each bucket DDP hands over, the hook
all-reduces one flat tensor asynchronously: a subspace matrix's projected sum Σ_i PᵀG_i (the micro-batches under
``no_sync`` were projected and freed as they came), every other gradient in full (GaLore at a refresh, GoLore@auto
before its switch, full-space parameters). The parameters of a bucket take their step from the mean when the next
bucket is handed over, or at ``step()`` for the last one. So a GoLore matrix sends r/m of its bytes (r/n on the
right side) at every step and GaLore its full gradient only at refreshes. The bases are the same on every rank
(GoLore's from (seed, position, step); GaLore's from the SVD of the same mean), so are the decisions and the
weights, bit for bit. The gradient memory is DDP's own: its buckets hold every parameter's gradient, allocated
when DDP is built, so under DDP layer-wise saves traffic, not gradient memory. Refused: a DDP parameter the
optimizer does not hold, ``find_unused_parameters=True`` (a parameter unused on one rank would leave the ranks
apart), and a step whose parameters were not all reduced k times (``RuntimeError`` at ``step()``). A non-finite
gradient is non-finite in the mean on every rank, so every rank raises the same ``FloatingPointError``.
``reduced_bytes`` counts what the hook has all-reduced (reset it as you like).

Under FSDP2 (``fully_shard``) no argument is needed: FSDP2 itself runs each sharded parameter's post-accumulate-
grad hooks once it has reduce-scattered the gradient, so the step is taken on the local rows with the sharded
mathematics of :mod:`golore_lab.distributed` (its collectives -- the per-step finite check, a left-side
projection's all-reduce, the Gram matrix at an SVD refresh -- issued from the hooks in the same order on every
rank). The gradient shard (1/world of the gradient) accumulates in ``p.grad`` across micro-batches, for every
method.

Checkpoints are the optimizer's ``state_dict()`` as without layer-wise (nothing here is state across steps); it
is refused while a step is open (after a backward, before ``step()``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import switching
from . import bases
from .base import Bucket, SubspaceOptimizer
from .records import Basis


@dataclass
class _Pending:
    """One parameter within an open step: ``mode`` ``"subspace"`` (``acc``, the r-sized sum of projected
    micro-batch gradients, with ``basis``) or ``"full"`` (the gradient accumulates in ``p.grad``); ``count`` the
    micro-batches seen."""

    mode: str
    basis: Basis | None = None
    acc: Tensor | None = None
    count: int = 0


class Layerwise:
    """The in-backward steps of one :class:`~golore_lab.optim.SubspaceOptimizer` (see the module docstring).

    Made by :func:`layerwise`; ``remove()`` detaches the hooks and gives ``step()`` back its ordinary meaning.
    """

    def __init__(self, optimizer: SubspaceOptimizer, ddp: Any = None):
        if not isinstance(optimizer, SubspaceOptimizer):
            raise TypeError(f"layerwise() takes a SubspaceAdamW or SubspaceSGD, not {type(optimizer).__name__}")
        if optimizer.__dict__.get("_layerwise") is not None:
            raise ValueError("This optimizer already takes layer-wise steps")
        self.opt, self.micro_batches = optimizer, 1
        self.pending: dict[Tensor, _Pending] = {}
        self.done: set[Tensor] = set()
        self.index: dict[Tensor, tuple[int, int, int]] = {}
        position = -1
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                position += 1
                self.index[p] = (gi, pi, position)
        self.ddp, self.inflight, self.reduced_bytes = None, [], 0
        if ddp is not None:
            self._attach(ddp)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.index if p.requires_grad]
        self.handles.append(optimizer.register_state_dict_pre_hook(self._refuse_open))
        optimizer.__dict__["_layerwise"] = self

    def _attach(self, ddp: Any) -> None:
        """Take over ``ddp``'s gradient reduction (its communication hook); see "Under DDP" above."""
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"layerwise(ddp=...) takes a DistributedDataParallel module, not {type(ddp).__name__}")
        trained = [(name, p) for name, p in ddp.module.named_parameters() if p.requires_grad]
        foreign = [name for name, p in trained if p not in self.index]
        if foreign:
            raise ValueError(f"Invalid ddp: its parameter(s) {foreign[:3]} are not in the optimizer (under layer-wise "
                             "DDP the optimizer takes every reduced gradient: freeze them with requires_grad=False "
                             "or add them to a group)")
        if ddp.find_unused_parameters:
            raise ValueError("Invalid ddp: find_unused_parameters=True (a layer-wise step reduces every parameter "
                             "at every step; a parameter unused on one rank would leave the ranks apart)")
        self.ddp, self.group = ddp, ddp.process_group
        self.world = torch.distributed.get_world_size(self.group)
        ddp.register_comm_hook(self, _reduce_bucket)

    # ------------------------------------------------------------------ the loop's calls
    def expect(self, micro_batches: int) -> None:
        """Announce the number of backward passes of the next step (1 by default, and until changed)."""
        if not (isinstance(micro_batches, int) and not isinstance(micro_batches, bool) and micro_batches >= 1):
            raise ValueError(f"Invalid micro_batches: {micro_batches!r} (must be an integer >= 1)")
        if self.pending or self.done:
            raise RuntimeError("expect() while a layer-wise step is open: call optimizer.step() to close it first")
        self.micro_batches = micro_batches

    @property
    def open(self) -> bool:
        """Whether a step is open: some gradient arrived since the last ``step()``."""
        return bool(self.pending or self.done)

    def remove(self) -> None:
        """Detach the hooks; the optimizer's ``step()`` is the ordinary one again."""
        if self.open:
            raise RuntimeError("remove() while a layer-wise step is open: call optimizer.step() to close it first")
        for handle in self.handles:
            handle.remove()
        self.opt.__dict__.pop("_layerwise", None)

    @torch.no_grad()
    def close(self) -> None:
        """``optimizer.step()``: the parameters with fewer gradients than announced, and any gradient set by hand,
        take their step now; then the next step may begin."""
        try:
            self._drain()
            if self.ddp is not None and self.pending:
                names = [self._name(p) for p in self.pending][:3]
                raise RuntimeError(f"Layer-wise step under DDP: parameter(s) {names} received fewer gradients than "
                                   f"expect({self.micro_batches}) announced (every rank must run every backward "
                                   "pass it announced, the last one outside no_sync())")
            for p in self.done:
                p.grad = None   # under DDP, its reducer wrote the bucket back into p.grad; nothing else reads it
            for p, pending in list(self.pending.items()):
                if pending.mode == "subspace":
                    self._apply_subspace(p, pending, self._regularization(p, pending))
            self.opt._take(self.opt._targets())   # "full" partials and hand-set gradients: the ordinary step
        finally:
            self._abandon()

    def _abandon(self) -> None:
        for work, _, _ in self.inflight:
            work.wait()   # every rank issued it: wait, so that the ranks' collectives stay in step
        self.inflight.clear()
        self.pending.clear()
        self.done.clear()

    # ------------------------------------------------------------------ the hook
    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if p in self.done:
            raise self._after_step(p)
        try:
            pending = self.pending.get(p)
            if pending is None:
                pending = self.pending[p] = self._plan(p)
            pending.count += 1
            last = pending.count == self.micro_batches
            if pending.count > self.micro_batches:   # under DDP: after its last micro-batch, before its step
                raise self._after_step(p)
            if self.ddp is not None:
                if not last and pending.mode == "subspace":
                    self._accumulate(p, pending, last=False)   # no_sync(): projected here, reduced at the last
                return                                         # the last: DDP's reducer hands it to _reduce_bucket
            if pending.mode == "subspace":
                self._accumulate(p, pending, last)
                if last:
                    self._apply_subspace(p, pending)
            elif last:
                self.opt._take([self._target(p, p.grad)])
                p.grad = None
            if last:
                del self.pending[p]
                self.done.add(p)
        except BaseException:
            self._abandon()   # the step is abandoned (see the module docstring); the next may begin
            raise

    def _after_step(self, p: Tensor) -> RuntimeError:
        return RuntimeError(f"Layer-wise step: parameter {self._name(p)} received a gradient after its step "
                            f"(expect({self.micro_batches}) announced {self.micro_batches} backward pass(es)); "
                            "call optimizer.step() to close a step before the next one")

    def _target(self, p: Tensor, grad: Tensor, regularize: bool = True):
        gi, pi, position = self.index[p]
        return self.opt._target(gi, pi, position, grad, regularize)

    def _name(self, p: Tensor) -> str:
        gi, pi, _ = self.index[p]
        return self.opt._param_name(self.opt.param_groups[gi], gi, pi)

    def _plan(self, p: Tensor) -> _Pending:
        """At a parameter's first micro-batch: accumulate in the subspace when its basis for this step is known
        without the gradient (and k > 1), else in ``p.grad``."""
        target = self._target(p, p.grad, regularize=False)
        group, state = target.group, target.state
        if (self.micro_batches == 1 and self.ddp is None) or target.side is None or target.shard is not None:
            return _Pending("full")
        if group["switch_step"] == "auto" and not switching.switched(state):
            return _Pending("full")   # the statistic reads each step's gradient
        if not target.due:
            return _Pending("subspace", Basis(target.basis))
        kind = bases.refresh_kind(group, target.count, switching.switched(state))
        if kind != "random" or self.opt._refresh_hooks:
            return _Pending("full")   # an SVD (or a user's projector, or a hook) needs the (m, n) gradient
        basis, = self.opt._refresh(Bucket("single", [target]))   # drawn from (seed, position, step) alone
        return _Pending("subspace", basis)

    def _accumulate(self, p: Tensor, pending: _Pending, last: bool) -> None:
        """acc += Pᵀ G_i (r, n) or G_i Q (m, r); the rule's regularization joins at the last micro-batch."""
        pending.acc = self._projected_sum(p, pending, p.grad, regularize=last)
        p.grad = None

    def _projected_sum(self, p: Tensor, pending: _Pending, grad: Tensor, regularize: bool) -> Tensor:
        """acc + the projection of ``grad`` (regularized by the rule if ``regularize``): a new tensor."""
        target = self._target(p, grad, regularize=regularize)
        projected, _ = target.ops.project(target.grad, pending.basis.basis, target.side)
        return projected if pending.acc is None else projected.add_(pending.acc)

    def _regularization(self, p: Tensor, pending: _Pending) -> Tensor | None:
        """The projected regularization term of a step closed early (SGD's wd·W, projected; None when zero)."""
        target = self._target(p, torch.zeros_like(p))
        if target.grad.count_nonzero() == 0:
            return None
        return target.ops.project(target.grad, pending.basis.basis, target.side)[0]

    def _apply_subspace(self, p: Tensor, pending: _Pending, extra: Tensor | None = None) -> None:
        """The rule and the update from the accumulated R: the ordinary step's phase 2 for one parameter."""
        acc = pending.acc if extra is None else pending.acc + extra
        target = dataclasses.replace(self._target(p, acc, regularize=False), grad=acc)
        self.opt._finish([Bucket("single", [target])], [[pending.basis]], [[acc]])

    # ------------------------------------------------------------------ under DDP
    def _bucket(self, bucket: Any) -> Any:
        """DDP's communication hook (:func:`_reduce_bucket`): the updates of the buckets reduced so far, then
        this bucket's gradients -- each subspace one as its r-sized projected sum -- all-reduced as one flat
        tensor, asynchronously; its updates follow at the next bucket or at ``step()``."""
        self._drain()
        entries, pieces = [], []
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            pending = self.pending.get(p)
            if pending is None or pending.count != self.micro_batches:
                raise RuntimeError(f"Layer-wise step under DDP: parameter {self._name(p)} is reduced after "
                                   f"{0 if pending is None else pending.count} of the {self.micro_batches} backward "
                                   "passes announced by expect() (run the others under no_sync())")
            # regularized once, at the last micro-batch (the mean over the ranks keeps it once)
            piece = (self._projected_sum(p, pending, grad, regularize=True) if pending.mode == "subspace"
                     else self._target(p, grad).grad)
            entries.append((p, pending, piece.shape))
            pieces.append(piece.reshape(-1))
        flat = torch.cat(pieces)
        work = torch.distributed.all_reduce(flat, group=self.group, async_op=True)
        self.inflight.append((work, flat, entries))
        self.reduced_bytes += flat.numel() * flat.element_size()
        done = torch.futures.Future()
        done.set_result(bucket.buffer())   # DDP writes it back into p.grad; the step has no use for it
        return done

    @torch.no_grad()
    def _drain(self) -> None:
        """Wait for the all-reduces issued so far, in order, and take their parameters' steps from the means."""
        while self.inflight:
            work, flat, entries = self.inflight[0]
            work.wait()
            self.inflight.pop(0)
            mean, offset = flat.div_(self.world), 0
            for p, pending, shape in entries:
                grad = mean[offset:offset + shape.numel()].view(shape)
                offset += shape.numel()
                if pending.mode == "subspace":
                    pending.acc = grad
                    self._apply_subspace(p, pending)
                else:
                    self.opt._take([dataclasses.replace(self._target(p, p, regularize=False), grad=grad)])
                del self.pending[p]
                self.done.add(p)

    def _refuse_open(self, optimizer: Any) -> None:
        if self.open:
            raise RuntimeError("state_dict() while a layer-wise step is open (after a backward, before "
                               "optimizer.step()): close the step first")


def _reduce_bucket(state, bucket):   # no annotations: DDP checks them, and they are strings here
    """The DDP communication hook of a layer-wise optimizer (registered by ``layerwise(opt, ddp=...)``)."""
    return state._bucket(bucket)


def layerwise(optimizer: SubspaceOptimizer, ddp: Any = None) -> Layerwise:
    """Make ``optimizer`` take each parameter's step in the backward pass (see :mod:`golore_lab.optim.layerwise`);
    with ``ddp`` (the ``DistributedDataParallel`` module over the model), through its communication hook."""
    return Layerwise(optimizer, ddp)
