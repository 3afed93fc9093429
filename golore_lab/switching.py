"""GoLore@auto: decide online, per parameter, when the SVD subspace has become noise-dominated.

The derivation is in ``docs/when_to_switch.md``; in short. During a refresh period the basis P (d, r) is
fixed and the optimizer sees R_t = Pᵀ G_t (r, n) at each step (the right side is the transpose). GaLore's
SVD basis is worse than a random one (GoLore) at first order exactly when it captures less of the true
gradient g than a Haar-random basis does in expectation:

.. math::
    ‖Pᵀg‖² < (r/d)‖g‖² = (r/d)(‖Pᵀg‖² + ‖(I − PPᵀ)g‖²).

Both sides are estimated from **pairs of consecutive steps**: for two steps a, b = a + 1 with independent
zero-mean noise, x = ⟨R_a, R_b⟩ has mean ⟨Pᵀg_a, Pᵀg_b⟩ ≈ ‖Pᵀg‖² (the noise of a step never multiplies
itself), and the same product y on a probe basis Π (d, q), Haar-random in the orthogonal complement of span(P)
(q = min(r, d − r), drawn independently of the noise), has mean over Π of q/(d − r)·‖(I − PPᵀ)g‖². Pairs one
step apart, not all pairs of the period: in a real training run the true gradient decorrelates within a
period (every other parameter moves) and the optimizer's own steps along P feed the step noise back into the
later gradients along P; a pair of adjacent steps sees one step of either. The period's steps after the
refresh form disjoint pairs (T+1, T+2), (T+3, T+4), … — independent given the iterates — so

    D_j = (1 − r/d) x_j − (r/d)(d − r)/q · y_j,        E D_j = ‖Pᵀg‖² − (r/d)‖g‖²,

and a one-sided t-test of the J pairs' D decides: switch when t = D̄ / (s_D / √J) is below the
:data:`LEVEL` quantile of Student's t with J − 1 degrees of freedom. Under the null (the SVD basis at least as
good as random, E D ≥ 0) a refresh switches with probability at most :data:`LEVEL` (exactly, for Gaussian D).
The refresh step itself is left out (P was fitted to that step's noise). The decision is permanent.

Pure functions here; the optimizer keeps the period in its state (:data:`STATE_KEYS`) and calls
:func:`start_period`, :func:`accumulate`, :func:`decide` and :func:`record`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

#: the per-parameter optimizer-state keys of GoLore@auto: the period's step count, the open pair's first
#: views (R_a and ΠᵀG_a), the probe basis, the closed pairs' products (J, 2), and, once a parameter has
#: switched, the step and the numbers of the decision
STATE_KEYS = ("auto_steps", "auto_prev", "auto_probe", "auto_probe_prev", "auto_pairs",
              "auto_switched_at", "auto_signal", "auto_random_signal", "auto_t")

#: the fewest pairs a period must contribute for the test (a sample variance and a lag-1 autocovariance)
MIN_PAIRS = 3

#: the fewest steps a period of GoLore@auto can have: the refresh step and MIN_PAIRS + 1 steps after it
MIN_PERIOD = MIN_PAIRS + 2

#: the test's level: the most probability with which one refresh switches a parameter whose SVD basis is at
#: least as good as a random one (one-sided, per refresh; the decision is permanent, so over N refreshes at
#: most N · LEVEL)
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
    """The one-sided ``level`` quantile (negative) of Student's t with ⌊J/2⌋ − 1 degrees of freedom, J = ``pairs``.

    The J overlapping pairs hold ⌊J/2⌋ disjoint ones; counting only those is the conservative choice for a
    variance estimated with one lag of autocovariance.
    """
    from scipy.special import stdtrit

    if pairs < MIN_PAIRS:
        raise ValueError(f"Invalid pairs: {pairs!r} (the test needs at least {MIN_PAIRS})")
    return float(stdtrit(max(pairs // 2 - 1, 1), LEVEL if level is None else level))


def pair_test(x: Tensor, y: Tensor, rank: int, dim: int, probe_rank: int, level: float | None = None) -> SwitchTest:
    """The test from the pair products ``x`` (J,) on the basis and ``y`` (J,) on the probe.

    D_j = (1 − r/d) x_j − (r/d)(d − r)/q · y_j for consecutive pairs j = (t, t + 1) is 1-dependent (D_j and
    D_{j+2} share no step), so Var D̄ = (γ₀ + 2γ₁(J − 1)/J)/J with γ₀, γ₁ its variance and lag-1
    autocovariance, estimated from the sample (floored at γ₀/J², so that a negative γ₁ cannot make it vanish).
    ``rank`` r, ``dim`` d (the projected side's size), ``probe_rank`` q. One host synchronisation.
    """
    pairs = x.shape[0]
    threshold = critical_value(pairs, level)
    a, b = 1 - rank / dim, rank / dim * (dim - rank) / probe_rank
    x, y = x.double(), y.double()
    D = a * x - b * y
    c = D - D.mean()
    gamma0 = c.square().sum() / (pairs - 1)
    gamma1 = (c[1:] * c[:-1]).sum() / (pairs - 1)
    var = torch.maximum(gamma0 + 2 * gamma1 * (pairs - 1) / pairs, gamma0 / pairs) / pairs
    t = D.mean() / var.sqrt()  # ±inf when every D_j is equal (no noise); NaN when all are 0
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


def start_period(state: dict[str, Any], probe: Tensor, shape: tuple[int, int], side: str) -> None:
    """Start a period: install the probe basis ``probe`` ((d, q)) and empty the pairs.

    ``shape`` is the projected gradient's shape, (r, n) or (m, r) for ``side``.
    """
    dtype = _dtype(probe)
    q = probe.shape[1]
    state["auto_steps"] = 0
    state["auto_probe"] = probe
    state["auto_prev"] = torch.zeros(shape, dtype=dtype, device=probe.device)
    state["auto_probe_prev"] = torch.zeros((q, shape[1]) if side == "left" else (shape[0], q), dtype=dtype,
                                           device=probe.device)
    state["auto_pairs"] = torch.zeros((0, 2), dtype=dtype, device=probe.device)


def accumulate(state: dict[str, Any], projected: Tensor, probed: Tensor) -> None:
    """Add one step: ``projected`` = R_t = PᵀG_t (r, n), ``probed`` = ΠᵀG_t (q, n) (or transposed).

    From the period's second step on, the inner products with the previous step's views are appended to
    ``auto_pairs``; the step's views then replace the previous ones. Tensor operations only (no host
    synchronisation on an accelerator).
    """
    dtype = _dtype(projected)
    projected, probed = projected.to(dtype), probed.to(dtype)
    if state["auto_steps"] > 0:
        pair = torch.stack([(state["auto_prev"].to(dtype) * projected).sum(),
                            (state["auto_probe_prev"].to(dtype) * probed).sum()])
        state["auto_pairs"] = torch.cat([state["auto_pairs"].to(dtype), pair[None]])
    state["auto_prev"] = projected.clone()
    state["auto_probe_prev"] = probed.clone()
    state["auto_steps"] += 1


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
