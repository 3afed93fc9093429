"""Helpers of notebook 01 (the counterexample as a lesson): the pictures, the students' numpy exercise and its
check, and the optional odd/even section, so that the notebook's cells stay short enough to read aloud.

* :func:`trace` steps full training, GaLore, GoLore@X or L.B. GaLore on the counterexample with plain SGD and
  logs what the fast engine logs (loss, captured fraction κ) plus **every** singular value of M = X₁₁ + D, not only the
  largest. It reads the engine's noise stream and draws the engine's random bases, so its numbers are the
  engine's (``tests/test_lesson.py`` holds them to :func:`golore_lab.counterexample.run`).
* :func:`numpy_galore` is the solution of the exercise "write the counterexample in 20 lines of numpy";
  :func:`check_numpy_galore` compares a student's function with the engine.
* :func:`lb_galore_ends` (B = 1 is GaLore) and friends run the package's own odd/even batch law of L.B. GaLore
  (``docs/theory.md`` section 4), which holds for the two-point noise ξ = ±1 and plain SGD only.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from . import counterexample as ce
from . import projection as proj
from . import theory as th
from .plotting import GREY, method_color, method_label

#: the lesson's step: η τ = 0.03 per refresh period, so GaLore's four kept values reach σ within 600 steps
LR, GAP, STEPS = 3e-3, 10, 6000


def trace(problem: ce.Counterexample, methods: Iterable[str] = ("galore", "golore@100"), steps: int = STEPS,
          lr: float = LR, update_proj_gap: int = GAP, seed: int = 0, log_every: int = 10,
          batch: int = 100) -> pd.DataFrame:
    """Plain SGD in the subspace, step by step, logging all singular values of M = X₁₁ + D.

    One row per (method, logged step): ``method, step, loss, captured, s1 … sk`` (k = n − r; ``captured`` =
    ‖Pᵀ∇f(X)‖²/‖∇f(X)‖² for the basis of the step that led to X, NaN at step 0, 1 for full training). The
    noise and the random bases are those of :func:`golore_lab.counterexample.run` with ``seeds=[seed]`` (and
    ``batch``, L.B. GaLore's refresh batch).
    ``frame.attrs["final_X"]`` maps each method to its last iterate (an (n, n) float64 tensor).
    """
    if not isinstance(steps, int) or steps < 1 or not isinstance(log_every, int) or steps % log_every:
        raise ValueError(f"Invalid steps/log_every: {steps!r}/{log_every!r} (log_every must divide steps >= 1)")
    n, r, k = problem.n, problem.r, problem.n - problem.r
    H = np.diag(np.r_[np.ones(k), np.zeros(r)])  # AᵀA
    B, D = problem.B.numpy(), problem.B[:k, :k].numpy()
    frames, final = [], {}
    for name in methods:
        method = ce.run_method(name, steps, batch=batch)
        if method.auto:
            raise ValueError(f"Invalid method: {name!r} (trace runs full, galore, golore@X and lb-galore; "
                             "golore@auto needs the optimizer engine of counterexample.run)")
        stream = problem.noise_periods(torch.Generator().manual_seed(seed), update_proj_gap, method.refresh_batch)
        X, P, rows = problem.x0.numpy().copy(), None, []
        for t in range(steps + 1):
            grad = H @ X + B
            if t % log_every == 0:
                kappa = 1.0 if method.full else (np.nan if P is None else np.square(P.T @ grad).sum() / np.square(grad).sum())
                s = np.linalg.svd(X[:k, :k] + D, compute_uv=False)
                rows.append([t, problem.f(torch.from_numpy(X)).item(), kappa, *s])
            if t == steps:
                break
            if t % update_proj_gap == 0:
                block = next(stream)
            g = grad + problem.noise_matrix(block[t % update_proj_gap]).numpy()
            if t % update_proj_gap == 0 and not method.full:
                P = _basis(torch.from_numpy(g), r, method.projection_at(t), seed, t)
            X = X - lr * (g if method.full else P @ (P.T @ g))
        frame = pd.DataFrame(rows, columns=["step", "loss", "captured", *(f"s{i + 1}" for i in range(k))])
        frames.append(frame.assign(method=name))
        final[name] = torch.from_numpy(X)
    out = pd.concat(frames, ignore_index=True)[["method", "step", "loss", "captured", *(f"s{i + 1}" for i in range(k))]]
    out.attrs["final_X"] = final
    return out


def _basis(g: torch.Tensor, rank: int, kind: str, seed: int, step: int) -> np.ndarray:
    if kind == "svd":
        return proj.svd_projection(g, rank, "left").numpy()
    return proj.random_projection(g, rank, "left", proj.refresh_generator(seed, 0, step)).numpy()


def noise_slots(problem: ce.Counterexample, X: torch.Tensor) -> float:
    """How many of GaLore's r basis directions at a refresh at X lie in the noise block span(C): the weight
    ‖P_{last r rows}‖²_F of the top-r left singular space of ∇f(X) + σC (the same for −σC)."""
    P = proj.svd_projection(problem.stochastic_grad(X, torch.tensor(1.0, dtype=torch.float64)), problem.r, "left")
    return float(P[problem.n - problem.r:].square().sum())


def singular_values(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``s1 … sk`` columns of a :func:`trace` frame."""
    return frame[[c for c in frame.columns if c.startswith("s") and c[1:].isdigit()]]


def plot_picture(frame: pd.DataFrame, problem: ce.Counterexample) -> plt.Figure:
    """The central picture: κ(t) of each method against r/m, and the singular values of M_t per method.

    Steps on a log axis (from the first logged step after 0), so GaLore's early descent to σ and the long run
    share one figure.
    """
    frame = frame[frame["step"] > 0]
    methods = list(dict.fromkeys(frame["method"]))
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(4.1 * (1 + len(methods)), 3.5))
    ax = axes[0]
    for i, name in enumerate(methods):
        rows = frame[frame["method"] == name]
        ax.plot(rows["step"], rows["captured"], color=method_color(name), lw=1.8 if i == 0 else 0.8,
                alpha=1 if i == 0 else 0.8, label=method_label(name), zorder=3 - i)
    ax.axhline(problem.r / problem.n, color="k", ls="--", lw=0.9, label=f"r/m = {problem.r / problem.n:g}")
    ax.set(ylabel="κ = ‖Pᵀ∇f‖² / ‖∇f‖²", ylim=(-0.03, 1.03), title="captured fraction κ(t)")
    ax.legend(fontsize=8, loc="upper right")
    k = problem.n - problem.r
    for ax, name in zip(axes[1:], methods):
        rows = frame[frame["method"] == name]
        ax.plot(rows["step"], singular_values(rows), color=method_color(name), lw=1.3)
        ax.set_yscale("log")
        ax.axhline(problem.noise_sigma, color=GREY, ls=":", lw=1.4, label=f"σ = {problem.noise_sigma:g}")
        ax.set(ylabel="sᵢ(M_t)", ylim=(1e-3, 10), title=f"{method_label(name)}: the {k} singular values of M_t")
        ax.legend(fontsize=8, loc="lower left")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ the numpy exercise
