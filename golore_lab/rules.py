"""The subspace optimizers ρ of the paper, as pure functions on (low-rank) tensors.

Each rule turns a gradient R (the projected r × n or m × r gradient, or the full gradient of a parameter that
is not projected) into a direction N, updating its state tensors in place; the optimizer then applies
``W ← W − lr · scale · (P N)``. The rules never see the projection, so the same code serves full-space groups
(P = I, scale = 1) and every subspace method.

At a refresh the state, expressed in the old basis, is carried to the new one by an r × r matrix O
(:func:`golore_lab.projection.transport`); :func:`carry_first_moment` and :func:`carry_second_moment` do that,
and :func:`refresh_state` applies the chosen ``state_on_refresh`` to a parameter's whole state.

The state keeps ``torch.optim``'s names (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``): the subspace
optimizers use them, and the model wrapper (:mod:`golore_lab.wrapper`) carries the state of the plain torch
optimizers that train its factors with the same function. torch documents ``state_dict()`` as holding
per-parameter state whose content "differs between optimizer classes" and documents no API that says which
entry is a first or a second moment, so :data:`FIRST_MOMENTS` and :data:`SECOND_MOMENTS` are the one place
that names them.
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

STATE_ON_REFRESH = ("project", "keep", "reset")
FIRST_MOMENTS = ("exp_avg", "momentum_buffer")   # Adam's m, SGD's heavy-ball buffer: carried by O
SECOND_MOMENTS = ("exp_avg_sq",)                 # Adam's v: carried by O ∘ O


def adamw_direction(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, count: int, beta1: float, beta2: float, eps: float
) -> tuple[Tensor, Tensor, float]:
    r"""One Adam step's direction, exactly as ``torch.optim.AdamW`` computes it (weight decay excluded).

    .. math::
        m ← β₁ m + (1−β₁) R,\quad v ← β₂ v + (1−β₂) R²,\quad
        N = \frac{1}{1−β₁^k} \cdot \frac{m}{\sqrt{v} / \sqrt{1−β₂^k} + ε}

    ``count`` is k, the number of steps the moments have seen including this one (bias correction).
    ``exp_avg`` (m) and ``exp_avg_sq`` (v) are updated in place. Returns N in factored form
    ``(m, denominator, 1/(1−β₁^k))`` so that a full-space update is one fused ``addcdiv_`` with no temporary
    the size of the parameter, as in torch.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**count)).add_(eps)
    return exp_avg, denom, 1 / (1 - beta1**count)


def sgd_direction(
    grad: Tensor, momentum_buffer: Tensor | None, momentum: float, dampening: float, nesterov: bool
) -> tuple[Tensor, Tensor | None]:
    """Heavy-ball SGD's direction, exactly as ``torch.optim.SGD`` computes it (weight decay excluded).

    .. math::
        b ← μ b + (1 − τ) R \\;(b ← R \\text{ on the first step}),\\qquad N = b \\text{ or } R + μ b \\text{ (Nesterov)}

    Returns ``(N, buffer)``; the buffer is ``None`` when ``momentum == 0``. The MSGD of the
    authors' code, M ← (1−β₁) M + β₁ R, is ``momentum = dampening = 1 − β₁`` (β₁ = 1 is plain SGD); the one difference is the
    first step, where torch (and this rule) starts the buffer at R while that code starts from M = 0.
    """
    if momentum == 0:
        return grad, None
    if momentum_buffer is None:
        momentum_buffer = grad.clone()
    else:
        momentum_buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
    direction = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    return direction, momentum_buffer


def carry_first_moment(state: Tensor, side: str, transport: Tensor) -> Tensor:
    """Momentum projection (MP) of the paper: M̃ = P_newᵀ P_old M (left) or M Q_oldᵀ Q_new (right).

    ``transport`` is the r × r matrix O of :func:`golore_lab.projection.transport`. Exact for a first moment:
    it is the orthogonal projection of the old full-space momentum P_old M onto the new subspace.
    """
    return transport @ state if side == "left" else state @ transport


def carry_second_moment(state: Tensor, side: str, transport: Tensor) -> Tensor:
    """Adam's second moment carried to the new basis: v ← (O ∘ O) v (left) or v (O ∘ O) (right).

    Why this rule. v estimates E[R²] coordinate by coordinate. In the new basis the coordinate i is
    Σⱼ Oᵢⱼ Rⱼ, whose second moment is Σⱼ Oᵢⱼ² E[Rⱼ²] when the old coordinates are uncorrelated (the same
    diagonal assumption Adam itself makes). So v ← (O∘O) v: it stays non-negative (unlike O v, which can
    make v negative and the square root undefined), equals v when the basis does not change, permutes v when
    the basis is permuted, ignores sign flips of basis vectors (to which the SVD is blind), and shrinks v by
    the squared overlap when the subspaces are far apart — so a direction that is new to the subspace starts
    with a small second moment, as it would after a reset, while a surviving direction keeps its history.
    """
    squared = transport * transport
    return squared @ state if side == "left" else state @ squared


def refresh_state(state: dict[str, Any], mode: str, side: str, transport: Tensor) -> None:
    """Apply ``state_on_refresh`` to one parameter's rule state at a refresh, in place.

    * ``"project"``: every first moment M ← :func:`carry_first_moment` (O M), every second moment
      v ← :func:`carry_second_moment` ((O∘O) v), written into the existing tensors;
    * ``"keep"``: nothing changes (the original GaLore);
    * ``"reset"``: Adam's moments are zeroed and SGD's momentum buffer is dropped, so that the next step starts
      it from R as on a first step. The bias correction restarts too, but its counter belongs to the caller
      (the optimizer's ``moment_start``, torch.optim.Adam's ``step``), which restarts it.

    Entries not named in :data:`FIRST_MOMENTS` / :data:`SECOND_MOMENTS` (step counters, the basis) are left
    alone.
    """
    if mode == "keep":
        return
    if mode == "reset":
        state.pop("momentum_buffer", None)       # a zero buffer would give (1 − dampening) R, not R
        for key in ("exp_avg", "exp_avg_sq"):    # zeroed, not dropped: torch.optim.Adam expects them present
            if state.get(key) is not None:
                state[key].zero_()
        return
    if mode != "project":
        choices = ", ".join(map(repr, STATE_ON_REFRESH))
        raise ValueError(f"Invalid state_on_refresh: {mode!r} (must be one of {choices})")
    for key in FIRST_MOMENTS:
        if state.get(key) is not None:
            state[key].copy_(carry_first_moment(state[key], side, transport))
    for key in SECOND_MOMENTS:
        if state.get(key) is not None:
            state[key].copy_(carry_second_moment(state[key], side, transport))
