"""Phase 2 of a step, the rule and the update, as three backends with one signature (as ``torch.optim.adam``'s
``_single_tensor_adam`` / ``_multi_tensor_adam`` / ``_fused_adam``) behind one dispatcher, :func:`update`.

Each backend takes the rule (:class:`golore_lab.optim.adamw.AdamWRule` or :class:`~golore_lab.optim.sgd.SGDRule`),
the param group and ``items``, (target, R, basis) triples of one group: a :class:`~golore_lab.optim.records.Target`,
its projected gradient R (the gradient itself in the full space) and its
:class:`~golore_lab.optim.records.Basis` (None in the full space). For each item it carries the state to a new
basis at a refresh (``state_on_refresh``), runs the rule on R and writes ``W ← (decay) W − lr·scale·P N``:

* ``"single"``: one parameter at a time (any parameter);
* ``"foreach"``: matrices of one shape, side, dtype and step count, stacked (:mod:`golore_lab.batched`);
* ``"fused"``: full-space parameters of one device and dtype in a rule's fused kernel (AdamW's).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import batched, distributed
from .. import projection as proj
from .. import rules
from .records import Basis, Target

Item = tuple[Target, Tensor, "Basis | None"]


def update(rule: Any, group: dict[str, Any], items: list[Item], backend: str) -> None:
    """Apply one step to ``items`` with ``backend`` (``"single"``, ``"foreach"`` or ``"fused"``)."""
    BACKENDS[backend](rule, group, items)


def scalar_lr(group: dict[str, Any]) -> float | Tensor:
    """The group's learning rate; a one-element tensor of any shape as a 0-dim view (it follows the tensor)."""
    lr = group["lr"]
    return lr.view(()) if torch.is_tensor(lr) and lr.dim() else lr


def local_state(state: dict[str, Any], real: bool = False) -> dict[str, Any]:
    """The state with local shards for DTensors (views sharing storage) and without the basis; ``real``: complex
    tensors as their ``torch.view_as_real`` views (a complex parameter's rule runs on those, as torch.optim's)."""
    local = {key: distributed.local(value) for key, value in state.items() if key != "proj"}
    if real:
        local = {key: torch.view_as_real(v) if torch.is_tensor(v) and v.is_complex() else v for key, v in local.items()}
    return local


def store_state(target: Target, tensors: dict[str, Any]) -> None:
    """Write the rule's local state back: complex again for a complex parameter, DTensors again for row shards."""
    state = target.state
    if target.param.is_complex():  # the rule ran on real views (..., 2): the state is kept complex, as torch's
        tensors = {key: torch.view_as_complex(value) if torch.is_tensor(value) and key != "step" else value
                   for key, value in tensors.items()}
    for key, value in tensors.items():
        state[key] = target.ops.store(value, state.get(key), target.side)
    for key in set(state) - set(tensors) - {"proj"}:
        del state[key]


def refresh_state(group: dict[str, Any], state: dict[str, Any], side: str, transport: Tensor, count: int) -> None:
    """Carry the rule's state to the new basis (``state_on_refresh``); a reset restarts the bias correction."""
    rules.refresh_state(state, group["state_on_refresh"], side, transport)
    if group["state_on_refresh"] == "reset":
        state["moment_start"] = count  # the bias correction restarts with the moments


def _single_tensor(rule: Any, group: dict[str, Any], items: list[Item]) -> None:
    for target, grad, basis in items:
        _one(rule, group, target, grad, basis)


def _one(rule: Any, group: dict[str, Any], target: Target, grad: Tensor, basis: Basis | None) -> None:
    """One parameter: carry the state at a refresh, apply the rule, update W (its local rows)."""
    state, side, count = target.state, target.side, target.count
    tensors = local_state(state, target.param.is_complex())
    if basis is not None and basis.new:
        if "proj" in state:
            refresh_state(group, tensors, side, proj.transport(side, state["proj"], basis.basis), count)
        state["proj"] = basis.basis
    tensors["step"] = count + 1
    numerator, denominator, factor = rule.direction(group, tensors, grad, count + 1 - tensors.get("moment_start", 0))
    store_state(target, tensors)
    p, lr = target.weight, scalar_lr(group)
    rule.decay(group, p, lr)
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
        p.addmm_(target.ops.local_rows(basis.basis), direction, alpha=alpha)  # W += α P N, (m, r) @ (r, n)
    else:
        p.addmm_(direction, basis.basis.T, alpha=alpha)  # W += α N Qᵀ, (m, r) @ (r, n)


def _multi_tensor(rule: Any, group: dict[str, Any], items: list[Item]) -> None:
    """Matrices of one group with equal shape, side, dtype and step count, stacked: one batched transport, one
    ``foreach`` rule and one batched matmul instead of a loop (see :mod:`golore_lab.batched`)."""
    targets = [target for target, _, _ in items]
    first, bases = targets[0], [basis for _, _, basis in items]
    side, count = first.side, first.count
    states = [local_state(target.state) for target in targets]
    if bases[0].new and "proj" in first.state:
        transports = batched.transports(side, [t.state["proj"] for t in targets], [b.basis for b in bases])
        for tensors, transport in zip(states, transports):
            refresh_state(group, tensors, side, transport, count)
    for target, tensors, basis in zip(targets, states, bases):
        if basis.new:
            target.state["proj"] = basis.basis
        tensors["step"] = count + 1
    directions, factor = rule.directions(group, states, [grad for _, grad, _ in items],
                                         count + 1 - states[0].get("moment_start", 0))
    lr = scalar_lr(group)
    for target, tensors in zip(targets, states):
        store_state(target, tensors)
        rule.decay(group, target.weight, lr)
    alpha = -group["scale"] * factor
    if torch.is_tensor(lr):
        torch._foreach_mul_(directions, lr)
    else:
        alpha *= lr
    batched.add_back_projection([t.weight for t in targets], [b.basis for b in bases], directions, side, alpha)


def _fused(rule: Any, group: dict[str, Any], items: list[Item]) -> None:
    """Full-space parameters of one group, device and dtype in the rule's fused kernel; bias correction from each
    parameter's ``step``."""
    targets = [target for target, _, _ in items]
    states = [local_state(target.state, target.param.is_complex()) for target in targets]
    for target, tensors in zip(targets, states):
        tensors["step"] = target.count + 1
    rule.fused(group, [t.weight for t in targets], [grad for _, grad, _ in items], states,
               [t.count + 1 for t in targets], scalar_lr(group))
    for target, tensors in zip(targets, states):
        store_state(target, tensors)


BACKENDS = {"single": _single_tensor, "foreach": _multi_tensor, "fused": _fused}
