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
at t ≥ K use random projections; for x% random steps out of T, K = round((1 − x/100) · T). GoLore@auto is
``switch_step="auto"``: each parameter switches to random refreshes, for good, at the first refresh where its
SVD subspace is estimated to capture less of the true gradient than a random one; the test uses the projected
gradients of the period that just ended (:mod:`golore_lab.switching`, derivation in ``docs/when_to_switch.md``),
and :meth:`SubspaceOptimizer.switch_log` lists the switches. Large-batch GaLore
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

from . import projection as proj
from . import rules
from . import switching

SUBSPACE_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "projection": "svd",
    "switch_step": None,
    "state_on_refresh": "project",
    "seed": 0,
}


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
    or state is modified (the check is one fused 2-norm over the projected gradients).
    """

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
        auto = isinstance(switch, str) and switch == "auto"
        if switch is not None and not auto and (not _is_int(switch) or switch < 0):
            raise ValueError(f"Invalid switch_step: {switch!r} (must be None, 'auto' or an integer >= 0)")
        if auto and gap <= switching.MIN_STEPS:
            raise ValueError(f"Invalid update_proj_gap: {gap!r} (switch_step='auto' needs >= {switching.MIN_STEPS + 1}"
                             ": the test uses the steps of a period after its refresh step)")
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
        """Perform one optimization step (see the module docstring for the algorithm)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plans = []  # phase 1: projected gradients; nothing is modified until all are known to be finite
        auto_plans: dict[int, tuple] = {}  # GoLore@auto, by id(p): see _auto_plan
        refreshes: list[Refresh] = []
        position = -1
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                position += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"Parameter {self._param_name(group, gi, pi)} has a sparse gradient, "
                                       "which subspace optimizers do not support")
                grad = self._regularize(group, p, p.grad)
                state = self.state[p]
                count = state.get("step", 0)
                side = basis = new_basis = None
                if group["rank"] is not None:
                    side = proj.projected_side(tuple(p.shape), group["proj_type"])
                    basis = state.get("proj")
                    refresh = basis is None or count % group["update_proj_gap"] == 0
                    if refresh:
                        self._check_finite([grad], [(group, gi, pi)])
                    auto = auto_plans[id(p)] = self._auto_plan(group, state, grad, side, position, count, refresh)
                    if refresh:
                        test = auto[1] if auto else None
                        random = switching.switched(state) or (test is not None and test.switch)
                        new_basis = self._new_basis(group, grad, side, position, count, random).to(p.dtype)
                        basis = new_basis
                        if self._refresh_hooks:
                            refreshes.append(Refresh(p, self._param_name(group, gi, pi), position, count, side,
                                                     self._kind(group, count, random), new_basis, state.get("proj"),
                                                     grad, test))
                    grad = basis.T @ grad if side == "left" else grad @ basis  # (r, n) or (m, r)
                plans.append((group, gi, pi, p, state, count, side, basis, new_basis, grad))

        self._check_finite([plan[-1] for plan in plans], [plan[:3] for plan in plans])
        for refresh in refreshes:
            for hook in list(self._refresh_hooks.values()):
                hook(self, refresh)

        for group, _, _, p, state, count, side, basis, new_basis, grad in plans:  # phase 2: update
            if new_basis is not None:
                if "proj" in state:
                    self._refresh_state(group, state, side, proj.transport(side, state["proj"], new_basis), count)
                state["proj"] = new_basis
            self._auto_update(state, auto_plans.get(id(p)), grad, count)
            state["step"] = count + 1
            numerator, denominator, factor = self._direction(group, state, grad,
                                                             count + 1 - state.get("moment_start", 0))
            self._decay(group, p)
            if side is None:  # full space: one fused update, no temporary the size of p
                if denominator is None:
                    p.add_(numerator, alpha=-group["lr"] * factor)
                else:
                    p.addcdiv_(numerator, denominator, value=-group["lr"] * factor)
            else:
                direction = numerator if denominator is None else numerator / denominator  # (r, n) or (m, r)
                update = basis @ direction if side == "left" else direction @ basis.T  # (m, n)
                p.add_(update, alpha=-group["lr"] * group["scale"] * factor)
        return loss

    @staticmethod
    def _kind(group: dict[str, Any], count: int, random: bool = False) -> str:
        switch = group["switch_step"]
        if random or (_is_int(switch) and count >= switch):
            return "random"
        return group["projection"] if isinstance(group["projection"], str) else "custom"

    def _new_basis(self, group: dict[str, Any], grad: Tensor, side: str, position: int, count: int,
                   random: bool = False) -> Tensor:
        kind = self._kind(group, count, random)
        projector = proj.resolve(group["projection"]) if kind == "custom" else proj.BUILTIN[kind]
        generator = proj.refresh_generator(group["seed"], position, count)
        return projector(grad, group["rank"], side, generator).to(grad.device)

    # ---------------------------------------------------------------- GoLore@auto (see golore_lab.switching)
    def _auto_plan(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor, side: str, position: int,
                   count: int, refresh: bool) -> tuple | None:
        """Phase 1 of GoLore@auto, changing nothing: ``(refresh, test, value, side)`` or None (not auto, or switched).

        At a refresh: ``test`` from the period that just ended (None for the first one) and ``value`` the
        seed of the next period's probe, or None when the test switches. Between refreshes: ``value`` = the
        probe's view of the (m, n) gradient, ΠᵀG (q, n) or GΠ (m, q).
        """
        if group["switch_step"] != "auto" or switching.switched(state):
            return None
        if not refresh:
            probe = state.get("auto_probe")
            if probe is None:  # no probe: switch_step set to "auto" mid-period, or rank = the projected side
                return None
            return False, None, probe.T @ grad if side == "left" else grad @ probe, side
        test = switching.decide(state, group["rank"])
        if test is not None and test.switch:
            return True, test, None, side
        # the probe's stream (position −1 − i) is one no parameter's random basis uses: independent of the noise
        # and of P, and the same on every DDP rank
        return True, test, proj.derive_seed(group["seed"], -1 - position, count), side

    @staticmethod
    def _auto_update(state: dict[str, Any], plan: tuple | None, projected: Tensor, count: int) -> None:
        """Phase 2 of GoLore@auto: apply the plan of :meth:`_auto_plan` (after the new basis is in ``state``)."""
        if plan is None:
            return
        refresh, test, value, side = plan
        if not refresh:
            switching.accumulate(state, projected, value)
        elif value is None:
            switching.record(state, count, test)
        elif min(state["proj"].shape) < max(state["proj"].shape):  # else nothing lies outside the subspace
            probe = switching.complement_probe(state["proj"], torch.Generator().manual_seed(value))
            switching.start_period(state, probe.to(projected.dtype), tuple(projected.shape), side)

    def switch_log(self) -> list[dict[str, Any]]:
        """GoLore@auto's switches so far, one record per switched parameter in parameter order.

        Keys: ``name`` (from ``param_names``, else ``param_groups[g]['params'][i]``), ``position``, ``step`` (the
        refresh whose basis was the first random one), ``signal`` and ``random_signal`` (the estimates â_P and
        â_Π of :class:`golore_lab.switching.SwitchTest` that triggered it). ``pandas.DataFrame(opt.switch_log())``
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
                                "signal": state["auto_signal"], "random_signal": state["auto_random_signal"]})
        return log

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

    def _check_finite(self, tensors: list[Tensor], where: list[tuple]) -> None:
        # One fused 2-norm per tensor, accumulated in float32 for half types (an inf-norm is 8x slower on CPU).
        # A gradient whose norm overflows float32 counts as non-finite too.
        if not tensors:
            return
        halves = {torch.float16, torch.bfloat16}
        norms = [torch.linalg.vector_norm(t, dtype=torch.float32) if t.dtype in halves else None for t in tensors]
        rest = [t for t, n in zip(tensors, norms) if n is None]
        fused = iter(torch._foreach_norm(rest, 2) if rest else [])
        norms = [next(fused) if n is None else n for n in norms]
        device = norms[0].device
        if bool(torch.stack([n.to(device, torch.float32) for n in norms]).isfinite().all()):
            return
        for norm, (group, gi, pi) in zip(norms, where):
            if not math.isfinite(float(norm)):
                raise FloatingPointError(
                    f"Non-finite gradient in parameter {self._param_name(group, gi, pi)}; "
                    "step skipped, no parameter or optimizer state was changed"
                )

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
