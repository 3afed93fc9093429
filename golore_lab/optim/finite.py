"""The non-finite gradient checks: exact for every finite value, one host read per step (none when deferred)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed
from .records import param_name

HALVES = (torch.float16, torch.bfloat16)


def nonfinite_flags(tensors: list[Tensor], group=None, sync: bool = True) -> Tensor:
    """One bool per tensor: True where it holds an inf or a NaN. Exact for every finite value, in any dtype.

    ``sync`` (one host read allowed): one fused 2-norm per tensor (accumulated in float32 for half types), then,
    only for the tensors whose norm is not finite -- a non-finite entry, or finite entries whose norm overflows
    (float32 entries ~1e19, float64 ~1e154) -- an element-wise ``isfinite``. Else (no host read): the inf-norm
    max |x|, finite exactly when every entry is. ``group``: the flags of row shards are or-ed over the ranks.
    """
    order = 2 if sync else math.inf
    norms = [torch.linalg.vector_norm(t, order, dtype=torch.float32) if t.dtype in HALVES else None for t in tensors]
    rest = [t for t, n in zip(tensors, norms) if n is None]
    fused = iter(torch._foreach_norm(rest, order) if rest else [])
    norms = [next(fused) if n is None else n for n in norms]
    device = norms[0].device
    bad = ~torch.isfinite(torch.stack([n.to(device) for n in norms]))
    if group is not None:
        bad = distributed.all_reduce_sum(bad.double(), group) > 0
    if sync and bool(bad.any()):  # the rare case: tell an overflowing norm from a non-finite entry
        exact = torch.stack([~torch.isfinite(t).all().to(device) if flag else torch.zeros((), dtype=torch.bool,
                             device=device) for t, flag in zip(tensors, bad.tolist())])
        bad = exact if group is None else distributed.all_reduce_sum(exact.double(), group) > 0
    return bad


def _finite(tensor: Tensor, group=None) -> bool:
    """Whether every entry is finite, on every rank of ``group`` (one all-reduce; the error path only)."""
    bad = (~torch.isfinite(tensor).all()).double()
    return not bool(bad if group is None else distributed.all_reduce_sum(bad, group))


class FiniteChecks:
    """The optimizer's checks (a mixin of :class:`golore_lab.optim.SubspaceOptimizer`).

    ``finite_check = "sync"`` (default): ``step()`` raises ``FloatingPointError`` before anything changes;
    ``"deferred"``: the flags stay on the device and :meth:`raise_if_nonfinite` reads them.
    """

    finite_check = "sync"

    def _check_finite(self, tensors: list[Tensor], names: list[str], group=None,
                      positions: list[int] | None = None, raws: list[Tensor] | None = None) -> None:
        """Raise ``FloatingPointError`` naming the first parameter whose tensor is not finite
        (:func:`nonfinite_flags`). Sharded: the flags are summed over ``group``, so all ranks see the same ones.
        With ``finite_check = "deferred"`` and ``positions`` given, the flags are accumulated on the device instead
        and read by :meth:`raise_if_nonfinite`. ``raws``: the gradients the ``tensors`` were projected from, to say
        so when only a projection overflowed.
        """
        if not tensors:
            return
        deferred = self.finite_check == "deferred" and positions is not None
        bad = nonfinite_flags(tensors, group, sync=not deferred)
        if deferred:
            self._defer(bad, positions)
            return
        if bool(bad.any()):
            first = int(bad.to(torch.uint8).argmax())
            if raws is not None and raws[first] is not tensors[first] and _finite(raws[first], group):
                raise FloatingPointError(
                    f"The projected gradient of parameter {names[first]} overflows although its gradient is finite; "
                    "step skipped, no parameter or optimizer state was changed")
            raise FloatingPointError(f"Non-finite gradient in parameter {names[first]}; step skipped, no parameter "
                                     "or optimizer state was changed")

    def _defer(self, bad: Tensor, positions: list[int]) -> None:
        device = bad.device
        flags = self.__dict__.get("_nonfinite")
        if flags is None or flags.device != device:
            flags = self.__dict__["_nonfinite"] = torch.zeros(sum(len(g["params"]) for g in self.param_groups),
                                                              dtype=torch.bool, device=device)
        cached = self.__dict__.get("_positions")
        if cached is None or cached[0] != positions or cached[1].device != device:  # a host-to-device copy
            cached = self.__dict__["_positions"] = (positions, torch.tensor(positions, device=device))
        index = cached[1]
        flags[index] = flags[index] | bad

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
                    names.append(param_name(group, gi, pi))
        raise FloatingPointError(f"Non-finite gradient in parameter(s) {', '.join(names)} since the last check; "
                                 "the steps were applied (finite_check='deferred')")
