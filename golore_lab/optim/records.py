"""What a step knows, as frozen records: a parameter's identity (:class:`Target`), its basis at this step
(:class:`Basis`), and what a refresh hook sees (:class:`Refresh`); and the parameter names used in messages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor

from .. import switching
from ..distributed import Local, RowShards


def param_label(group: Mapping[str, Any], group_index: int, param_index: int) -> str:
    """A parameter's name: its ``param_names`` entry, else ``param_groups[g]['params'][i]``."""
    names = group.get("param_names")
    return names[param_index] if names else f"param_groups[{group_index}]['params'][{param_index}]"


def param_name(group: Mapping[str, Any], group_index: int, param_index: int) -> str:
    """A parameter's name as messages show it (a ``param_names`` entry quoted)."""
    names = group.get("param_names")
    return repr(names[param_index]) if names else param_label(group, group_index, param_index)


@dataclass(frozen=True)
class Target:
    """One parameter at one step, as phase 1 finds it: nothing here changes during the step.

    ``weight`` is what the update writes (the local rows of a sharded parameter; the ``view_as_real`` of a complex
    one), ``grad`` the gradient the rule and projector see (negated for ``maximize``, regularized, local), ``count``
    the steps taken before this one, ``side`` the projected side (None: full space), ``ops`` the parameter's
    operations (:data:`golore_lab.distributed.LOCAL` or its :class:`~golore_lab.distributed.RowShards`).
    """

    group: dict[str, Any]
    name: str
    position: int
    param: Tensor
    weight: Tensor
    grad: Tensor
    state: dict[str, Any]
    count: int
    side: str | None
    ops: Local | RowShards

    @property
    def shard(self) -> RowShards | None:
        return self.ops.shard

    @property
    def basis(self) -> Tensor | None:
        """The basis in the state (None before the first refresh)."""
        return self.state.get("proj")

    @property
    def due(self) -> bool:
        """Whether this step refreshes the basis (the first step always does)."""
        return self.basis is None or self.count % self.group["update_proj_gap"] == 0


@dataclass(frozen=True)
class Basis:
    """A projected parameter's basis at this step: ``basis`` (m, r) or (n, r); ``new`` whether it was chosen at
    this step (a refresh); ``kind`` ``"svd"``, ``"random"`` or ``"custom"`` at a refresh; ``auto`` GoLore@auto's
    phase-1 plan (:class:`golore_lab.optim.auto._Auto`, None when not auto or switched) and ``test`` the test of
    this refresh."""

    basis: Tensor
    new: bool = False
    kind: str | None = None
    auto: Any = None
    test: switching.SwitchTest | None = None


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
