"""GoLore@auto inside the optimizer: its part of a step and its checkpoint layout (:mod:`golore_lab.switching`
holds the statistic and the test).

:class:`AutoSteps` is a mixin of :class:`golore_lab.optim.SubspaceOptimizer`: :meth:`~AutoSteps._auto_plan` (phase
1, at the plan of a parameter), :meth:`~AutoSteps._auto_update` (phase 2, after the rule),
:meth:`~AutoSteps._auto_saved` / :meth:`~AutoSteps._auto_loaded` (the fixed layout of a row-sharded parameter's
state, applied by the optimizer's state-dict hooks, :mod:`golore_lab.optim.checkpoint`) and :meth:`switch_log`.
The methods are the optimizer's own, moved here unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .. import distributed
from .. import projection as proj
from .. import spec
from .. import switching
from .records import param_label


@dataclass
class _Auto:
    """GoLore@auto's part of one parameter's step, from phase 1 (:meth:`SubspaceOptimizer._auto_plan`) to phase 2
    (:meth:`SubspaceOptimizer._auto_update`).

    ``side`` is the projected side. Between refreshes (``refresh`` False): ``probe``, the step's pair probe Π_j
    (d, q) (:func:`golore_lab.switching.next_probe`: fresh when the step opens a pair), and ``view``, its view
    of the gradient, Π_jᵀG (q, n) or GΠ_j (m, q) (local rows for a row-sharded matrix on the right side); for a
    row-sharded matrix projected on the left, ``view`` is None until the step's projection
    (:meth:`golore_lab.distributed.RowShards.project`) fills it from the all-reduce it shares with R. At a
    refresh: ``test`` (None for the first one: the period then starts); ``gram``, for a row-sharded matrix on the
    right side whose refresh is an SVD, the Gram matrix GᵀG that was all-reduced together with the period's pair
    products.
    """

    side: str
    refresh: bool
    test: switching.SwitchTest | None = None
    view: Tensor | None = None
    probe: Tensor | None = None
    gram: Tensor | None = None


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


class AutoSteps:
    """GoLore@auto's methods of :class:`golore_lab.optim.SubspaceOptimizer` (``switch_step="auto"``)."""

    # ---------------------------------------------------------------- GoLore@auto (see golore_lab.switching)
    def _auto_plan(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor, side: str, position: int,
                   count: int, refresh: bool, shard: "distributed.Sharding | None" = None) -> _Auto | None:
        """Phase 1 of GoLore@auto, changing no state: the :class:`_Auto` plan, or None (not auto, or switched).
        For a row-sharded matrix it issues the collectives below (the same on every rank).

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
            for pi, p in enumerate(group["params"]):
                position += 1
                state = self.state.get(p, {})
                if switching.switched(state):
                    log.append({"name": param_label(group, gi, pi), "position": position,
                                "step": state["auto_switched_at"], "signal": state["auto_signal"],
                                "random_signal": state["auto_random_signal"], "t": state["auto_t"]})
        return log