def numpy_galore(problem: ce.Counterexample, steps: int = 2000, lr: float = LR, tau: int = GAP, seed: int = 0):
    """The exercise's solution: GaLore with plain SGD on the counterexample in plain numpy.

    Returns three arrays of length ``steps``, the values after each step: f(X), the captured fraction
    ‖Pᵀ∇f(X)‖²/‖∇f(X)‖², and the largest singular value of M = X₁₁ + D.
    """
    X = problem.x0.numpy().copy()
    B, C, k, r = problem.B.numpy(), problem.C.numpy(), problem.n - problem.r, problem.r
    rng = np.random.default_rng(seed)
    loss, captured, top_sv = [], [], []
    for t in range(steps):
        grad = np.vstack([X[:k], np.zeros((r, problem.n))]) + B      # ∇f(X) = AᵀAX + B
        g = grad + rng.choice([-1.0, 1.0]) * problem.noise_sigma * C  # the oracle: ± σ C
        if t % tau == 0:
            P = np.linalg.svd(g)[0][:, :r]                           # top-r left singular vectors
        X = X - lr * P @ (P.T @ g)                                   # the GaLore step
        grad = np.vstack([X[:k], np.zeros((r, problem.n))]) + B
        loss.append(0.5 * np.sum(X[:k] ** 2) + np.sum(B * X))
        captured.append(np.sum((P.T @ grad) ** 2) / np.sum(grad**2))
        top_sv.append(np.linalg.svd(X[:k, :k] + B[:k, :k], compute_uv=False)[0])
    return np.array(loss), np.array(captured), np.array(top_sv)


