"""The base class: it validates and routes the param groups and runs each step as
plan → refresh → project → (finite check) → rule → apply."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .. import batched, distributed
from .. import spec
from .. import switching
from ..spec import SUBSPACE_DEFAULTS
from . import bases, functional
from .auto import AutoSteps
from .checkpoint import Checkpoints
from .finite import FiniteChecks
from .records import Basis, Refresh, Target, param_name

#: torch.optim keys that change the algorithm and that these optimizers do not implement: refused when true
TORCH_ONLY_KEYS = ("amsgrad", "capturable", "differentiable", "fused", "decoupled_weight_decay")


@dataclass(frozen=True)
class Bucket:
    """Parameters of one group taking one step together: ``backend`` of phase 2 (:mod:`.functional`) and
    ``stacked``, whether phase 1 refreshes and projects them as one batch (:mod:`golore_lab.batched`)."""

    backend: str
    targets: list[Target]
    stacked: bool = False

    @property
    def group(self) -> dict[str, Any]:
        return self.targets[0].group


class SubspaceOptimizer(AutoSteps, Checkpoints, FiniteChecks, Optimizer):
    """Base class: projection, refresh schedule, state transport and the update ``W ← W − lr·scale·P N``.

    Subclasses supply the rule (:attr:`rule`: its keys, check, state tensors and directions, e.g.
    :class:`golore_lab.optim.adamw.AdamWRule`). Use :class:`SubspaceAdamW` or :class:`SubspaceSGD`.

    Per-parameter state (tensors and numbers only, so ``torch.load(..., weights_only=True)`` works):
    ``step`` (steps taken), ``proj`` (the basis, (m, r) or (n, r), in the parameter's dtype), the rule's
    tensors in subspace coordinates, and ``moment_start`` after a ``"reset"`` refresh. Random bases are a pure
    function of (``seed``, parameter position, step) (:func:`golore_lab.projection.derive_seed`), so there
    is no generator state to lose and all DDP ranks draw the same basis.

    Every hyper-parameter and subspace setting is checked by :mod:`golore_lab.spec`, in the constructor, in
    :meth:`add_param_group` and in :meth:`load_state_dict`, naming the bad value. Other param-group keys
    (``"name"``, ``"lr_scale"``) are kept, as torch keeps them, unless one looks like a misspelling of a known key.

    Non-finite gradients: ``step()`` raises ``FloatingPointError`` naming the parameter, before any parameter
    or state is modified (the check, :func:`golore_lab.optim.finite.nonfinite_flags`, is one fused 2-norm over the
    projected gradients, read on the host once per step: the step's only host synchronisation; exact for every
    finite value). On a GPU that one read stalls the host's queue; set ``optimizer.finite_check = "deferred"`` to
    keep the flags on the device instead (a step then never waits) and call :meth:`raise_if_nonfinite` where the
    loop synchronises anyway (e.g. when it logs the loss); the price is that the steps are applied before the
    error, as ``torch.optim`` applies them. Refresh steps still check before their SVD.

    Batched path: a group with ``foreach=True`` (default None: True on CUDA, like ``torch.optim``) takes its
    matrices of equal shape, side, dtype and step count together (batched SVD / QR / matmul and ``foreach``
    rules, :mod:`golore_lab.batched`); same results as the per-tensor loop up to rounding. ``lr`` may be a
    tensor of one element. ``maximize=True`` ascends, as in ``torch.optim``. Complex parameters are trained in
    full-space groups on their ``torch.view_as_real`` views, as ``torch.optim.AdamW`` trains them; a group with a
    rank refuses them.

    FSDP2: row-sharded DTensor parameters (``fully_shard``) are trained on their local rows, with the state
    sharded like them, GoLore@auto included; see :mod:`golore_lab.distributed` for the sides, the collectives and
    the caveats.
    A user's projector whose basis is not (dim, r) with orthonormal columns is refused (``ValueError``).
    """

    rule: Any = None  # the rule's functions (keys, check, state, directions): AdamWRule, SGDRule
    _kind = staticmethod(bases.refresh_kind)

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self._refresh_hooks: OrderedDict[int, Callable[["SubspaceOptimizer", Refresh], None]] = OrderedDict()
        super().__init__(params, defaults)
        self._install_checkpoint_hooks()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As ``Optimizer.__setstate__`` (unpickling, ``copy.deepcopy``, every ``load_state_dict``): torch keeps only
        ``defaults``, ``state`` and ``param_groups``; the refresh hooks start empty and the checkpoint hooks are
        installed again, as torch re-creates its own hook tables."""
        super().__setstate__(state)
        self.__dict__.setdefault("_refresh_hooks", OrderedDict())
        self._install_checkpoint_hooks()

    @classmethod
    def _known_keys(cls) -> set[str]:
        """The param-group keys this optimizer reads (besides ``params`` and ``param_names``)."""
        return {*cls.rule.keys, *SUBSPACE_DEFAULTS}

    @classmethod
    def _defaults(cls, rule: dict[str, Any], subspace: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(subspace) - set(SUBSPACE_DEFAULTS))
        if unknown:
            raise TypeError(f"Unknown keyword argument(s) {unknown} (allowed: {sorted(SUBSPACE_DEFAULTS)})")
        return {**rule, **SUBSPACE_DEFAULTS, **subspace}

    def register_refresh_hook(self, hook: Callable[["SubspaceOptimizer", Refresh], None]) -> RemovableHandle:
        """Call ``hook(optimizer, refresh)`` each time a parameter's basis is recomputed (see :class:`Refresh`).

        Nothing is stored unless the hook stores it; ``handle.remove()`` detaches it. Hooks run after the
        finiteness check, before the state is carried to the new basis.
        """
        handle = RemovableHandle(self._refresh_hooks)
        self._refresh_hooks[handle.id] = hook
        return handle

    # ---------------------------------------------------------------- param groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``Optimizer.add_param_group``, validated by :mod:`golore_lab.spec`; a bad group is not added.

        Numbers are stored as Python numbers and ``switch_step`` is resolved from ``switch_fraction`` and
        ``total_steps`` when those are given.
        """
        super().add_param_group(param_group)
        try:
            checked = self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise
        self.param_groups[-1].update(checked)

    def _check_group(self, group: Mapping[str, Any], index: int) -> dict[str, Any]:
        """The validated hyper-parameters and subspace settings of ``group`` (its ``params`` are this optimizer's
        group ``index``); raises ``ValueError`` naming the first bad value."""
        spec.check_group_keys(group, self._known_keys() | {"params", "param_names"})
        for key in TORCH_ONLY_KEYS:
            if group.get(key):
                raise ValueError(f"Invalid {key}: {group[key]!r} ({type(self).__name__} does not implement "
                                 f"torch.optim's {key}; leave it out or False)")
        checked = {**self.rule.check(group), **spec.check_subspace(group)}
        if checked["rank"] is not None:
            for i, p in enumerate(group["params"]):
                spec.check_rank_fits(checked["rank"], tuple(p.shape), param_name(group, index, i), p.is_complex())
        return checked

    _param_name = staticmethod(param_name)

    # ---------------------------------------------------------------- schedule
    def refresh_due(self) -> bool:
        """True when the next ``step()`` recomputes the projection of at least one parameter.

        A large-batch GaLore loop takes its larger batch exactly when this is True (see :func:`microbatches`).
        """
        for group in self.param_groups:
            if group["rank"] is None:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if not state or state["step"] % group["update_proj_gap"] == 0:
                    return True
        return False

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimization step (see :mod:`golore_lab.optim` for the algorithm).

        Plan (:meth:`_targets`, :meth:`_buckets`), refresh the bases that are due (:meth:`_refresh`) and project
        (:meth:`_project`), changing nothing; check all projected gradients at once; run the refresh hooks; then
        the rule and the update (:func:`golore_lab.optim.functional.update`) and GoLore@auto's bookkeeping.

        Layer-wise (:mod:`golore_lab.optim.layerwise`): the parameters were updated during the backward; ``step()``
        closes the step (the parameters that received fewer gradients than announced take theirs now).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layerwise = self.__dict__.get("_layerwise")
        if layerwise is not None:
            layerwise.close()
            return loss
        self._take(self._targets())
        return loss

    def _take(self, targets: list[Target]) -> None:
        """Phase 1 (plan, refresh, project) and phase 2 (:meth:`_finish`) for ``targets``."""
        buckets = self._buckets(targets)
        planned = [self._refresh(bucket) for bucket in buckets]
        projected = [self._project(bucket, found) for bucket, found in zip(buckets, planned)]
        self._finish(buckets, planned, projected)

    def _finish(self, buckets: list[Bucket], planned: list[list[Basis | None]], projected: list[list[Tensor]]) -> None:
        """Check all projected gradients at once, run the refresh hooks, then the rule, the update and
        GoLore@auto's bookkeeping. Nothing changes before the check."""
        steps = sorted((item for b, found, grads in zip(buckets, planned, projected)
                        for item in zip(b.targets, grads, found)), key=lambda item: item[0].position)
        self._check_finite([grad for _, grad, _ in steps], [t.name for t, _, _ in steps],
                           _process_group([t for t, _, _ in steps]), [t.position for t, _, _ in steps],
                           [t.grad for t, _, _ in steps])
        for refresh in self._refreshes(steps):
            for hook in list(self._refresh_hooks.values()):
                hook(self, refresh)
        for bucket, found, grads in zip(buckets, planned, projected):
            functional.update(self.rule, bucket.group, list(zip(bucket.targets, grads, found)), bucket.backend)
            for target, grad, basis in zip(bucket.targets, grads, found):
                if basis is not None:
                    self._auto_update(target.state, basis.auto, grad, target.count)

    def _targets(self) -> list[Target]:
        """Plan: every parameter with a gradient, in parameter order, with its local, regularized gradient."""
        targets, position = [], -1
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                position += 1
                if p.grad is not None:
                    targets.append(self._target(gi, pi, position, p.grad))
        return targets

    def _target(self, gi: int, pi: int, position: int, grad: Tensor, regularize: bool = True) -> Target:
        """Parameter ``pi`` of group ``gi`` (at ``position``) with the gradient ``grad``: local, negated for
        ``maximize``, as real views for a complex parameter, and regularized by the rule (unless not
        ``regularize``: a layer-wise micro-batch that is not the step's last)."""
        group = self.param_groups[gi]
        p, name = group["params"][pi], param_name(group, gi, pi)
        if grad.is_sparse:
            raise RuntimeError(f"Parameter {name} has a sparse gradient, which subspace optimizers do not support")
        ops = distributed.ops(p, name)
        weight, grad = distributed.local(p), distributed.local(grad)  # local rows when sharded
        if group["maximize"]:
            grad = -grad
        if weight.is_complex():  # full space only (a rank group refuses complex): as torch.optim, on
            weight, grad = torch.view_as_real(weight), torch.view_as_real(grad)  # (..., 2) real views
        side = None if group["rank"] is None else ops.side(tuple(p.shape), group["proj_type"])
        state = self.state[p]
        grad = self.rule.regularize(group, weight, grad) if regularize else grad
        return Target(group, name, position, p, weight, grad, state, state.get("step", 0), side, ops)

    def _buckets(self, targets: list[Target]) -> list[Bucket]:
        """Route: single parameters, the full-space buckets of a fused rule (one per group, device and dtype),
        then the ``foreach`` stacks (matrices of one group, shape, side, dtype, device and step count)."""
        fused: dict[tuple, list[Target]] = {}
        stacks: dict[tuple, list[Target]] = {}
        singles = []
        for t in targets:
            if t.side is None and self.rule.fusable(t):
                fused.setdefault((id(t.group), t.weight.device, t.weight.dtype), []).append(t)
            elif t.side is None or not _foreach(t):
                singles.append(Bucket("single", [t]))
            else:
                key = (id(t.group), tuple(t.weight.shape), t.side, t.weight.dtype, t.weight.device, t.count,
                       t.basis is None)
                stacks.setdefault(key, []).append(t)
        return (singles + [Bucket("fused", b) for b in fused.values()]
                + [Bucket("foreach" if len(b) > 1 else "single", b, stacked=True) for b in stacks.values()])

    def _refresh(self, bucket: Bucket) -> list[Basis | None]:
        """Refresh: each parameter's basis for this step, new where a refresh is due (nothing is stored yet), and
        GoLore@auto's plan (:meth:`_auto_plan`; not on a stacked bucket, whose parameters are never auto)."""
        first = bucket.targets[0]
        if first.side is None:
            return [None] * len(bucket.targets)
        if bucket.stacked:
            autos, random = [None] * len(bucket.targets), False
        else:
            autos = [self._auto_plan(first.group, first.state, first.grad, first.side, first.position, first.count,
                                     first.due, first.shard)]
        if not first.due:
            return [Basis(t.basis, auto=auto) for t, auto in zip(bucket.targets, autos)]
        tests = [auto.test if auto else None for auto in autos]
        if not bucket.stacked:
            random = switching.switched(first.state) or (tests[0] is not None and tests[0].switch)
        kind = self._kind(first.group, first.count, random)
        gram = autos[0] and autos[0].gram
        new = bases.new_bases(bucket.targets, kind, bucket.stacked, self._check_finite, gram)
        return [Basis(b, True, kind, auto, test) for b, auto, test in zip(new, autos, tests)]

    @staticmethod
    def _project(bucket: Bucket, found: list[Basis | None]) -> list[Tensor]:
        """Project: R = Pᵀ G (r, n) or G Q (m, r) (one ``bmm`` for a stack); the gradient in the full space.
        GoLore@auto's probe view of a row-sharded left-side matrix comes out of R's all-reduce, into its plan."""
        targets = bucket.targets
        if targets[0].side is None:
            return [t.grad for t in targets]
        if bucket.stacked:
            return batched.project([t.grad for t in targets], [b.basis for b in found], targets[0].side)
        (target,), (basis,) = targets, found
        probe = basis.auto.probe if basis.auto is not None else None
        grad, view = target.ops.project(target.grad, basis.basis, target.side, probe)
        if view is not None:
            basis.auto.view = view
        return [grad]

    def _refreshes(self, steps: list[tuple[Target, Tensor, Basis | None]]) -> list[Refresh]:
        """What the refresh hooks see, in parameter order (built only when there are hooks)."""
        if not self._refresh_hooks:
            return []
        return [Refresh(t.param, t.name, t.position, t.count, t.side, b.kind, b.basis, t.state.get("proj"),
                        t.ops.wrap(t.grad), b.test) for t, _, b in steps if b is not None and b.new]


def _foreach(target: Target) -> bool:
    """The batched path: for a group's unsharded matrices when its ``foreach`` is True (None: on CUDA)."""
    foreach = target.group.get("foreach")
    if target.shard is not None or target.group["switch_step"] == "auto":  # GoLore@auto: per-parameter decisions
        return False
    return target.weight.is_cuda if foreach is None else bool(foreach)


def _process_group(targets: list[Target]):
    """The process group of the sharded parameters' collectives (None: none is sharded)."""
    meshes = {t.shard.mesh: t.shard for t in targets if t.shard is not None}  # equal meshes hash equal
    if len(meshes) > 1:
        raise ValueError("Parameters sharded over different device meshes in one optimizer are not supported")
    return next(iter(meshes.values())).group if meshes else None
