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
at t ≥ K use random projections; for x% random steps out of T, K = round((1 − x/100) · T). Large-batch GaLore
is GaLore fed a larger batch at the steps where :meth:`SubspaceOptimizer.refresh_due` is True
(:func:`microbatches`).

Groups without ``rank`` (biases, norms, embeddings) use the same rule in the full space, which is exactly
``torch.optim.AdamW`` / ``torch.optim.SGD``.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import batched, distributed
from . import projection as proj
from . import rules

SUBSPACE_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "projection": "svd",
    "switch_step": None,
    "state_on_refresh": "project",
    "seed": 0,
    "foreach": None,
}


@dataclass(frozen=True)
class Refresh:
    """What a refresh hook sees: one parameter's new basis and the gradient it was chosen from.

    ``basis`` is (m, r) for ``side="left"`` and (n, r) for ``side="right"``; ``previous`` is the basis it
    replaces (``None`` at the first refresh); ``gradient`` is the (m, n) gradient of that step (the large batch
    for L.B. GaLore); ``step`` the parameter's step index; ``kind`` ``"svd"``, ``"random"`` or ``"custom"``.
    The tensors are the optimizer's own: clone them to keep them.
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

    @property
    def due(self) -> bool:
        return self.basis is None or self.new_basis is not None or self.count % self.group["update_proj_gap"] == 0


def _bucket_key(plan: _Plan) -> tuple:
    return (id(plan.group), tuple(plan.weight.shape), plan.side, plan.weight.dtype, plan.weight.device, plan.count,
            plan.state.get("proj") is None)


def _local_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with local shards for DTensors (views sharing storage) and without the basis."""
    return {key: distributed.local(value) for key, value in state.items() if key != "proj"}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class SubspaceOptimizer(Optimizer):
    """Base class: projection, refresh schedule, state transport and the update ``W ← W − lr·scale·P N``.

    Subclasses supply the rule through :meth:`_validate_rule`, :meth:`_direction`, :meth:`_carry` and,
    for coupled weight decay, :meth:`_regularize`. Use :class:`SubspaceAdamW` or :class:`SubspaceSGD`.

    Per-parameter state (tensors and numbers only, so ``torch.load(..., weights_only=True)`` works):
    ``step`` (steps taken), ``proj`` (the basis, (m, r) or (n, r), in the parameter's dtype), the rule's
    tensors in subspace coordinates, and ``moment_start`` after a ``"reset"`` refresh. Random bases are a pure
    function of (``seed``, parameter position, step) (:func:`golore_lab.projection.derive_seed`), so there
    is no generator state to lose and all DDP ranks draw the same basis.

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
    sharded like them; see :mod:`golore_lab.distributed` for the sides, the collectives and the caveats.
    """

    finite_check = "sync"  # "sync" or "deferred" (see above)

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self._refresh_hooks: OrderedDict[int, Callable[["SubspaceOptimizer", Refresh], None]] = OrderedDict()
        super().__init__(params, defaults)

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
        allowed = set(self.defaults) | {"params", "param_names"}
        unknown = sorted(set(param_group) - allowed)
        if unknown:
            raise ValueError(f"Unknown param-group key(s) {unknown} (allowed: {sorted(allowed - {'params'})})")
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1], len(self.param_groups) - 1)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        lr = group["lr"]
        if not _is_real(lr) or lr < 0:
            raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
        if not _is_real(group["weight_decay"]) or group["weight_decay"] < 0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']!r} (must be >= 0)")
        self._validate_rule(group)
        if group["state_on_refresh"] not in rules.STATE_ON_REFRESH:
            raise ValueError(
                f"Invalid state_on_refresh: {group['state_on_refresh']!r} (must be 'project', 'keep' or 'reset')"
            )
        if not _is_int(group["seed"]):
            raise ValueError(f"Invalid seed: {group['seed']!r} (must be an integer)")
        rank = group["rank"]
        if rank is None:
            return
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"Invalid rank: {rank!r} (must be an integer >= 1)")
        gap = group["update_proj_gap"]
        if not _is_int(gap) or gap < 1:
            raise ValueError(f"Invalid update_proj_gap: {gap!r} (must be an integer >= 1)")
        if not _is_real(group["scale"]) or group["scale"] <= 0:
            raise ValueError(f"Invalid scale: {group['scale']!r} (must be a finite number > 0)")
        if group["proj_type"] not in proj.PROJ_TYPES:
            raise ValueError(
                f"Invalid proj_type: {group['proj_type']!r} (must be one of {', '.join(map(repr, proj.PROJ_TYPES))})"
            )
        proj.resolve(group["projection"])
        switch = group["switch_step"]
        if switch is not None and (not _is_int(switch) or switch < 0):
            raise ValueError(f"Invalid switch_step: {switch!r} (must be None or an integer >= 0)")
        for i, p in enumerate(group["params"]):
            name = self._param_name(group, index, i)
            if p.dim() != 2:
                raise ValueError(
                    f"Parameter {name} has shape {tuple(p.shape)}: a group with a rank must hold matrices only "
                    "(put vectors and conv kernels in a group without 'rank')"
                )
            if rank > min(p.shape):
                raise ValueError(f"Invalid rank: {rank} exceeds min(m, n) = {min(p.shape)} of parameter {name} "
                                 f"with shape {tuple(p.shape)}")

    @staticmethod
    def _param_name(group: dict[str, Any], group_index: int, param_index: int) -> str:
        names = group.get("param_names")
        if names:
            return repr(names[param_index])
        return f"param_groups[{group_index}]['params'][{param_index}]"

    def state_dict(self) -> dict[str, Any]:
        """As ``Optimizer.state_dict``; a user's projector object is saved by name only (tensors-only state)."""
        state = super().state_dict()
        for group in state["param_groups"]:
            if callable(group["projection"]):
                name = getattr(group["projection"], "__qualname__", type(group["projection"]).__qualname__)
                group["projection"] = f"<callable {name}>"
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``; keeps this optimizer's own projector objects."""
        live = [group["projection"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, projector in zip(self.param_groups, live):
            if isinstance(group["projection"], str) and group["projection"].startswith("<callable"):
                group["projection"] = projector

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
        for bucket in self._buckets(plans):
            if len(bucket) > 1:
                self._update_batched(bucket)
            else:
                self._update(bucket[0])
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
                if plan.due:
                    plan.new_basis = plan.basis = self._new_basis(group, grad, plan.side, position, plan.count,
                                                                  shard, name).to(p.dtype)
                plan.grad = self._project(grad, plan.basis, plan.side, shard)
        for bucket in pending.values():
            self._plan_batched(bucket)
        refreshes = [Refresh(plan.param, plan.name, plan.position, plan.count, plan.side,
                             self._kind(plan.group, plan.count), plan.new_basis, plan.state.get("proj"),
                             plan.raw if plan.shard is None else plan.shard.wrap(plan.raw))
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
        return plan.shard is None and (plan.weight.is_cuda if foreach is None else bool(foreach))

    @staticmethod
    def _project(grad: Tensor, basis: Tensor, side: str, shard: "distributed.Sharding | None") -> Tensor:
        """R = Pᵀ G (r, n) or G Q (m, r); for a row-sharded G, G_k Q is local and Pᵀ G = Σ_k P_kᵀ G_k is summed."""
        if side == "right":
            return grad @ basis  # (m_k, r): local rows of G Q
        if shard is None:
            return basis.T @ grad  # (r, n)
        rows = basis[shard.offset:shard.offset + shard.rows]  # (m_k, r)
        return distributed.all_reduce_sum(rows.T @ grad, shard.group)  # (r, n), one collective per step

    @staticmethod
    def _kind(group: dict[str, Any], count: int) -> str:
        switch = group["switch_step"]
        if switch is not None and count >= switch:
            return "random"
        return group["projection"] if isinstance(group["projection"], str) else "custom"

    def _new_basis(self, group: dict[str, Any], grad: Tensor, side: str, position: int, count: int,
                   shard: "distributed.Sharding | None", name: str) -> Tensor:
        """The refreshed basis, identical on every rank. A sharded matrix's random basis needs only its shape;
        its SVD basis comes from the all-reduced Gram matrix (right side) or the all-gathered gradient (left)."""
        kind = self._kind(group, count)
        projector = proj.resolve(group["projection"]) if kind == "custom" else proj.BUILTIN[kind]
        generator = proj.refresh_generator(group["seed"], position, count)
        device = grad.device
        if shard is not None:
            if kind == "random":
                grad = torch.empty(shard.shape, dtype=grad.dtype, device="meta")
            elif kind == "svd" and side == "right":
                try:
                    return distributed.gram_right_basis(grad, group["rank"], shard.group).to(grad.device)
                except FloatingPointError:
                    raise FloatingPointError(f"Non-finite gradient in parameter {name}; step skipped, no parameter "
                                             "or optimizer state was changed") from None
            else:
                grad = shard.wrap(grad).full_tensor()  # (m, n): one all-gather at this refresh
        if kind != "random":
            self._check_finite([grad], [name])
        return projector(grad, group["rank"], side, generator).to(device)

    def _refresh_state(self, group: dict[str, Any], state: dict[str, Any], side: str, transport: Tensor,
                       count: int) -> None:
        mode = group["state_on_refresh"]
        if mode == "keep":
            return
        if mode == "reset":
            self._reset(state)
            state["moment_start"] = count
            return
        self._carry(state, side, transport)

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

    def _buckets(self, plans: list["_Plan"]) -> list[list["_Plan"]]:
        """Phase-2 order: single plans, then the ``foreach`` buckets of phase 1."""
        buckets: dict[tuple, list[_Plan]] = {}
        singles = []
        for plan in plans:
            if plan.side is None or not self._foreach(plan):
                singles.append([plan])
            else:
                buckets.setdefault(_bucket_key(plan), []).append(plan)
        return singles + list(buckets.values())

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
    def _validate_rule(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _regularize(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> Tensor:
        return grad

    def _decay(self, group: dict[str, Any], p: Tensor) -> None:
        pass

    def _direction(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                   count: int) -> tuple[Tensor, Tensor | None, float]:
        """The rule's direction N = factor · numerator / denominator (denominator None: N = factor · numerator)."""
        raise NotImplementedError

    def _carry(self, state: dict[str, Any], side: str, transport: Tensor) -> None:
        raise NotImplementedError

    def _reset(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class SubspaceAdamW(SubspaceOptimizer):
    """AdamW in a low-rank subspace: GaLore (``projection="svd"``), GoLore (``"random"``), GoLore@x%.

    Param groups take galore-torch's keys (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``) plus
    ``projection``, ``switch_step``, ``state_on_refresh`` and ``seed``; the constructor's keywords are the
    defaults of every group. Groups without ``rank`` are plain ``torch.optim.AdamW``.

    The rule is ``torch.optim.AdamW``'s: moments ``exp_avg`` and ``exp_avg_sq`` of the projected gradient
    (r × n), bias correction counted across refreshes, decoupled weight decay ``W ← (1 − lr·wd) W`` applied to
    the whole matrix in the full space. At a refresh (``state_on_refresh``):

    * ``"project"`` (default): the paper's momentum projection ``m ← O m`` with O = P_newᵀ P_old, and the second
      moment ``v ← (O∘O) v`` -- non-negative, unchanged for an unchanged basis; justified in
      :func:`golore_lab.rules.carry_second_moment`;
    * ``"keep"``: the moments are reused as they are (the original GaLore, ``galore_torch.GaLoreAdamW``);
    * ``"reset"``: both moments restart at zero and so does the bias correction.

    Example -- GaLore for the first 80% of 1000 steps, GoLore for the rest::

        opt = SubspaceAdamW([{"params": matrices, "rank": 128, "update_proj_gap": 200},
                             {"params": others}], lr=1e-3, switch_step=800)
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **subspace: Any) -> None:
        unknown = sorted(set(subspace) - set(SUBSPACE_DEFAULTS))
        if unknown:
            raise TypeError(f"Unknown keyword argument(s) {unknown} (allowed: {sorted(SUBSPACE_DEFAULTS)})")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **SUBSPACE_DEFAULTS)
        defaults.update(subspace)
        super().__init__(params, defaults)

    def _validate_rule(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair)")
        for i, beta in enumerate(betas):
            if not _is_real(beta) or not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")
        if not _is_real(group["eps"]) or group["eps"] < 0:
            raise ValueError(f"Invalid epsilon value: {group['eps']!r} (must be >= 0)")

    def _decay(self, group: dict[str, Any], p: Tensor) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])

    def _direction(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                   count: int) -> tuple[Tensor, Tensor, float]:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        return rules.adamw_direction(grad, state["exp_avg"], state["exp_avg_sq"], count, beta1, beta2, group["eps"])

    def _directions(self, group: dict[str, Any], states: list[dict[str, Any]], grads: list[Tensor],
                    count: int) -> tuple[list[Tensor], float]:
        for tensors, grad in zip(states, grads):
            if "exp_avg" not in tensors:
                tensors["exp_avg"] = torch.zeros_like(grad)
                tensors["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        return batched.adamw_directions(grads, [t["exp_avg"] for t in states], [t["exp_avg_sq"] for t in states],
                                        count, beta1, beta2, group["eps"])

    def _carry(self, state: dict[str, Any], side: str, transport: Tensor) -> None:
        state["exp_avg"] = rules.carry_first_moment(state["exp_avg"], side, transport)
        state["exp_avg_sq"] = rules.carry_second_moment(state["exp_avg_sq"], side, transport)

    def _reset(self, state: dict[str, Any]) -> None:
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()


class SubspaceSGD(SubspaceOptimizer):
    """Momentum SGD in a low-rank subspace: GaLore, GoLore, GoLore@x% (see :class:`SubspaceAdamW` for keys).

    The rule is ``torch.optim.SGD``'s, with the same ``momentum``, ``dampening`` and ``nesterov``; the paper's
    MSGD ``M ← (1−β₁) M + β₁ R`` is ``momentum = dampening = 1 − β₁`` (see :func:`golore_lab.rules.sgd_direction`
    for the first step). ``weight_decay`` is torch's coupled L2 term, added to the gradient before projection:
    the method then optimizes f(W) + wd/2 ‖W‖² exactly as the paper's algorithm would. At a refresh the
    ``momentum_buffer`` is projected (``"project"``, the paper's MP), kept, or dropped (``"reset"``).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, **subspace: Any) -> None:
        unknown = sorted(set(subspace) - set(SUBSPACE_DEFAULTS))
        if unknown:
            raise TypeError(f"Unknown keyword argument(s) {unknown} (allowed: {sorted(SUBSPACE_DEFAULTS)})")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, **SUBSPACE_DEFAULTS)
        defaults.update(subspace)
        super().__init__(params, defaults)

    def _validate_rule(self, group: dict[str, Any]) -> None:
        if not _is_real(group["momentum"]) or group["momentum"] < 0:
            raise ValueError(f"Invalid momentum value: {group['momentum']!r} (must be >= 0)")
        if not _is_real(group["dampening"]):
            raise ValueError(f"Invalid dampening value: {group['dampening']!r} (must be a number)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening "
                             f"(got momentum={group['momentum']!r}, dampening={group['dampening']!r})")

    def _regularize(self, group: dict[str, Any], p: Tensor, grad: Tensor) -> Tensor:
        return grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else grad

    def _direction(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                   count: int) -> tuple[Tensor, None, float]:
        direction, buffer = rules.sgd_direction(grad, state.get("momentum_buffer"), group["momentum"],
                                                group["dampening"], group["nesterov"])
        if buffer is not None:
            state["momentum_buffer"] = buffer
        return direction, None, 1.0

    def _carry(self, state: dict[str, Any], side: str, transport: Tensor) -> None:
        if "momentum_buffer" in state:
            state["momentum_buffer"] = rules.carry_first_moment(state["momentum_buffer"], side, transport)

    def _reset(self, state: dict[str, Any]) -> None:
        state.pop("momentum_buffer", None)


def microbatches(optimizer: SubspaceOptimizer, base: int, refresh: int) -> int:
    """How many micro-batches to accumulate before the next ``step()``: ``refresh`` at refresh steps, else ``base``.

    Large-batch GaLore in a gradient-accumulation loop::

        for step in range(total_steps):
            k = microbatches(opt, base=1, refresh=8)   # 8x the batch when the SVD is taken
            for _ in range(k):
                (loss_fn(model, next(batches)) / k).backward()
            opt.step(); opt.zero_grad()
    """
    if not (_is_int(base) and _is_int(refresh) and base >= 1 and refresh >= 1):
        raise ValueError(f"Invalid micro-batch counts: base={base!r}, refresh={refresh!r} (must be integers >= 1)")
    return refresh if optimizer.refresh_due() else base
