"""GoLore@auto: decide online, per parameter, when the SVD subspace has become noise-dominated.

GoLore@auto and its criterion are this package's own (the paper switches at a fixed fraction of the run,
GoLore@x%). The derivation is in ``docs/when_to_switch.md``; in short. During a refresh period the basis P
(d, r) is fixed and the optimizer sees R_t = Pᵀ G_t (r, n) at each step (the right side is the transpose).
To first order, GaLore's SVD basis is worse than a random one (GoLore) exactly when it captures less of the
true gradient g than a Haar-random basis does in expectation:

.. math::
    κ = ‖Pᵀg‖² / ‖g‖² < r/d        ⇔        ‖Pᵀg‖² < (r/d)(‖Pᵀg‖² + ‖(I − PPᵀ)g‖²).

**The pairs.** The period's steps after its refresh step (the refresh step is left out: P was fitted to that
step's noise) form disjoint pairs of adjacent steps (a, a + 1) = (T+1, T+2), (T+3, T+4), …; a last step that
would open a pair closed by the next refresh takes no view, so a period of τ steps gives J = ⌊(τ − 1)/2⌋
pairs. At the first step of pair j the optimizer draws a **fresh probe** Π_j (d, q), Haar-random in the
orthogonal complement of span(P), q = min(r, d − r), from a seed derived from (the optimizer's seed, the
parameter's position, the step) (:func:`complement_probe`): independent of the data, the same on every rank.
The pair's two products are

    x_j = ⟨R_a, R_{a+1}⟩,        y_j = ⟨Π_jᵀG_a, Π_jᵀG_{a+1}⟩,

so that for independent zero-mean noise of the two steps (the noise of a step never multiplies itself)
E x_j = ⟨Pᵀg_a, Pᵀg_{a+1}⟩ and, over the noise and Π_j, E y_j = q/(d − r)·⟨(I − PPᵀ)g_a, (I − PPᵀ)g_{a+1}⟩.
With

    D_j = (1 − r/d) x_j − (r/d)(d − r)/q · y_j,        E D_j = ‖Pᵀg‖² − (r/d)‖g‖²   (g_a = g_{a+1} = g),

the D_j of a period are independent given the iterates (disjoint steps, independent probes), each with the
probe's own randomness inside it, and identically distributed while g is stationary.

**The test.** An ordinary one-sided t-test of H0: E D ≥ 0 (the SVD basis at least as good as a random one):
switch when t = D̄ / (s_D / √J) is below the :data:`LEVEL` quantile of Student's t with J − 1 degrees of
freedom (:func:`critical_value`). It is exact for Gaussian D_j; the D_j are sums of products of Gaussians and
of the probe's Beta-distributed capture, and the switch probability at the boundary E D = 0 is at most
:data:`LEVEL` within simulation error (measured through the optimizer, with a user basis at κ = r/d, for
‖g‖²/E‖E‖² from 2 to 250 and a rank-one or full-rank part of g outside P: ``tests/test_switching.py``), and
less above it. That is per refresh: the decision is permanent, so over N refreshes at the boundary the
probability of a switch is at most N · LEVEL.

Pure functions here; the optimizer keeps the period in its state (:data:`STATE_KEYS`) and calls
:func:`start_period`, :func:`next_probe`, :func:`accumulate`, :func:`decide` and :func:`record`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

#: the per-parameter optimizer-state keys of GoLore@auto: the period's count of steps with a view, the open
#: pair's probe basis and first views (R_a and Π_jᵀG_a), the closed pairs' products (J, 2), and, once a
#: parameter has switched, the step and the numbers of the decision
STATE_KEYS = ("auto_steps", "auto_prev", "auto_probe", "auto_probe_prev", "auto_pairs",
              "auto_switched_at", "auto_signal", "auto_random_signal", "auto_t")

#: the fewest pairs a period must contribute for the test (a sample variance needs two)
MIN_PAIRS = 2

#: the fewest steps a period of GoLore@auto can have: the refresh step and two steps per pair
MIN_PERIOD = 2 * MIN_PAIRS + 1

#: the test's level, a parameter of the method fixed by the package: the most probability with which one
#: refresh switches a parameter whose SVD basis is at least as good as a random one (one-sided, per refresh;
#: the decision is permanent, so over N refreshes at most N · LEVEL). Lower values switch later (they need
#: more evidence); see docs/when_to_switch.md for its effect on the counterexample
LEVEL = 0.05


@dataclass(frozen=True)
class SwitchTest:
    """The test at one refresh, from the period that just ended.

    ``pairs`` = J; ``signal`` = mean of x_j, the estimate of ‖Pᵀg‖² (the true gradient captured by the SVD
    basis); ``random_signal`` = (r/d)(mean x + (d − r)/q · mean y), the estimate of (r/d)‖g‖², what a random
    subspace captures in expectation; ``t`` the t-statistic of D = signal − random_signal; ``threshold`` the
    critical value (Student's t, J − 1 degrees of freedom, at :data:`LEVEL`); ``switch`` = ``t < threshold``.
    """

    pairs: int
    signal: float
    random_signal: float
    t: float
    threshold: float
    switch: bool


def critical_value(pairs: int, level: float | None = None) -> float:
    """The one-sided ``level`` quantile (negative) of Student's t with J − 1 degrees of freedom, J = ``pairs``
    (default level :data:`LEVEL`)."""
    from scipy.special import stdtrit

    if pairs < MIN_PAIRS:
        raise ValueError(f"Invalid pairs: {pairs!r} (the test needs at least {MIN_PAIRS})")
    level = LEVEL if level is None else level
    if not 0 < level < 1:
        raise ValueError(f"Invalid level: {level!r} (must be in (0, 1))")
    return float(stdtrit(pairs - 1, level))


def pair_differences(x: Tensor, y: Tensor, rank: int, dim: int, probe_rank: int) -> Tensor:
    """D_j = (1 − r/d) x_j − (r/d)(d − r)/q · y_j, element-wise (any shape), in float64; ``rank`` r, ``dim`` d
    (the projected side's size), ``probe_rank`` q."""
    return (1 - rank / dim) * x.double() - rank / dim * (dim - rank) / probe_rank * y.double()


def t_statistic(D: Tensor) -> Tensor:
    """t = D̄ / (s_D / √J) over the last dimension (J values; any leading batch dimensions): the one-sample
    t-statistic of the pair differences. ±inf when every D_j is equal and nonzero, NaN when all are 0."""
    J = D.shape[-1]
    mean = D.mean(-1)
    sd = (D - mean[..., None]).square().sum(-1).div(J - 1).sqrt()
    return mean / (sd / math.sqrt(J))


def pair_test(x: Tensor, y: Tensor, rank: int, dim: int, probe_rank: int, level: float | None = None) -> SwitchTest:
    """The test from the pair products ``x`` (J,) on the basis and ``y`` (J,) on the pairs' probes.

    The D_j (:func:`pair_differences`) of the J disjoint pairs are independent given the iterates; the test is
    the one-sample t-test of their mean (:func:`t_statistic`) against :func:`critical_value`. ``rank`` r,
    ``dim`` d (the projected side's size), ``probe_rank`` q. One host synchronisation.
    """
    pairs = x.shape[0]
    threshold = critical_value(pairs, level)
    x, y = x.double(), y.double()
    t = t_statistic(pair_differences(x, y, rank, dim, probe_rank))
    signal, outside, t = torch.stack([x.mean(), y.mean(), t]).tolist()
    random_signal = rank / dim * (signal + (dim - rank) / probe_rank * outside)
    return SwitchTest(pairs, signal, random_signal, t, threshold, t < threshold)


def complement_probe(basis: Tensor, generator: torch.Generator) -> Tensor:
    """A Haar-random orthonormal basis (d, q) of the orthogonal complement of span(``basis``) (d, r), q = min(r, d − r).

    The Q factor of (I − PPᵀ)Z for a (d, q) standard Gaussian Z drawn on the CPU from ``generator``: (I − PPᵀ)Z
    is a standard Gaussian in the complement, so its column span is uniform there. Computed in float32 (float64
    for float64 bases); the projection is applied twice against rounding.
    """
    d, r = basis.shape
    dtype = torch.float64 if basis.dtype == torch.float64 else torch.float32
    z = torch.randn(d, min(r, d - r), generator=generator, dtype=dtype).to(basis.device)
    b = basis.to(dtype)
    for _ in range(2):
        z = z - b @ (b.T @ z)
    return torch.linalg.qr(z)[0]


def _dtype(t: Tensor) -> torch.dtype:
    """The statistic's precision: float32, float64 for float64 (a bf16 gradient's small mean survives)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def start_period(state: dict[str, Any], basis: Tensor, shape: tuple[int, int], side: str) -> None:
    """Start a period of the new ``basis`` P (d, r): no pair open, no pair closed.

    ``shape`` is the projected gradient's shape, (r, n) or (m, r) for ``side``. The open pair's entries are
    allocated at their shapes (zeros): the probe (d, q) in the basis' dtype, the views in the statistic's.
    """
    d, r = basis.shape
    q = min(r, d - r)
    dtype = _dtype(basis)
    state["auto_steps"] = 0
    state["auto_probe"] = torch.zeros(d, q, dtype=basis.dtype, device=basis.device)
    state["auto_prev"] = torch.zeros(shape, dtype=dtype, device=basis.device)
    state["auto_probe_prev"] = torch.zeros((q, shape[1]) if side == "left" else (shape[0], q), dtype=dtype,
                                           device=basis.device)
    state["auto_pairs"] = torch.zeros((0, 2), dtype=dtype, device=basis.device)


def opens_pair(state: dict[str, Any]) -> bool:
    """True when the coming step of the period held in ``state`` is the first of a pair."""
    return state["auto_steps"] % 2 == 0


def next_probe(state: dict[str, Any], basis: Tensor, seed: int, gap: int) -> Tensor | None:
    """The probe Π_j (d, q) the coming step of the period in ``state`` uses, changing nothing.

    The open pair's probe when the step closes a pair; when it opens one, a fresh :func:`complement_probe` of
    the current ``basis`` from ``torch.Generator().manual_seed(seed)``, in the basis' dtype; None when the step
    would open a pair that the next refresh closes (``auto_steps`` + 2 >= ``gap``, ``update_proj_gap``): the
    step then takes no view.
    """
    if not opens_pair(state):
        return state["auto_probe"]
    if state["auto_steps"] + 2 >= gap:
        return None
    return complement_probe(basis, torch.Generator().manual_seed(seed)).to(basis.dtype)


def accumulate(state: dict[str, Any], projected: Tensor, probed: Tensor, probe: Tensor | None = None) -> None:
    """Add one step: ``projected`` = R_t = PᵀG_t (r, n), ``probed`` = Π_jᵀG_t (q, n) (or transposed), ``probe``
    the Π_j of :func:`next_probe`.

    The first step of a pair keeps its views and the pair's probe; the second appends the pair's products
    (x_j, y_j) to ``auto_pairs``. Tensor operations only (no host synchronisation on an accelerator).
    """
    dtype = _dtype(projected)
    projected, probed = projected.to(dtype), probed.to(dtype)
    if opens_pair(state):
        if probe is not None:
            state["auto_probe"] = probe
        state["auto_prev"] = projected.clone()
        state["auto_probe_prev"] = probed.clone()
    else:
        pair = torch.stack([(state["auto_prev"].to(dtype) * projected).sum(),
                            (state["auto_probe_prev"].to(dtype) * probed).sum()])
        state["auto_pairs"] = torch.cat([state["auto_pairs"].to(dtype), pair[None]])
    state["auto_steps"] += 1


def check_period(state: dict[str, Any], name: str) -> None:
    """Refuse a period in progress saved by the previous GoLore@auto test (one probe per period, overlapping
    pairs: J = steps − 1 pair products, where this test holds ⌊steps/2⌋).

    Its pairs share one probe, the defect this test removes, and cannot be converted; a period of at most two
    steps is the same in both tests and passes. ``name`` names the parameter in the error.
    """
    pairs, steps = state.get("auto_pairs"), state.get("auto_steps")
    if not isinstance(pairs, Tensor) or not isinstance(steps, int) or pairs.ndim != 2:
        return  # malformed: left to the optimizer's own checks
    if pairs.shape[0] != steps // 2:
        raise ValueError(
            f"The GoLore@auto state of {name} holds {pairs.shape[0]} pair products after {steps} steps of its "
            f"period, where the current test (disjoint pairs, a fresh probe per pair) holds {steps // 2}: it was "
            "saved mid-period by the previous test (overlapping pairs, one probe per period), whose pairs cannot "
            "be converted. Resume from a checkpoint saved at a refresh step, after the switch, or within two "
            "steps of a refresh")


def decide(state: dict[str, Any], rank: int,
           reduce: Callable[[Tensor], Tensor] | None = None) -> SwitchTest | None:
    """The test of the period held in ``state`` for a basis of ``rank`` r (None: fewer than :data:`MIN_PAIRS` pairs).

    The projected side's size d and the probe's q come from the probe basis (d, q). ``reduce``: for a
    parameter whose rows are split across processes, a sum over them of the (J, 2) pair products (each rank
    holds the inner products of its rows; the products add up exactly).
    """
    pairs = state.get("auto_pairs")
    if pairs is None or pairs.shape[0] < MIN_PAIRS:
        return None
    if reduce is not None:
        pairs = reduce(pairs)
    d, q = state["auto_probe"].shape
    return pair_test(pairs[:, 0], pairs[:, 1], rank, d, q)


def record(state: dict[str, Any], step: int, test: SwitchTest) -> None:
    """Mark the parameter as switched at ``step`` by ``test`` and drop the period's data (no longer needed)."""
    state["auto_switched_at"] = step
    state["auto_signal"] = test.signal
    state["auto_random_signal"] = test.random_signal
    state["auto_t"] = test.t
    for key in ("auto_steps", "auto_prev", "auto_probe", "auto_probe_prev", "auto_pairs"):
        state.pop(key, None)


def switched(state: dict[str, Any]) -> bool:
    """True once the parameter's refreshes are random for good."""
    return "auto_switched_at" in state
