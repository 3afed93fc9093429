"""GoLore@auto: decide online, per parameter, when the SVD subspace has become noise-dominated.

The derivation is in ``docs/when_to_switch.md``; in short. During a refresh period the basis P (m, r) is
fixed and the optimizer sees R_t = Pᵀ G_t (r, n) at each step. If the period's gradients are G_t = g + E_t
with zero-mean noise E_t independent across steps, then for k steps with sum S = Σ R_t and Q = Σ ‖R_t‖²

.. math::
    \\hat a = \\frac{‖S‖² − Q}{k(k−1)} = \\frac{2}{k(k−1)} \\sum_{t<t'} ⟨R_t, R_{t'}⟩,\\qquad
    E\\,\\hat a = ‖Pᵀ g‖²

exactly (the noise of a single step never multiplies itself). The same estimator on a probe basis Π (m, q),
Haar-random in the orthogonal complement of span(P) with q = min(r, m − r) and drawn independently of the
noise, estimates ‖Πᵀg‖², whose mean over Π is q/(m − r) · ‖(I − PPᵀ)g‖². Together they estimate what a
random subspace (GoLore) captures in expectation, (r/m)‖g‖² = (r/m)(‖Pᵀg‖² + ‖(I − PPᵀ)g‖²). A parameter
switches to random refreshes when the SVD basis is estimated to capture less than that, i.e. when its captured
fraction κ(P) = ‖Pᵀg‖²/‖g‖² falls below r/m. The refresh step itself is left out of the sums, because P was
fitted to that step's noise. The decision is permanent (see the docs for why).

Pure functions here; the optimizer keeps the sums in its state (:data:`STATE_KEYS`) and calls
:func:`accumulate` and :func:`decide`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: the per-parameter optimizer-state keys of GoLore@auto: the running sums of the current period, the probe
#: basis, and, once a parameter has switched, the step and the two signals of the decision
STATE_KEYS = ("auto_steps", "auto_sum", "auto_sq", "auto_probe", "auto_probe_sum", "auto_probe_sq",
              "auto_switched_at", "auto_signal", "auto_random_signal")

#: the fewest steps a period must contribute (after dropping the refresh step) for the estimator to exist
MIN_STEPS = 2


@dataclass(frozen=True)
class SwitchTest:
    """The test at one refresh, from the period that just ended.

    ``signal`` = â_P, the unbiased estimate of ‖Pᵀg‖² (the true gradient captured by the SVD basis);
    ``random_signal`` = (r/m)(â_P + (m − r)/q · â_Π), the unbiased estimate of (r/m)‖g‖², what a random
    subspace captures in expectation; ``share`` the finite-period signal share of the SVD subspace (the fraction
    of its energy that is signal, :func:`signal_share`; a diagnostic, not the decision); ``steps`` = k;
    ``switch`` = ``signal < random_signal``.
    """

    steps: int
    signal: float
    random_signal: float
    share: float
    switch: bool


def signal_estimate(total: Tensor, sq: Tensor, steps: int) -> Tensor:
    """â = (‖S‖² − Q) / (k(k−1)): unbiased for ‖E R‖² when R_1..R_k are independent with a common mean.

    ``total`` = S = Σ R_t (any shape), ``sq`` = Q = Σ ‖R_t‖² (a scalar), ``steps`` = k >= 2. The result can be
    negative (it is an estimate of a non-negative number; clipping it would bias it).
    """
    if steps < MIN_STEPS:
        raise ValueError(f"Invalid steps: {steps!r} (the estimator needs at least {MIN_STEPS})")
    return (total.square().sum() - sq) / (steps * (steps - 1))


def signal_share(total: Tensor, sq: Tensor, steps: int) -> Tensor:
    """ŝ = (k‖R̄‖²/mean‖R‖² − 1)/(k − 1) = (‖S‖²/Q − 1)/(k − 1): the signal share ‖E R‖²/E‖R‖², period-corrected.

    Under pure zero-mean noise E‖S‖² = Q in expectation, so the raw ratio ‖R̄‖²/mean‖R‖² has mean ≈ 1/k, not 0;
    the correction removes that floor (to first order: it is a ratio of two estimates). NaN when Q = 0.
    """
    if steps < MIN_STEPS:
        raise ValueError(f"Invalid steps: {steps!r} (the estimator needs at least {MIN_STEPS})")
    return (total.square().sum() / sq - 1) / (steps - 1)


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


def start_period(state: dict[str, Any], probe: Tensor, shape: tuple[int, int], side: str) -> None:
    """Zero the period's sums and install the new probe basis ``probe`` ((m, q) or (n, q) for ``side``).

    The sums are float32 (float64 for float64 parameters) whatever the parameter's dtype, so that a period of
    bf16 gradients does not lose the small mean under rounding. ``shape`` is the projected gradient's shape,
    (r, n) or (m, r).
    """
    dtype = torch.float64 if probe.dtype == torch.float64 else torch.float32
    q = probe.shape[1]
    state["auto_steps"] = 0
    state["auto_probe"] = probe
    state["auto_sum"] = torch.zeros(shape, dtype=dtype, device=probe.device)
    state["auto_probe_sum"] = torch.zeros((q, shape[1]) if side == "left" else (shape[0], q), dtype=dtype,
                                          device=probe.device)
    for key in ("auto_sq", "auto_probe_sq"):
        state[key] = torch.zeros((), dtype=dtype, device=probe.device)


def accumulate(state: dict[str, Any], projected: Tensor, probed: Tensor) -> None:
    """Add one step to the period: ``projected`` = R_t = PᵀG_t (r, n), ``probed`` = ΠᵀG_t (q, n) (or transposed).

    Tensor operations only (no host synchronisation on an accelerator).
    """
    dtype = torch.float64 if projected.dtype == torch.float64 else torch.float32
    for key, value in (("auto", projected), ("auto_probe", probed)):
        value = value.to(dtype)
        for suffix in ("_sum", "_sq"):  # a checkpoint loader may have cast the sums to a bf16 parameter's dtype
            state[key + suffix] = state[key + suffix].to(dtype)
        state[key + "_sum"].add_(value)
        state[key + "_sq"].add_(value.square().sum())
    state["auto_steps"] += 1


def decide(state: dict[str, Any], rank: int) -> SwitchTest | None:
    """The test of the period held in ``state`` for a basis of ``rank`` r (None: fewer than :data:`MIN_STEPS` steps).

    The projected side's size d and the probe's q come from the probe basis (d, q).
    """
    steps = state.get("auto_steps", 0)
    if steps < MIN_STEPS:
        return None
    d, q = state["auto_probe"].shape
    values = torch.stack([signal_estimate(state["auto_sum"], state["auto_sq"], steps),
                          signal_estimate(state["auto_probe_sum"], state["auto_probe_sq"], steps),
                          signal_share(state["auto_sum"], state["auto_sq"], steps)]).tolist()
    signal, outside, share = values  # one host synchronisation per refresh
    random_signal = rank / d * (signal + (d - rank) / q * outside)
    return SwitchTest(steps, signal, random_signal, share, signal < random_signal)


def record(state: dict[str, Any], step: int, test: SwitchTest) -> None:
    """Mark the parameter as switched at ``step`` by ``test`` and drop the period's sums (no longer needed)."""
    state["auto_switched_at"] = step
    state["auto_signal"] = test.signal
    state["auto_random_signal"] = test.random_signal
    for key in ("auto_steps", "auto_sum", "auto_sq", "auto_probe", "auto_probe_sum", "auto_probe_sq"):
        state.pop(key, None)


def switched(state: dict[str, Any]) -> bool:
    """True once the parameter's refreshes are random for good."""
    return "auto_switched_at" in state
