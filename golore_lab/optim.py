"""GaLore, GoLore, GoLore@x% and large-batch GaLore as ``torch.optim`` optimizers.

One bookkeeping class, :class:`SubspaceOptimizer`, does what the three algorithms share; they differ only in
the projector (:mod:`golore_lab.projection`) and in the gradient fed to it at a refresh. For a parameter W
(m × n) in a group with a ``rank`` r, projected on the left (the right case is the transpose), step t is::

    G  = ∇W                                        # (m, n), stochastic
    if t % update_proj_gap == 0:                   # refresh
        P_new = projector(G, r)                    # (m, r): SVD (GaLore) or Haar-random (GoLore)
        state ← carry(state, P_newᵀ P_old)          # state_on_refresh: "project" | "keep" | "reset"
    R  = Pᵀ G                                      # (r, n)
    N  = rule(R, state)                            # AdamW or momentum SGD on the r × n state
    W ← W − lr · scale · P N                       # scale (α) applied once

GoLore@x% is ``switch_step=K``: refreshes at steps t < K use ``projection`` (the SVD by default), refreshes
at t ≥ K use random projections; for x% random steps out of T, K = round((1 − x/100) · T), which
``switch_fraction=x/100, total_steps=T`` computes (:func:`golore_lab.spec.resolve_switch`). GoLore@auto is
``switch_step="auto"``: each parameter switches to random refreshes, for good, at the first refresh where its
SVD subspace is estimated to capture less of the true gradient than a random one; the test uses the projected
gradients of the period that just ended (:mod:`golore_lab.switching`, derivation in ``docs/when_to_switch.md``),
and :meth:`SubspaceOptimizer.switch_log` lists the switches. Large-batch GaLore
is GaLore fed a larger batch at the steps where :meth:`SubspaceOptimizer.refresh_due` is True
(:func:`microbatches`).

Groups without ``rank`` (biases, norms, embeddings) use the same rule in the full space, which is exactly
``torch.optim.AdamW`` / ``torch.optim.SGD``. AdamW's element-wise work, full-space and r-sized, runs in torch's
fused AdamW kernel (:func:`golore_lab.batched.fused_adamw_`, the one of ``torch.optim.AdamW(fused=True)``)
wherever it can take the tensors, else in element-wise kernels (:mod:`golore_lab.rules`); same rule, to rounding.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import batched, distributed
from . import projection as proj
from . import rules
from . import spec
from . import switching
from .spec import SUBSPACE_DEFAULTS


@dataclass(frozen=True)
class Refresh:
    """What a refresh hook sees: one parameter's new basis and the gradient it was chosen from.

    ``basis`` is (m, r) for ``side="left"`` and (n, r) for ``side="right"``; ``previous`` is the basis it
    replaces (``None`` at the first refresh); ``gradient`` is the (m, n) gradient of that step (the large batch
    for L.B. GaLore); ``step`` the parameter's step index; ``kind`` ``"svd"``, ``"random"`` or ``"custom"``;
    ``test`` the GoLore@auto test of the period that just ended (``switch_step="auto"`` only, else None;
    ``test.switch`` marks the refresh where the parameter switches). The tensors are the optimizer's own:
    clone them to keep them.
    """

    param: Tensor
    name: str
    position: int
    step: int
    side: str
    kind: str
    basis: Tensor
    previous: Tensor | None
    gradient: Tensor
    test: switching.SwitchTest | None = None


def _saved_callable(value: Any) -> bool:
    """A projector callable as :meth:`SubspaceOptimizer.state_dict` saves it: ``"<callable name>"``."""
    return isinstance(value, str) and value.startswith("<callable")


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


@dataclass
class _Plan:
    """One parameter's step, between phase 1 (projection) and phase 2 (update). ``weight``, ``raw`` (the
    regularized gradient) and ``grad`` (projected) are local rows for a sharded parameter."""

    group: dict[str, Any]
    name: str
    position: int
    param: Tensor
    weight: Tensor
    state: dict[str, Any]
    count: int
    side: str | None
    basis: Tensor | None
    new_basis: Tensor | None
    grad: Tensor
    shard: Any
    raw: Tensor
    auto: "_Auto | None" = None         # GoLore@auto's phase-1 plan (see SubspaceOptimizer._auto_plan)
    random: bool = False                # GoLore@auto switched this parameter at this refresh (or before)
    test: Any = None                    # the switching test of this refresh, for the refresh hooks

    @property
    def due(self) -> bool:
        return self.basis is None or self.new_basis is not None or self.count % self.group["update_proj_gap"] == 0


@dataclass
class _Auto:
    """GoLore@auto's part of one parameter's step, from phase 1 (:meth:`SubspaceOptimizer._auto_plan`) to phase 2
    (:meth:`SubspaceOptimizer._auto_update`).

    ``side`` is the projected side. Between refreshes (``refresh`` False): ``probe``, the step's pair probe Π_j
    (d, q) (:func:`golore_lab.switching.next_probe`: fresh when the step opens a pair), and ``view``, its view
    of the gradient, Π_jᵀG (q, n) or GΠ_j (m, q) (local rows for a row-sharded matrix on the right side); for a
    row-sharded matrix projected on the left, ``view`` is None until :meth:`SubspaceOptimizer._project` fills it
    from the all-reduce it shares with R. At a refresh: ``test`` (None for the first one: the period then
    starts); ``gram``, for a row-sharded matrix on the right side whose refresh is an SVD, the Gram matrix GᵀG
    that was all-reduced together with the period's pair products.
    """

    side: str
    refresh: bool
    test: switching.SwitchTest | None = None
    view: Tensor | None = None
    probe: Tensor | None = None
    gram: Tensor | None = None


def _bucket_key(plan: _Plan) -> tuple:
    return (id(plan.group), tuple(plan.weight.shape), plan.side, plan.weight.dtype, plan.weight.device, plan.count,
            plan.state.get("proj") is None)


def _local_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with local shards for DTensors (views sharing storage) and without the basis."""
    return {key: distributed.local(value) for key, value in state.items() if key != "proj"}


