"""AdamW in a low-rank subspace: the optimizer :class:`SubspaceAdamW` and its rule, :class:`AdamWRule`."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .. import batched, distributed
from .. import rules
from .. import spec
from .base import SubspaceOptimizer
from .records import Target


class AdamWRule:
    """``torch.optim.AdamW``'s rule on a (projected) gradient, for :mod:`golore_lab.optim.functional`'s backends.

    Moments ``exp_avg`` and ``exp_avg_sq``, decoupled weight decay ``W ← (1 − lr·wd) W`` on the whole parameter;
    torch's fused AdamW kernel wherever it can take the tensors (:func:`golore_lab.batched.fusable`), else
    element-wise kernels (:func:`golore_lab.rules.adamw_direction`, ``foreach`` ones for a bucket).
    """

    keys = ("lr", "betas", "eps", "weight_decay", "maximize")
    state = ("exp_avg", "exp_avg_sq")
    check = staticmethod(spec.check_adamw)

    @staticmethod
    def regularize(group: dict[str, Any], p: Tensor, grad: Tensor) -> Tensor:
        return grad

    @staticmethod
    def decay(group: dict[str, Any], p: Tensor, lr: float | Tensor) -> None:
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])

    @staticmethod
    def _moments(state: dict[str, Any], grad: Tensor) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)

    @classmethod
    def direction(cls, group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                  count: int) -> tuple[Tensor, Tensor | None, float]:
        """N = factor · numerator / denominator (denominator None: N = factor · numerator), moments updated."""
        cls._moments(state, grad)
        beta1, beta2 = group["betas"]
        if batched.fusable(grad, state["exp_avg"], state["exp_avg_sq"]):  # N itself, bias correction included
            direction, = batched.fused_adamw_directions([grad], [state["exp_avg"]], [state["exp_avg_sq"]], count,
                                                        beta1, beta2, group["eps"])
            return direction, None, 1.0
        return rules.adamw_direction(grad, state["exp_avg"], state["exp_avg_sq"], count, beta1, beta2, group["eps"])

    @classmethod
    def directions(cls, group: dict[str, Any], states: list[dict[str, Any]], grads: list[Tensor],
                   count: int) -> tuple[list[Tensor], float]:
        """The directions N of a bucket (new tensors) and their common factor."""
        for tensors, grad in zip(states, grads):
            cls._moments(tensors, grad)
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs = [t["exp_avg"] for t in states], [t["exp_avg_sq"] for t in states]
        if batched.fusable(*grads, *exp_avgs, *exp_avg_sqs):
            return batched.fused_adamw_directions(grads, exp_avgs, exp_avg_sqs, count, beta1, beta2, group["eps"]), 1.0
        return batched.adamw_directions(grads, exp_avgs, exp_avg_sqs, count, beta1, beta2, group["eps"])

    @staticmethod
    def fusable(target: Target) -> bool:
        """Whether a full-space parameter goes through the fused backend: when torch's fused AdamW kernel can take
        it (a sharded (FSDP2) parameter through its local rows, which the update treats element by element)."""
        moments = [distributed.local(target.state[key]) for key in AdamWRule.state if key in target.state]
        return batched.fusable(target.weight, target.grad, *moments)

    @classmethod
    def fused(cls, group: dict[str, Any], weights: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
              counts: list[int], lr: float | Tensor) -> None:
        """The full-space step of torch's fused AdamW kernel (what ``torch.optim.AdamW(fused=True)`` computes):
        moments, bias-corrected quotient and decoupled weight decay in one pass over each tensor instead of eight
        element-wise kernels -- the embeddings and head of an LLM are most of a subspace step's element-wise work."""
        for tensors, grad in zip(states, grads):
            cls._moments(tensors, grad)
        beta1, beta2 = group["betas"]
        batched.fused_adamw_(weights, grads, [t["exp_avg"] for t in states], [t["exp_avg_sq"] for t in states],
                             counts, lr, beta1, beta2, group["eps"], group["weight_decay"])


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

    * ``"project"`` (default): the authors' momentum projection ``m ← O m`` with O = P_newᵀ P_old, and the second
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

    rule = AdamWRule
    rule_keys, rule_state = AdamWRule.keys, AdamWRule.state  # the rule's group keys and state tensors

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, maximize: bool = False, **subspace: Any) -> None:
        rule = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, self._defaults(rule, subspace))
