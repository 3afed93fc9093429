"""Momentum SGD in a low-rank subspace: the optimizer :class:`SubspaceSGD` and its rule, :class:`SGDRule`."""
from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from .. import rules
from .. import spec
from .base import SubspaceOptimizer


class SGDRule:
    """``torch.optim.SGD``'s rule on a (projected) gradient, for :mod:`golore_lab.optim.functional`'s backends:
    ``momentum_buffer``, ``dampening``, ``nesterov``, coupled weight decay added to the gradient before projection
    (:meth:`regularize`). No fused kernel: full-space parameters take the single-tensor backend."""

    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    state = ("momentum_buffer",)
    check = staticmethod(spec.check_sgd)

    @staticmethod
    def regularize(group: dict[str, Any], p: Tensor, grad: Tensor) -> Tensor:
        return grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else grad

    @staticmethod
    def decay(group: dict[str, Any], p: Tensor, lr: float | Tensor) -> None:
        pass

    @staticmethod
    def direction(group: dict[str, Any], state: dict[str, Any], grad: Tensor,
                  count: int) -> tuple[Tensor, None, float]:
        direction, buffer = rules.sgd_direction(grad, state.get("momentum_buffer"), group["momentum"],
                                                group["dampening"], group["nesterov"])
        if buffer is not None:
            state["momentum_buffer"] = buffer
        return direction, None, 1.0

    @classmethod
    def directions(cls, group: dict[str, Any], states: list[dict[str, Any]], grads: list[Tensor],
                   count: int) -> tuple[list[Tensor], float]:
        """The directions N of a bucket, one parameter at a time (new tensors)."""
        return [cls.direction(group, tensors, grad, count)[0].clone() for tensors, grad in zip(states, grads)], 1.0

    @staticmethod
    def fusable(target: Any) -> bool:
        return False


class SubspaceSGD(SubspaceOptimizer):
    """Momentum SGD in a low-rank subspace: GaLore, GoLore, GoLore@x% (see :class:`SubspaceAdamW` for keys).

    The rule is ``torch.optim.SGD``'s, with the same ``momentum``, ``dampening`` and ``nesterov``; the MSGD of
    the authors' code, ``M ← (1−β₁) M + β₁ R``, is ``momentum = dampening = 1 − β₁`` (see :func:`golore_lab.rules.sgd_direction`
    for the first step). ``weight_decay`` is torch's coupled L2 term, added to the gradient before projection:
    the method then optimizes f(W) + wd/2 ‖W‖². At a refresh the ``momentum_buffer`` is projected
    (``"project"``, the momentum projection of the authors' code), kept, or dropped (``"reset"``).
    """

    rule = SGDRule
    rule_keys, rule_state = SGDRule.keys, SGDRule.state  # the rule's group keys and state tensors

    def __init__(self, params: Iterable, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 **subspace: Any) -> None:
        rule = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                    maximize=maximize)
        super().__init__(params, self._defaults(rule, subspace))