def _auto_fixed(live: dict[str, Any], group: dict[str, Any], p: Tensor, shard: "distributed.Sharding", side: str,
                name: str) -> dict[str, Any]:
    """One row-sharded parameter's state ``live`` with its GoLore@auto entries in the layout of
    :meth:`SubspaceOptimizer._auto_saved` (a new dict; the pairs not yet summed over the ranks)."""
    (m, n), rank, gap = shard.shape, group["rank"], group["update_proj_gap"]
    dim = m if side == "left" else n
    q = min(rank, dim - rank)
    device = distributed.local(p).device
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32  # the statistic's precision
    period = "auto_steps" in live
    views = ((rank, n), (q, n)) if side == "left" else ((shard.rows, rank), (shard.rows, q))
    prev, probe_prev = ((live["auto_prev"], live["auto_probe_prev"]) if period else
                        (torch.zeros(shape, dtype=dtype, device=device) for shape in views))
    capacity = (gap - 1) // 2  # the most pairs a period has
    pairs = torch.zeros(gap - 2, 2, dtype=dtype, device=device)  # rows 0 .. capacity - 1; gap - 2 > capacity
    pairs[capacity] = math.nan  # the disjoint-pair test's mark (switching.check_period: see _auto_loaded)
    if period:
        held = live["auto_pairs"].shape[0]
        if held > capacity:
            raise ValueError(f"The GoLore@auto state of parameter {name} holds {held} pairs, more than a period of "
                             f"update_proj_gap={gap} has ({capacity})")
        pairs[:held] = live["auto_pairs"]
    fixed = {key: value for key, value in live.items() if key not in switching.STATE_KEYS}
    fixed.update(
        auto_steps=live["auto_steps"] if period else -1,
        auto_switched_at=live.get("auto_switched_at", -1),
        **{key: float(live.get(key, math.nan)) for key in ("auto_signal", "auto_random_signal", "auto_t")},
        auto_probe=live["auto_probe"] if period else torch.zeros(dim, q, dtype=p.dtype, device=device),
        auto_prev=prev if side == "left" else shard.wrap(prev),
        auto_probe_prev=probe_prev if side == "left" else shard.wrap(probe_prev),
        auto_pairs=pairs,
    )
    return fixed