def check_numpy_galore(student: Callable, problem: ce.Counterexample, steps: int = 2000, lr: float = LR,
                       tau: int = GAP, tol: float = 1e-9) -> pd.DataFrame:
    """Compare ``student(problem, steps, lr, tau)`` with golore_lab's fast engine, step by step.

    GaLore-SGD on the ±σ noise does not depend on the signs drawn (both signs give the same basis up to the
    noise block, whose updates f ignores), so the two must agree to rounding whatever the student's random
    numbers. A ``student`` that raises ``NotImplementedError`` (the skeleton) is replaced by
    :func:`numpy_galore`. Raises ``AssertionError`` naming the first step that disagrees by more than ``tol``.
    """
    try:
        mine = student(problem, steps, lr, tau)
        who = "your function"
    except NotImplementedError:
        mine = numpy_galore(problem, steps, lr, tau)
        who = "the package's solution (lesson.numpy_galore; yours raised NotImplementedError)"
    engine = ce.run(problem, methods=["galore"], steps=steps, lr=lr, update_proj_gap=tau, seeds=[0], log_every=1)
    engine = engine[engine.step > 0]
    rows = []
    for name, values in zip(("loss", "captured", "top_sv"), mine):
        values, reference = np.asarray(values, float), engine[name].to_numpy()
        if values.shape != reference.shape:
            raise AssertionError(f"{name}: got shape {values.shape}, expected {reference.shape} (one value per step)")
        error = np.abs(values - reference)
        bad = np.flatnonzero(~(error <= tol * (1 + np.abs(reference))))
        if bad.size:
            t = bad[0] + 1
            raise AssertionError(f"{name} differs from the engine first after step {t}: {values[t - 1]!r} against "
                                 f"{reference[t - 1]!r}")
        rows.append(dict(quantity=name, final=values[-1], engine=reference[-1], max_abs_difference=error.max()))
    print(f"checked {who} against golore_lab's engine over {steps} steps: agrees to {tol:g}")
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- the odd/even law (the package's own result)
def refreshes_needed(problem: ce.Counterexample, batch: int, lr: float, gap: int, eps: float = 1e-3,
                     z: float = 6.0) -> int:
    """Refreshes R that hold the law's ``Σ kᵢ`` refreshes at the threshold but for ``z`` standard deviations:
    the smallest R with Rp − z√(Rp(1 − p)) ≥ Σ kᵢ (p = the threshold's probability)."""
    law = th.refresh_threshold(problem, batch)
    needed = int(th.lb_galore_shrinks(problem, law.level if law.level > 0 else eps, lr, gap).sum())
    R = needed
    while R * law.probability - z * math.sqrt(R * law.probability * (1 - law.probability)) < needed:
        R += 1
    return R


def lb_galore_ends(problem: ce.Counterexample, batch: int, lr: float, gap: int = 10, seeds: Iterable[int] = range(3),
                  eps: float = 1e-3) -> np.ndarray:
    """The end loss of each seed of L.B. GaLore (plain SGD) run for :func:`refreshes_needed` refreshes."""
    steps = refreshes_needed(problem, batch, lr, gap, eps) * gap
    frame = ce.run(problem, methods=["lb-galore"], optimizer="sgd", steps=steps, lr=lr, update_proj_gap=gap,
                   seeds=seeds, batch=batch, log_every=steps)
    return frame[frame.step == steps].loss.to_numpy()


def check_lb_galore_law(problem: ce.Counterexample, batch: int, lr: float, ends: np.ndarray, gap: int = 10,
                   eps: float = 1e-3) -> None:
    """Odd B: every end at the exact finite-step limit, inside its bracket below the closed form; even B: f* to
    within ½kε² (``AssertionError`` otherwise)."""
    theta = th.refresh_threshold(problem, batch).level
    if theta > 0:
        s = problem.m0_singular_values.numpy()
        low = problem.f_star + 0.5 * float(np.sum(np.minimum(s, (1 - lr) ** gap * theta) ** 2))
        limit = th.lb_galore_limit(problem, batch, lr, gap)
        assert np.allclose(ends, limit, rtol=0, atol=1e-9), (batch, ends, limit)
        assert low <= limit <= th.lb_galore_plateau(problem, batch), (batch, low, limit)
    else:
        gaps = ends - problem.f_star
        assert (gaps >= -1e-9).all() and (gaps <= 0.5 * (problem.n - problem.r) * eps**2).all(), (batch, gaps)


def odd_even_table(problem: ce.Counterexample, batches: Iterable[int], lr: float, gap: int = 10) -> pd.DataFrame:
    """Per batch B: θ, the simulated ends (checked by :func:`check_lb_galore_law`), their mean and the closed form."""
    rows = []
    for batch in batches:
        ends = lb_galore_ends(problem, batch, lr, gap)
        check_lb_galore_law(problem, batch, lr, ends, gap)
        rows.append(dict(B=batch, theta=th.refresh_threshold(problem, batch).level, ends=ends,
                         end_minus_f_star=ends.mean() - problem.f_star,
                         closed_form_minus_f_star=th.lb_galore_plateau(problem, batch) - problem.f_star))
    return pd.DataFrame(rows)


def plot_odd_even(table: pd.DataFrame, problem: ce.Counterexample, lr: float, gap: int = 10) -> plt.Figure:
    """End loss − f* against the refresh batch: simulated (squares odd, diamonds even) and closed form."""
    s0, sigma = problem.m0_singular_values.numpy(), problem.noise_sigma
    fig, ax = plt.subplots(figsize=(6.2, 3.9))
    grid = np.linspace(1, table.B.max() + 0.4, 200)
    ax.plot(grid, [0.5 * float(np.sum(np.minimum(s0, sigma / b) ** 2)) for b in grid], color=GREY, ls=":", lw=1.2,
            label="½Σ min(sᵢ, σ/B)²  (the odd-B threshold)")
    ax.plot(table.B, table.closed_form_minus_f_star, ls="none", marker="o", ms=11, mfc="none", mec="k", mew=1.2,
            label="closed form ½Σ min(sᵢ, θ)²")
    for parity, marker, color in ((1, "s", "#D55E00"), (0, "D", "#009E73")):
        rows = table[table.B % 2 == parity]
        xs = np.concatenate([[b] * len(e) for b, e in zip(rows.B, rows.ends)])
        ys = np.concatenate(list(rows.ends)) - problem.f_star
        ax.plot(xs, ys, ls="none", marker=marker, ms=5, color=color,
                label=f"{'odd' if parity else 'even'} B (simulated)")
    for _, row in table[table.B % 2 == 1].iterrows():
        ax.annotate(f"{row.end_minus_f_star:.3f}", (row.B, row.end_minus_f_star), textcoords="offset points",
                    xytext=(9, 6), fontsize=8)
    ax.set(xlabel="refresh batch B", ylabel="end loss − f*", xticks=list(table.B), ylim=(-0.15, 2.75))
    ax.set_title(f"L.B. GaLore (SGD, η = {lr:g}, τ = {gap}): odd batches stall, even ones converge", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