class SubspaceOptimizer(Optimizer):
    """Base class: projection, refresh schedule, state transport and the update ``W ← W − lr·scale·P N``.

    Subclasses supply the rule: its hyper-parameter keys and check (:attr:`rule_keys`, :meth:`_check_rule`),
    its state tensors (:attr:`rule_state`), :meth:`_direction` and, for coupled weight decay,
    :meth:`_regularize`. Use :class:`SubspaceAdamW` or :class:`SubspaceSGD`.

    Per-parameter state (tensors and numbers only, so ``torch.load(..., weights_only=True)`` works):
    ``step`` (steps taken), ``proj`` (the basis, (m, r) or (n, r), in the parameter's dtype), the rule's
    tensors in subspace coordinates, and ``moment_start`` after a ``"reset"`` refresh. Random bases are a pure
    function of (``seed``, parameter position, step) (:func:`golore_lab.projection.derive_seed`), so there
    is no generator state to lose and all DDP ranks draw the same basis.

    Every hyper-parameter and subspace setting is checked by :mod:`golore_lab.spec`, in the constructor, in
    :meth:`add_param_group` and in :meth:`load_state_dict`, naming the bad value.

    Non-finite gradients: ``step()`` raises ``FloatingPointError`` naming the parameter, before any parameter
    or state is modified (the check is one fused 2-norm over the projected gradients, read on the host once per
    step: the step's only host synchronisation). On a GPU that one read stalls the host's queue; set
    ``optimizer.finite_check = "deferred"`` to keep the flags on the device instead (a step then never waits)
    and call :meth:`raise_if_nonfinite` where the loop synchronises anyway (e.g. when it logs the loss); the
    price is that the steps are applied before the error, as ``torch.optim`` applies them. Refresh steps still
    check before their SVD.

    Batched path: a group with ``foreach=True`` (default None: True on CUDA, like ``torch.optim``) takes its
    matrices of equal shape, side, dtype and step count together (batched SVD / QR / matmul and ``foreach``
    rules, :mod:`golore_lab.batched`); same results as the per-tensor loop up to rounding. ``lr`` may be a
    0-dim tensor.

    FSDP2: row-sharded DTensor parameters (``fully_shard``) are trained on their local rows, with the state
    sharded like them, GoLore@auto included; see :mod:`golore_lab.distributed` for the sides, the collectives and
    the caveats.
    A user's projector whose basis is not (dim, r) with orthonormal columns is refused (``ValueError``).
    """

    finite_check = "sync"  # "sync" or "deferred" (see above)

    rule_keys: tuple[str, ...] = ()     # the rule's hyper-parameters (param-group keys besides the subspace ones)
    rule_state: tuple[str, ...] = ()    # the rule's per-parameter state tensors, shaped like the projected gradient

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self._refresh_hooks: OrderedDict[int, Callable[["SubspaceOptimizer", Refresh], None]] = OrderedDict()
        super().__init__(params, defaults)

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
        allowed = set(self.defaults) | {"params", "param_names"}
        unknown = sorted(set(param_group) - allowed)
        if unknown:
            raise ValueError(f"Unknown param-group key(s) {unknown} (allowed: {sorted(allowed - {'params'})})")
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
        checked = {**self._check_rule(group), **spec.check_subspace(group)}
        if checked["rank"] is not None:
            for i, p in enumerate(group["params"]):
                spec.check_rank_fits(checked["rank"], tuple(p.shape), self._param_name(group, index, i))
        return checked

    def _check_rule(self, group: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _param_name(group: Mapping[str, Any], group_index: int, param_index: int) -> str:
        names = group.get("param_names")
        if names:
            return repr(names[param_index])
        return f"param_groups[{group_index}]['params'][{param_index}]"

    def _name_at(self, position: int) -> str:
        """The name of the parameter at ``position`` in the optimizer's parameter order (over all groups)."""
        for gi, group in enumerate(self.param_groups):
            if position < len(group["params"]):
                return self._param_name(group, gi, position)
            position -= len(group["params"])
        raise IndexError(position)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``; a user's projector object is saved by name only (tensors-only state).

        GoLore@auto's state of a row-sharded (FSDP2) parameter is saved in a layout of fixed keys and shapes
        (:meth:`_auto_saved`), as ``torch.distributed.checkpoint`` needs; on the right side this sums each
        rank's share of the period's pair products over the ranks, so ``state_dict()`` is then a collective
        (one all-reduce for all such parameters): call it on every rank, as ``get_optimizer_state_dict`` does.
        """
        state = super().state_dict()
        for group in state["param_groups"]:
            if callable(group["projection"]):
                group["projection"] = spec.describe_setting(group["projection"])
        self._auto_saved(state)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], *, keep_settings: bool = False) -> None:
        """As ``Optimizer.load_state_dict``, validated in full before anything changes.

        Refused with a ``ValueError`` naming the first mismatch, the optimizer left exactly as it was: a state
        dict of another optimizer class (``torch.optim.AdamW``'s, or ``SubspaceSGD``'s into ``SubspaceAdamW``),
        another number of groups or of parameters per group, other param-group keys, a hyper-parameter or
        setting that the constructor would refuse (``rank=0``, ``lr=nan``), a state tensor whose shape does not
        fit its parameter, rank and side, and -- unless ``keep_settings`` -- a subspace setting (``rank``,
        ``switch_step``, ``switch_fraction``, ``total_steps``, ``seed`` ... see :data:`SUBSPACE_DEFAULTS`) that
        differs from this optimizer's: the run would silently change method.

        ``keep_settings=True`` keeps this optimizer's subspace settings instead of the saved ones (e.g. to move
        the switch of a resumed run); the saved state must still fit them. The rule's hyper-parameters (``lr``,
        ``betas``, ``momentum`` ...) are taken from the state dict, as torch does: a scheduler's learning rate
        must survive a resume. A projector callable is saved by name; the optimizer keeps its own object.
        """
        state_dict = self._auto_loaded(state_dict)
        settings = self._check_loadable(state_dict, keep_settings)
        super().load_state_dict(state_dict)
        self._restore_statistic_dtypes(state_dict)
        for group, checked in zip(self.param_groups, settings):
            # a tensor lr stays torch's own copy of the saved one
            group.update({k: v for k, v in checked.items() if not isinstance(v, Tensor)})

    def _restore_statistic_dtypes(self, state_dict: Mapping[str, Any]) -> None:
        """Undo torch's cast of GoLore@auto's float32 statistic to a half-precision parameter's dtype.

        ``Optimizer.load_state_dict`` casts every floating state tensor but ``step`` to its parameter's dtype;
        the statistic is kept in float32 for bf16 parameters (:func:`golore_lab.switching.start_period`), so a
        resumed bf16 run would otherwise test rounded pair products. The saved tensors are put back as saved.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params):
            saved = state_dict["state"].get(index, {})
            for key in ("auto_prev", "auto_probe_prev", "auto_pairs"):
                value = saved.get(key)
                if (isinstance(value, Tensor) and type(value) is Tensor and key in self.state[p]
                        and value.dtype != self.state[p][key].dtype):
                    self.state[p][key] = value.to(device=self.state[p][key].device, copy=True)

    def _check_loadable(self, state_dict: Mapping[str, Any], keep_settings: bool) -> list[dict[str, Any]]:
        """Everything :meth:`load_state_dict` refuses; returns each group's settings after the load."""
        cls = type(self).__name__
        if not (isinstance(state_dict, Mapping) and isinstance(state_dict.get("param_groups"), (list, tuple))
                and isinstance(state_dict.get("state"), Mapping)):
            raise ValueError(f"Not an optimizer state dict (must be a dict with 'state' and 'param_groups'): "
                             f"{type(state_dict).__name__}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"The state dict has {len(saved_groups)} param group(s), this {cls} has "
                             f"{len(self.param_groups)}")
        expected = set(self.defaults) | {"params"}
        out = []
        for index, (live, saved) in enumerate(zip(self.param_groups, saved_groups)):
            # keys a learning-rate scheduler added to the live group (e.g. "initial_lr") travel with it
            keys = set(saved) - {"param_names"} - (set(live) - expected - {"param_names"})
            if keys != expected:
                raise ValueError(self._foreign_keys(index, keys, expected))
            if len(saved["params"]) != len(live["params"]):
                raise ValueError(f"Param group {index} of the state dict has {len(saved['params'])} parameter(s), "
                                 f"this {cls}'s has {len(live['params'])}")
            candidate = dict(saved, params=live["params"], param_names=live.get("param_names"))
            if _saved_callable(saved["projection"]):
                candidate["projection"] = live["projection"]  # a saved name cannot be validated; compared below
            try:
                checked = self._check_group(candidate, index)
            except ValueError as error:
                raise ValueError(f"Param group {index} of the state dict: {error}") from None
            for key in SUBSPACE_DEFAULTS:
                mine = spec.describe_setting(live[key])
                saved_name = key == "projection" and _saved_callable(saved[key])
                theirs = saved[key] if saved_name else spec.describe_setting(checked[key])
                if mine != theirs and not keep_settings:
                    raise ValueError(f"Param group {index}: the state dict's {key}={theirs} differs from this "
                                     f"{cls}'s {key}={mine} (load_state_dict(..., keep_settings=True) keeps "
                                     "this optimizer's settings)")
            if keep_settings:
                checked.update({key: live[key] for key in SUBSPACE_DEFAULTS})
            for i, (saved_id, p) in enumerate(zip(saved["params"], live["params"])):
                state = saved_state.get(saved_id)
                if state:
                    self._check_param_state(state, checked, p, self._param_name(live, index, i))
            out.append(checked)
        return out

    def _foreign_keys(self, index: int, keys: set[str], expected: set[str]) -> str:
        cls = type(self).__name__
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        what = f"param group {index} of the state dict lacks keys {missing} and has keys {extra}"
        if not keys & (set(SUBSPACE_DEFAULTS) - {"foreach"}):  # torch.optim groups have "foreach" too
            return (f"Not a subspace optimizer's state dict (a torch.optim one?): {what}; it cannot be loaded "
                    f"into {cls}")
        for other in _subclasses(SubspaceOptimizer):
            if other is not type(self) and keys == set(other.rule_keys) | set(SUBSPACE_DEFAULTS) | {"params"}:
                return f"A {other.__name__} state dict cannot be loaded into {cls}: {what}"
        return f"Not a {cls} state dict: {what}"

    def _check_param_state(self, state: Mapping[str, Any], settings: Mapping[str, Any], p: Tensor,
                           name: str) -> None:
        """A saved per-parameter state fits parameter ``p`` (named ``name``) under ``settings``."""
        shape = tuple(p.shape)
        rank = settings["rank"]
        if rank is None:
            tensors = {key: shape for key in self.rule_state}
        else:
            side = (proj.projected_side(shape, settings["proj_type"]) if distributed.sharding(p, name) is None
                    else distributed.sharded_side(settings["proj_type"]))  # FSDP2: as step() chooses it
            m, n = shape
            projected = (rank, n) if side == "left" else (m, rank)
            tensors = {key: projected for key in self.rule_state}
            tensors["proj"] = (m if side == "left" else n, rank)
        counters = ("step", "moment_start")
        for key, value in state.items():
            if key in switching.STATE_KEYS and settings["switch_step"] == "auto":
                continue  # GoLore@auto's period sums and decision record (switching.start_period shapes them)
            if key in counters:
                if not (spec.is_int(value) and value >= 0):
                    raise ValueError(f"State {key!r} of parameter {name} is {value!r} (must be an integer >= 0)")
            elif key not in tensors:
                raise ValueError(f"State of parameter {name} has an unknown entry {key!r} (a {type(self).__name__} "
                                 f"keeps {sorted([*counters, *tensors])})")
            elif not isinstance(value, Tensor) or tuple(value.shape) != tensors[key]:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"State {key!r} of parameter {name} with shape {shape} is {got}; rank {rank} "
                                 f"implies {tensors[key]}")

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
        """Perform one optimization step (see the module docstring for the algorithm).

        Phase 1 projects every gradient (refreshing the bases that are due); the non-finite check then looks at
        all projected gradients at once; phase 2 updates the states and the parameters. Parameters of a
        ``foreach`` group that share shape, side, dtype and step are refreshed, projected and updated together
        (:mod:`golore_lab.batched`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans, refreshes = self._plan()
        self._check_finite([plan.grad for plan in plans], [plan.name for plan in plans],
                           self._process_group(plans), [plan.position for plan in plans])
        for refresh in refreshes:
            for hook in list(self._refresh_hooks.values()):
                hook(self, refresh)
        for update, bucket in self._buckets(plans):
            update(bucket)
        return loss

    def _plan(self) -> tuple[list["_Plan"], list[Refresh]]:
        """Phase 1: regularized, projected local gradients; new bases where a refresh is due. Modifies nothing."""
        plans: list[_Plan] = []
        pending: dict[tuple, list[_Plan]] = {}  # foreach buckets, refreshed and projected together below
        position = -1
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                position += 1
                if p.grad is None:
                    continue
                name = self._param_name(group, gi, pi)
                if p.grad.is_sparse:
                    raise RuntimeError(f"Parameter {name} has a sparse gradient, which subspace optimizers do not "
                                       "support")
                shard = distributed.sharding(p, name)
                weight = distributed.local(p)
                grad = self._regularize(group, weight, distributed.local(p.grad))  # local rows when sharded
                state = self.state[p]
                plan = _Plan(group, name, position, p, weight, state, state.get("step", 0), None, state.get("proj"),
                             None, grad, shard, grad)
                plans.append(plan)
                if group["rank"] is None:
                    continue
                plan.side = (proj.projected_side(tuple(p.shape), group["proj_type"]) if shard is None
                             else distributed.sharded_side(group["proj_type"]))
                if self._foreach(plan):
                    pending.setdefault(_bucket_key(plan), []).append(plan)
                    continue
                plan.auto = self._auto_plan(group, state, grad, plan.side, position, plan.count, plan.due, shard)
                if plan.due:
                    plan.test = plan.auto.test if plan.auto else None
                    plan.random = switching.switched(state) or (plan.test is not None and plan.test.switch)
                    plan.new_basis = plan.basis = self._new_basis(group, grad, plan.side, position, plan.count,
                                                                  shard, name, plan.random,
                                                                  plan.auto and plan.auto.gram).to(p.dtype)
                plan.grad = self._project(grad, plan.basis, plan.side, shard, plan.auto)
        for bucket in pending.values():
            self._plan_batched(bucket)
        refreshes = [Refresh(plan.param, plan.name, plan.position, plan.count, plan.side,
                             self._kind(plan.group, plan.count, plan.random), plan.new_basis, plan.state.get("proj"),
                             plan.raw if plan.shard is None else plan.shard.wrap(plan.raw), plan.test)
                     for plan in plans if plan.new_basis is not None] if self._refresh_hooks else []
        return plans, refreshes

    def _plan_batched(self, bucket: list["_Plan"]) -> None:
        """Phase 1 for a bucket of equal-shape matrices: one batched SVD or QR at a refresh, one bmm projection."""
        first = bucket[0]
        group, side, count = first.group, first.side, first.count
        if first.due:
            kind = self._kind(group, count)
            grads = [plan.grad for plan in bucket]
            if kind == "random":
                generators = [proj.refresh_generator(group["seed"], plan.position, count) for plan in bucket]
                bases = batched.random_bases(tuple(first.weight.shape), group["rank"], side, generators,
                                             first.weight.dtype)
            else:
                self._check_finite(grads, [plan.name for plan in bucket])
                bases = (batched.svd_bases(grads, group["rank"], side) if kind == "svd" else
                         [proj.resolve(group["projection"])(g, group["rank"], side,
                                                            proj.refresh_generator(group["seed"], plan.position, count))
                          for plan, g in zip(bucket, grads)])
            for plan, basis in zip(bucket, bases):
                plan.new_basis = plan.basis = basis.to(first.weight.device, first.weight.dtype)
        for plan, projected in zip(bucket, batched.project([plan.grad for plan in bucket],
                                                           [plan.basis for plan in bucket], side)):
            plan.grad = projected

    @staticmethod
    def _foreach(plan: "_Plan") -> bool:
        """The batched path: for a group's unsharded matrices when its ``foreach`` is True (None: on CUDA)."""
        foreach = plan.group.get("foreach")
        if plan.shard is not None or plan.group["switch_step"] == "auto":  # GoLore@auto: per-parameter decisions
            return False
        return plan.weight.is_cuda if foreach is None else bool(foreach)

    @staticmethod
    def _project(grad: Tensor, basis: Tensor, side: str, shard: "distributed.Sharding | None",
                 auto: _Auto | None = None) -> Tensor:
        """R = Pᵀ G (r, n) or G Q (m, r); for a row-sharded G, G_k Q is local and Pᵀ G = Σ_k P_kᵀ G_k is summed.

        GoLore@auto on the sharded left side: when ``auto`` waits for its probe view, the same all-reduce carries
        ΠᵀG = Σ_k Π_kᵀ G_k ((r + q) × n numbers instead of r × n) and fills ``auto.view``.
        """
        if side == "right":
            return grad @ basis  # (m_k, r): local rows of G Q
        if shard is None:
            return basis.T @ grad  # (r, n)
        rows = slice(shard.offset, shard.offset + shard.rows)
        if auto is None or auto.probe is None:
            return distributed.all_reduce_sum(basis[rows].T @ grad, shard.group)  # (r, n), one collective per step
        both = distributed.all_reduce_sum(torch.cat([basis[rows], auto.probe[rows]], 1).T @ grad, shard.group)
        rank = basis.shape[1]
        auto.view = both[rank:]  # (q, n)
        return both[:rank]  # (r, n)

    @staticmethod
    def _kind(group: dict[str, Any], count: int, random: bool = False) -> str:
        switch = group["switch_step"]
        if random or (spec.is_int(switch) and count >= switch):
            return "random"
        return group["projection"] if isinstance(group["projection"], str) else "custom"

    def _new_basis(self, group: dict[str, Any], grad: Tensor, side: str, position: int, count: int,
                   shard: "distributed.Sharding | None", name: str, random: bool = False,
                   gram: Tensor | None = None) -> Tensor:
        """The refreshed basis, identical on every rank. A sharded matrix's random basis needs only its shape;
        its SVD basis comes from the all-reduced Gram matrix (right side; ``gram``: already all-reduced by
        GoLore@auto's test) or the all-gathered gradient (left). ``random``: GoLore@auto has switched this
        parameter. A user's projector's result is checked."""
        kind = self._kind(group, count, random)
        projector = proj.resolve(group["projection"]) if kind == "custom" else proj.BUILTIN[kind]
        generator = proj.refresh_generator(group["seed"], position, count)
        device = grad.device
        if shard is not None:
            if kind == "random":
                grad = torch.empty(shard.shape, dtype=grad.dtype, device="meta")
            elif kind == "svd" and side == "right":
                try:
                    if gram is None:
                        gram = distributed.gram_matrix(grad, shard.group)[0]
                    return distributed.right_basis(gram, group["rank"]).to(grad.device)
                except FloatingPointError:
                    raise FloatingPointError(f"Non-finite gradient in parameter {name}; step skipped, no parameter "
                                             "or optimizer state was changed") from None
            else:
                grad = shard.wrap(grad).full_tensor()  # (m, n): one all-gather at this refresh
        if kind != "random":
            self._check_finite([grad], [name])
        basis = projector(grad, group["rank"], side, generator)
        if kind == "custom":
            self._check_basis(basis, group, grad, side, position)
        if shard is not None:  # as a DCP checkpoint stores it: a resumed step multiplies with the same layout
            return basis.to(device).contiguous()  # (a QR's Q is column-major; BLAS rounds by layout)
        return basis.to(device)

    def _check_basis(self, basis: Any, group: dict[str, Any], grad: Tensor, side: str, position: int) -> None:
        dim = grad.shape[0] if side == "left" else grad.shape[1]
        try:
            proj.check_basis(basis, dim, group["rank"])
        except ValueError as error:
            raise ValueError(f"The projector {spec.describe_setting(group['projection'])} for parameter "
                             f"{self._name_at(position)} ({side} side, rank {group['rank']}) {error}") from None

    # ---------------------------------------------------------------- GoLore@auto (see golore_lab.switching)
    def _auto_plan(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor, side: str, position: int,
                   count: int, refresh: bool, shard: "distributed.Sharding | None" = None) -> _Auto | None:
        """Phase 1 of GoLore@auto, changing nothing: the :class:`_Auto` plan, or None (not auto, or switched).

        Row-sharded (FSDP2) matrices, with no collective beyond the non-auto step's: on the right side (the
        default) the probe's view GΠ is local rows and each rank's pair products are its rows' share, so at an SVD
        refresh they are summed in the Gram matrix's all-reduce (returned in ``gram`` for the new basis; discarded
        when the test switches) and every rank decides from the same sums; on the left side R and ΠᵀG come out of
        one all-reduce per step (:meth:`_project`), global on every rank, and the test needs nothing more.
        """
        if group["switch_step"] != "auto" or switching.switched(state):
            return None
        if not refresh:
            if "auto_steps" not in state:  # no period: switch_step set to "auto" mid-period, or rank = the side
                return None
            # a fresh probe per pair, from the stream (seed, −1 − position, step) that no parameter's random basis
            # uses: independent of the noise, and the same on every DDP / FSDP rank (from the replicated basis)
            probe = switching.next_probe(state, state["proj"], proj.derive_seed(group["seed"], -1 - position, count),
                                         group["update_proj_gap"])
            if probe is None:  # the period's last step would open a pair that this refresh cannot close
                return None
            if side == "left" and shard is not None:
                return _Auto(side, False, probe=probe)  # the view comes with R's all-reduce
            return _Auto(side, False, view=probe.T @ grad if side == "left" else grad @ probe, probe=probe)
        reduce = gram = None
        if side == "right" and shard is not None:
            pairs = state.get("auto_pairs")
            if self._kind(group, count) == "svd":
                gram, summed = distributed.gram_matrix(grad, shard.group, pairs)
            else:  # no Gram matrix to carry them (a user's projector): their own all-reduce of 2J numbers
                summed = None if pairs is None else distributed.all_reduce_sum(pairs.double(), shard.group)
            if summed is not None:  # rounded to the pairs' dtype, as a checkpoint keeps them (_auto_saved)
                reduce = lambda _: summed.to(pairs.dtype)
        test = switching.decide(state, group["rank"], reduce)
        return _Auto(side, True, test, gram=None if test is not None and test.switch else gram)

    @staticmethod
    def _auto_update(state: dict[str, Any], plan: _Auto | None, projected: Tensor, count: int) -> None:
        """Phase 2 of GoLore@auto: apply the plan of :meth:`_auto_plan` (after the new basis is in ``state``)."""
        if plan is None:
            return
        if not plan.refresh:
            switching.accumulate(state, projected, plan.view, plan.probe)
        elif plan.test is not None and plan.test.switch:
            switching.record(state, count, plan.test)
        elif min(state["proj"].shape) < max(state["proj"].shape):  # else nothing lies outside the subspace
            switching.start_period(state, state["proj"], tuple(projected.shape), plan.side)

    def _auto_saved(self, state_dict: dict[str, Any]) -> None:
        """Put each row-sharded parameter's GoLore@auto state in ``state_dict`` (``Optimizer.state_dict``'s) in
        a layout of fixed keys and shapes, the same before the first refresh, mid-period and after the switch.

        ``torch.distributed.checkpoint`` loads into the state dict of a fresh optimizer (one zero-gradient step
        taken), which must hold every saved key with its saved shape; the live state's keys change at the switch
        and its pairs grow. The layout: ``auto_steps`` (−1: no period), ``auto_switched_at`` (−1: not switched),
        ``auto_signal``, ``auto_random_signal``, ``auto_t`` (NaN until switched), ``auto_probe`` Π (d, q),
        ``auto_prev`` and ``auto_probe_prev`` (zeros outside a period; on the right side row-sharded DTensors
        (m, r) and (m, q) like the moments, so any world size re-cuts them exactly; on the left side (r, n) and
        (q, n), equal on every rank), and ``auto_pairs`` (gap − 2, 2): the period's J pair products in its first
        rows, zero-padded, row ⌊(gap − 1)/2⌋ (past the last pair a period can have) NaN, the mark of the
        disjoint-pair test (the previous test's layout had no mark), summed over the ranks on the right side
        (one all-reduce here for all parameters, in float64, rounded to their dtype as the test rounds them), so
        that a resume at any world size has the exact sums.
        """
        shares: dict[Any, tuple[distributed.Sharding, list[dict[str, Any]]]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            if group["rank"] is None or group["switch_step"] != "auto":
                continue
            for pi, (p, index) in enumerate(zip(group["params"], saved["params"])):
                live, name = state_dict["state"].get(index), self._param_name(group, gi, pi)
                shard = distributed.sharding(p, name)
                if not live or shard is None:
                    continue
                side = distributed.sharded_side(group["proj_type"])
                fixed = state_dict["state"][index] = _auto_fixed(live, group, p, shard, side, name)
                if side == "right":
                    shares.setdefault(shard.mesh, (shard, []))[1].append(fixed)
        for shard, fixed in shares.values():
            sizes = [f["auto_pairs"].numel() for f in fixed]
            total = distributed.all_reduce_sum(torch.cat([f["auto_pairs"].double().reshape(-1) for f in fixed]),
                                               shard.group)
            for f, summed in zip(fixed, total.split(sizes)):
                f["auto_pairs"] = summed.view(f["auto_pairs"].shape).to(f["auto_pairs"].dtype)

    def _auto_loaded(self, state_dict: Any) -> Any:
        """``state_dict`` with :meth:`_auto_saved`'s layout turned back into the live GoLore@auto state
        (a new mapping; anything not in that layout, or malformed, is left to :meth:`_check_loadable`).

        Right side: the saved pair products are the sums over the ranks; the mesh's first rank takes them and
        the others zeros, so that the next test's all-reduce adds the same sums (bit for bit: x + 0 = x).

        A period in progress saved by the previous GoLore@auto test (one probe per period, overlapping pairs) is
        refused with a ``ValueError`` (:func:`golore_lab.switching.check_period`; in this layout: no mark row
        and more than two steps into the period); its switch record, or a state between periods, loads.
        """
        if not (isinstance(state_dict, Mapping) and isinstance(state_dict.get("state"), Mapping)
                and isinstance(state_dict.get("param_groups"), (list, tuple))):
            return state_dict
        states = dict(state_dict["state"])
        for gi, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            ids = saved.get("params", ()) if isinstance(saved, Mapping) else ()
            for pi, (p, index) in enumerate(zip(group["params"], ids)):
                fixed = states.get(index)
                if isinstance(fixed, Mapping) and "auto_steps" in fixed and "auto_switched_at" not in fixed:
                    switching.check_period(fixed, self._param_name(group, gi, pi))  # the live layout
                if not (isinstance(fixed, Mapping) and {"auto_steps", "auto_switched_at"} <= set(fixed)):
                    continue
                if not (spec.is_int(fixed["auto_steps"]) and spec.is_int(fixed["auto_switched_at"])):
                    raise ValueError(f"State of parameter {self._param_name(group, gi, pi)}: auto_steps="
                                     f"{fixed['auto_steps']!r}, auto_switched_at={fixed['auto_switched_at']!r} "
                                     "(must be integers)")
                live = {key: value for key, value in fixed.items() if key not in switching.STATE_KEYS}
                if fixed["auto_switched_at"] >= 0:
                    live.update({key: fixed[key] for key in ("auto_switched_at", "auto_signal", "auto_random_signal",
                                                              "auto_t")})
                elif fixed["auto_steps"] >= 0:
                    saved_pairs, steps = fixed["auto_pairs"], fixed["auto_steps"]
                    mark = (saved_pairs.shape[0] + 1) // 2  # ⌊(gap − 1)/2⌋ for the saved gap − 2 rows
                    if steps > 2 and not (saved_pairs.shape[0] > mark and bool(saved_pairs[mark].isnan().all())):
                        switching.check_period({"auto_steps": steps, "auto_pairs": saved_pairs[:steps - 1]},
                                               self._param_name(group, gi, pi))
                    pairs = saved_pairs[:steps // 2].clone()
                    shard = distributed.sharding(p, self._param_name(group, gi, pi))
                    if (shard is not None and distributed.sharded_side(group["proj_type"]) == "right"
                            and shard.mesh.get_local_rank() != 0):
                        pairs.zero_()
                    live.update(auto_steps=fixed["auto_steps"], auto_probe=fixed["auto_probe"],
                                auto_prev=distributed.local(fixed["auto_prev"]),
                                auto_probe_prev=distributed.local(fixed["auto_probe_prev"]), auto_pairs=pairs)
                states[index] = live
        return {**state_dict, "state": states}

    def switch_log(self) -> list[dict[str, Any]]:
        """GoLore@auto's switches so far, one record per switched parameter in parameter order.

        Keys: ``name`` (from ``param_names``, else ``param_groups[g]['params'][i]``), ``position``, ``step`` (the
        refresh whose basis was the first random one), ``signal``, ``random_signal`` and ``t`` (the estimates of
        ‖Pᵀg‖² and (r/d)‖g‖² and the t-statistic of the :class:`golore_lab.switching.SwitchTest` that triggered
        it). ``pandas.DataFrame(opt.switch_log())``
        prints or plots it; it is rebuilt from the optimizer state, so it survives a checkpoint.
        """
        log, position = [], -1
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                position += 1
                state = self.state.get(p, {})
                if switching.switched(state):
                    log.append({"name": names[pi] if names else f"param_groups[{gi}]['params'][{pi}]",
                                "position": position, "step": state["auto_switched_at"],
                                "signal": state["auto_signal"], "random_signal": state["auto_random_signal"],
                                "t": state["auto_t"]})
        return log

    def _refresh_state(self, group: dict[str, Any], state: dict[str, Any], side: str, transport: Tensor,
                       count: int) -> None:
        rules.refresh_state(state, group["state_on_refresh"], side, transport)
        if group["state_on_refresh"] == "reset":
            state["moment_start"] = count  # the bias correction restarts with the moments

    def _update(self, plan: "_Plan") -> None:
        """Phase 2 for one parameter: carry the state at a refresh, apply the rule, update W (its local rows)."""
        group, state, side, basis = plan.group, plan.state, plan.side, plan.basis
        tensors = _local_state(state)
        if plan.new_basis is not None:
            if "proj" in state:
                self._refresh_state(group, tensors, side, proj.transport(side, state["proj"], plan.new_basis),
                                    plan.count)
            state["proj"] = plan.new_basis
        tensors["step"] = plan.count + 1
        numerator, denominator, factor = self._direction(group, tensors, plan.grad,
                                                         plan.count + 1 - tensors.get("moment_start", 0))
        self._store_state(state, tensors, plan)
        self._auto_update(state, plan.auto, plan.grad, plan.count)
        p, lr = plan.weight, group["lr"]
        self._decay(group, p)
        if side is None:  # full space: one fused update, no temporary the size of p
            if torch.is_tensor(lr):
                direction = numerator if denominator is None else numerator / denominator
                p.add_(direction * (lr * -factor))
            elif denominator is None:
                p.add_(numerator, alpha=-lr * factor)
            else:
                p.addcdiv_(numerator, denominator, value=-lr * factor)
            return
        direction = numerator if denominator is None else numerator / denominator  # (r, n) or (m, r)
        alpha = -group["scale"] * factor
        if torch.is_tensor(lr):
            direction = direction * lr  # low-rank: cheap, and addmm_ needs a number for alpha
        else:
            alpha *= lr
        if side == "left":
            rows = basis if plan.shard is None else basis[plan.shard.offset:plan.shard.offset + plan.shard.rows]
            p.addmm_(rows, direction, alpha=alpha)  # W += α P N, (m, r) @ (r, n), no (m, n) temporary
        else:
            p.addmm_(direction, basis.T, alpha=alpha)  # W += α N Qᵀ, (m, r) @ (r, n)

    def _update_batched(self, plans: list["_Plan"]) -> None:
        """Phase 2 for matrices of one group with equal shape, side, dtype and step count, stacked: one batched
        transport, one ``foreach`` rule and one batched matmul instead of a loop (see :mod:`golore_lab.batched`)."""
        group, side = plans[0].group, plans[0].side
        states = [_local_state(plan.state) for plan in plans]
        if plans[0].new_basis is not None and "proj" in plans[0].state:
            transports = batched.transports(side, [plan.state["proj"] for plan in plans],
                                            [plan.new_basis for plan in plans])
            for tensors, transport in zip(states, transports):
                self._refresh_state(group, tensors, side, transport, plans[0].count)
        for plan, tensors in zip(plans, states):
            if plan.new_basis is not None:
                plan.state["proj"] = plan.new_basis
            tensors["step"] = plan.count + 1
        count = plans[0].count + 1 - states[0].get("moment_start", 0)
        directions, factor = self._directions(group, states, [plan.grad for plan in plans], count)
        for plan, tensors in zip(plans, states):
            self._store_state(plan.state, tensors, plan)
            self._decay(group, plan.weight)
        lr, alpha = group["lr"], -group["scale"] * factor
        if torch.is_tensor(lr):
            torch._foreach_mul_(directions, lr)
        else:
            alpha *= lr
        batched.add_back_projection([plan.weight for plan in plans], [plan.basis for plan in plans], directions,
                                    side, alpha)

    def _directions(self, group: dict[str, Any], states: list[dict[str, Any]], grads: list[Tensor],
                    count: int) -> tuple[list[Tensor], float]:
        """The rule's directions N for a bucket (one ``foreach`` pass where the rule has one)."""
        out, factor = [], 1.0
        for tensors, grad in zip(states, grads):
            numerator, denominator, factor = self._direction(group, tensors, grad, count)
            out.append(numerator.clone() if denominator is None else numerator / denominator)
        return out, factor

    def _buckets(self, plans: list["_Plan"]) -> list[tuple[Callable[[list["_Plan"]], None], list["_Plan"]]]:
        """Phase 2 as ``(update, plans)`` pairs, in order: single plans, the full-space buckets of a fused rule
        (one per group, device and dtype), then the ``foreach`` buckets of phase 1."""
        full: dict[tuple, list[_Plan]] = {}
        buckets: dict[tuple, list[_Plan]] = {}
        singles = []
        for plan in plans:
            if plan.side is None and self._fusable(plan):
                full.setdefault((id(plan.group), plan.weight.device, plan.weight.dtype), []).append(plan)
            elif plan.side is None or not self._foreach(plan):
                singles.append((self._update_one, [plan]))
            else:
                buckets.setdefault(_bucket_key(plan), []).append(plan)
        return (singles + [(self._update_full, bucket) for bucket in full.values()]
                + [(self._update_batched if len(b) > 1 else self._update_one, b) for b in buckets.values()])

    def _update_one(self, plans: list["_Plan"]) -> None:
        self._update(plans[0])

    def _fusable(self, plan: "_Plan") -> bool:
        """Whether the full-space parameter of ``plan`` goes through :meth:`_update_full` (a rule with a fused
        kernel says so); otherwise :meth:`_update` takes it."""
        return False

    def _update_full(self, plans: list["_Plan"]) -> None:
        """Phase 2 for full-space parameters of one group, device and dtype, in one fused kernel (subclasses)."""
        raise NotImplementedError

    @staticmethod
    def _store_state(state: dict[str, Any], tensors: dict[str, Any], plan: "_Plan") -> None:
        """Write the rule's local state back; a sharded parameter's row-sharded moments become DTensors again."""
        sharded_rows = plan.shard is not None and plan.side != "left"
        for key, value in tensors.items():
            if sharded_rows and torch.is_tensor(value) and key != "proj":
                old = state.get(key)
                if old is None or distributed.local(old).data_ptr() != value.data_ptr():
                    state[key] = plan.shard.wrap(value)
            else:
                state[key] = value
        for key in set(state) - set(tensors) - {"proj"}:
            del state[key]

    @staticmethod
    def _process_group(plans: list["_Plan"]):
        meshes = {plan.shard.mesh: plan.shard for plan in plans if plan.shard is not None}  # equal meshes hash equal
        if len(meshes) > 1:
            raise ValueError("Parameters sharded over different device meshes in one optimizer are not supported")
        return next(iter(meshes.values())).group if meshes else None

    def _check_finite(self, tensors: list[Tensor], names: list[str], group=None,
                      positions: list[int] | None = None) -> None:
        """Raise ``FloatingPointError`` naming the first parameter whose tensor is not finite.

        One fused 2-norm per tensor (accumulated in float32 for half types; an inf-norm is 8x slower on CPU; a
        norm that overflows float32 counts as non-finite), then ONE host read of the result: the only host
        synchronisation of a regular step. Sharded: the squared local norms are summed over ``group`` (one
        all-reduce of one number per parameter), so all ranks see the same flags. With
        ``finite_check = "deferred"`` and ``positions`` given, the flags are accumulated on the device instead
        and read by :meth:`raise_if_nonfinite`.
        """
        if not tensors:
            return
        halves = {torch.float16, torch.bfloat16}
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) if t.dtype in halves else None for t in tensors]
        rest = [t for t, n in zip(tensors, norms) if n is None]
        fused = iter(torch._foreach_norm(rest, 2) if rest else [])
        norms = [next(fused) if n is None else n for n in norms]
        device = norms[0].device
        norms = torch.stack([n.to(device, torch.float32) for n in norms])
        if group is not None:
            norms = distributed.all_reduce_sum(norms.double().square(), group)
        bad = ~torch.isfinite(norms)
        if self.finite_check == "deferred" and positions is not None:
            flags = self.__dict__.get("_nonfinite")
            if flags is None or flags.device != device:
                flags = self.__dict__["_nonfinite"] = torch.zeros(sum(len(g["params"]) for g in self.param_groups),
                                                                  dtype=torch.bool, device=device)
            cached = self.__dict__.get("_positions")
            if cached is None or cached[0] != positions or cached[1].device != device:  # a host-to-device copy
                cached = self.__dict__["_positions"] = (positions, torch.tensor(positions, device=device))
            index = cached[1]
            flags[index] = flags[index] | bad
            return
        if bool(bad.any()):
            raise FloatingPointError(
                f"Non-finite gradient in parameter {names[int(bad.to(torch.uint8).argmax())]}; "
                "step skipped, no parameter or optimizer state was changed"
            )

    def raise_if_nonfinite(self) -> None:
        """With ``finite_check = "deferred"``: raise ``FloatingPointError`` naming every parameter that had a
        non-finite gradient since the last call (one host read), and clear the record.

        Unlike the default ``"sync"`` check, the steps have already been applied by then (as ``torch.optim``
        would), so parameters and state may hold non-finite values: reload a checkpoint.
        """
        flags = self.__dict__.pop("_nonfinite", None)
        if flags is None or not bool(flags.any()):
            return
        names, position = [], -1
        for gi, group in enumerate(self.param_groups):
            for pi in range(len(group["params"])):
                position += 1
                if flags[position]:
                    names.append(self._param_name(group, gi, pi))
        raise FloatingPointError(f"Non-finite gradient in parameter(s) {', '.join(names)} since the last check; "
                                 "the steps were applied (finite_check='deferred')")

    # ---------------------------------------------------------------- the rule (subclasses)
    def _regularize(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> Tensor:
        return grad

    def _decay(self, group: dict[str, Any], p: Tensor) -> None:
        pass

    def _direction(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                   count: int) -> tuple[Tensor, Tensor | None, float]:
        """The rule's direction N = factor · numerator / denominator (denominator None: N = factor · numerator)."""
        raise NotImplementedError


class SubspaceAdamW(SubspaceOptimizer):
    """AdamW in a low-rank subspace: GaLore (``projection="svd"``), GoLore (``"random"``), GoLore@x%.

    Param groups take galore-torch's keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) plus
    ``projection``, ``switch_step`` (or ``switch_fraction`` with ``total_steps``), ``state_on_refresh`` and
    ``seed`` (:mod:`golore_lab.spec`); the constructor's keywords are the defaults of every group. Groups
    without ``rank`` are plain ``torch.optim.AdamW`` -- bit for bit ``AdamW(fused=True)``, whose kernel they use
    where it can take them (a floating, contiguous parameter on a device that has the kernel).

    The rule is ``torch.optim.AdamW``'s: moments ``exp_avg`` and ``exp_avg_sq`` of the projected gradient
    (r × n), bias correction counted across refreshes, decoupled weight decay ``W ← (1 − lr·wd) W`` applied to
    the whole matrix in the full space. At a refresh (``state_on_refresh``):

    * ``"project"`` (default): the paper's momentum projection ``m ← O m`` with O = P_newᵀ P_old, and the second
      moment ``v ← (O∘O) v`` -- non-negative, unchanged for an unchanged basis; justified in
      :func:`golore_lab.rules.carry_second_moment`;
    * ``"keep"``: the moments are reused as they are (the original GaLore, ``galore_torch.GaLoreAdamW``);
    * ``"reset"``: both moments restart at zero and so does the bias correction.

    Example -- GaLore for the first 80% of 1000 steps, GoLore for the last 20% (GoLore@20%)::

        opt = SubspaceAdamW([{"params": matrices, "rank": 128, "update_proj_gap": 200},
                             {"params": others}], lr=1e-3, switch_fraction=0.2, total_steps=1000)

    (the same as ``switch_step=800``; :func:`golore_lab.spec.subspace_param_groups` builds such groups from a
    model).
    """

    rule_keys = ("lr", "betas", "eps", "weight_decay")
    rule_state = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **subspace: Any) -> None:
        rule = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, self._defaults(rule, subspace))

    def _check_rule(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return spec.check_adamw(group)

    def _decay(self, group: dict[str, Any], p: Tensor) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])

    def _direction(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                   count: int) -> tuple[Tensor, Tensor, float]:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        if batched.fusable(grad, state["exp_avg"], state["exp_avg_sq"]):  # N itself, bias correction included
            direction, = batched.fused_adamw_directions([grad], [state["exp_avg"]], [state["exp_avg_sq"]], count,
                                                        beta1, beta2, group["eps"])
            return direction, None, 1.0
        return rules.adamw_direction(grad, state["exp_avg"], state["exp_avg_sq"], count, beta1, beta2, group["eps"])

    def _directions(self, group: dict[str, Any], states: list[dict[str, Any]], grads: list[Tensor],
                    count: int) -> tuple[list[Tensor], float]:
        for tensors, grad in zip(states, grads):
            if "exp_avg" not in tensors:
                tensors["exp_avg"] = torch.zeros_like(grad)
                tensors["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = [t["exp_avg"] for t in states], [t["exp_avg_sq"] for t in states]
        if batched.fusable(*grads, *exp_avgs, *exp_avg_sqs):
            return batched.fused_adamw_directions(grads, exp_avgs, exp_avg_sqs, count, beta1, beta2, group["eps"]), 1.0
        return batched.adamw_directions(grads, exp_avgs, exp_avg_sqs, count, beta1, beta2, group["eps"])

    def _fusable(self, plan: "_Plan") -> bool:
        """Full-space parameters go through torch's fused AdamW kernel when it can take them
        (:func:`golore_lab.batched.fusable`); a sharded (FSDP2) parameter through its local rows, which the
        update treats element by element, as one process would."""
        moments = [distributed.local(plan.state[key]) for key in self.rule_state if key in plan.state]
        return batched.fusable(plan.weight, plan.grad, *moments)

    def _update_full(self, plans: list["_Plan"]) -> None:
        """The full-space parameters of one group, device and dtype in torch's fused AdamW kernel (what
        ``torch.optim.AdamW(fused=True)`` computes): moments, bias-corrected quotient and decoupled weight decay in
        one pass over each tensor instead of eight element-wise kernels -- the embeddings and head of an LLM are
        most of a subspace step's element-wise work. Bias correction from each parameter's ``step``."""
        group = plans[0].group
        states = [_local_state(plan.state) for plan in plans]
        for plan, tensors in zip(plans, states):
            if "exp_avg" not in tensors:
                tensors["exp_avg"] = torch.zeros_like(plan.grad)
                tensors["exp_avg_sq"] = torch.zeros_like(plan.grad)
            tensors["step"] = plan.count + 1
        beta1, beta2 = group["betas"]
        batched.fused_adamw_([plan.weight for plan in plans], [plan.grad for plan in plans],
                             [t["exp_avg"] for t in states], [t["exp_avg_sq"] for t in states],
                             [plan.count + 1 for plan in plans], group["lr"], beta1, beta2, group["eps"],
                             group["weight_decay"])
        for plan, tensors in zip(plans, states):
            self._store_state(plan.state, tensors, plan)


class SubspaceSGD(SubspaceOptimizer):
    """Momentum SGD in a low-rank subspace: GaLore, GoLore, GoLore@x% (see :class:`SubspaceAdamW` for keys).

    The rule is ``torch.optim.SGD``'s, with the same ``momentum``, ``dampening`` and ``nesterov``; the paper's
    MSGD ``M ← (1−β₁) M + β₁ R`` is ``momentum = dampening = 1 − β₁`` (see :func:`golore_lab.rules.sgd_direction`
    for the first step). ``weight_decay`` is torch's coupled L2 term, added to the gradient before projection:
    the method then optimizes f(W) + wd/2 ‖W‖² exactly as the paper's algorithm would. At a refresh the
    ``momentum_buffer`` is projected (``"project"``, the paper's MP), kept, or dropped (``"reset"``).
    """

    rule_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    rule_state = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, **subspace: Any) -> None:
        rule = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, self._defaults(rule, subspace))

    def _check_rule(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return spec.check_sgd(group)

    def _regularize(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> Tensor:
        return grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else grad

    def _direction(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                   count: int) -> tuple[Tensor, None, float]:
        direction, buffer = rules.sgd_direction(grad, state.get("momentum_buffer"), group["momentum"],
                                                group["dampening"], group["nesterov"])
        if buffer is not None:
            state["momentum_buffer"] = buffer
        return direction, None, 1.0


def microbatches(optimizer: SubspaceOptimizer, base: int, refresh: int) -> int:
    """How many micro-batches to accumulate before the next ``step()``: ``refresh`` at refresh steps, else ``base``.

    Large-batch GaLore in a gradient-accumulation loop::

        for step in range(total_steps):
            k = microbatches(opt, base=1, refresh=8)   # 8x the batch when the SVD is taken
            for _ in range(k):
                (loss_fn(model, next(batches)) / k).backward()
            opt.step(); opt.zero_grad()
    """
    if not (spec.is_int(base) and spec.is_int(refresh) and base >= 1 and refresh >= 1):
        raise ValueError(f"Invalid micro-batch counts: base={base!r}, refresh={refresh!r} (must be integers >= 1)")
    return refresh if optimizer.refresh_due() else base
