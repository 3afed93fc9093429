"""The paper's counterexample (problem (1)): GaLore stalls, GoLore and large-batch GaLore converge.

.. math::
    f(X) = ½‖A X‖²_F + ⟨B, X⟩,\\qquad X ∈ ℝ^{n×n},\\quad A = [I_{n−r}\\;0],\\quad
    B = \\mathrm{diag}(D, 0),\\quad D_{ij} ∼ σ N(0, 1)

with the stochastic gradient ∇f(X) + ξσC, C = diag(0_{n−r}, I_r), ξ = ±1 with probability ½ (a batch of B
averages B independent signs). Write M = X_{1:n−r,1:n−r} + D. While the top-right block of X is zero,
f(X) = ½‖M‖² − ½‖D‖², so f* = −½‖D‖²_F, and the stochastic gradient is block-diagonal, diag(M, ±σI_r).
Its top-r SVD keeps the directions of M whose singular values exceed σ and fills the remaining slots with
pure-noise coordinates, which only move the last r rows, and those do not enter f. Each singular value of M
therefore shrinks until it reaches σ, then stops (this needs the two-point law |ξ| ≡ 1: with ξ ~ N(0, 1) in the
same rows, ``noise="gaussian"``, the SVD sometimes sees the signal and GaLore converges):

.. math::
    f_{\\text{GaLore}} ≈ f^* + ½ \\sum_i \\min(s_i(M_0), σ)^2 .

Everything here works on batches: X of shape (runs, n, n). :func:`run` produces the curves of the paper's
Figure 1 with either engine: ``"fast"``, a batched numpy kernel for this quadratic (all methods and seeds in
one array, the subspace iterate kept in r × n coordinates), or ``"optimizer"``, a plain step-by-step loop
over :class:`golore_lab.SubspaceSGD` / :class:`golore_lab.SubspaceAdamW`. They are one algorithm at two
speeds: the tests check them step by step against each other. ``golore@auto`` (the optimizers'
``switch_step="auto"``) always runs on the optimizer engine, whichever engine is asked for: its test needs
the projected gradient of every step, which the fast engine's closed-form SGD periods never form.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .methods import parse as parse_name
from . import projection as proj
from .threads import num_threads

NOISES = ("anisotropic", "gaussian", "isotropic", "none")
#: the logged quantities, in the order the engines return them (see :func:`run`)
LOGGED = ("loss", "grad_norm_sq", "captured", "top_sv")


class Counterexample:
    """Problem (1) of the paper, built exactly as the authors' toy script builds it.

    ``torch.manual_seed(seed)``-equivalent draws from a ``torch.Generator``: the first ``randn(n−r, n−r)`` is
    D (times σ), the second ``randn(r, n)`` the last r rows of X₀ (times σ); rows 1..n−r of X₀ are
    (σ/2)[I 0]. ``linear_term=False`` sets B = 0: the "no B" instance of the non-convergence theorem, where
    ‖∇f(X₀)‖₂ = σ/2 < σ and GaLore never moves. ``noise="gaussian"`` keeps the noise ξσC in the same rows with
    the same covariance but draws ξ ~ N(0, 1) instead of ±1 (so |ξ| is sometimes small and the SVD then sees
    the signal); ``noise="isotropic"`` replaces ±σC by i.i.d. Gaussian noise of the same total variance σ²r
    over all n × n entries; ``noise="none"`` gives exact gradients
    (deterministic GaLore; σ still scales D and X₀). ``noise_sigma`` sets the noise level on its own (default:
    σ): D and X₀ keep their scale σ while the oracle's ±``noise_sigma``·C, the plateau and the noise variance
    follow ``noise_sigma``, so the plateau f* + ½Σmin(sᵢ(M₀), noise_sigma)² moves while f* does not. (With
    the default, the whole problem is σ times the σ = 1 problem and (plateau − f*)/f* is the same for every σ.)
    Tensors are float64.

    >>> p = Counterexample()
    >>> round(p.f(p.x0).item(), 4), round(p.f_star, 4), round(p.galore_plateau, 3)
    (0.8107, -23.2174, -20.776)
    """

    def __init__(self, n: int = 10, r: int = 4, sigma: float = 1.0, seed: int = 42, linear_term: bool = True,
                 noise: str = "anisotropic", noise_sigma: float | None = None) -> None:
        if not _is_int(n) or n < 2:
            raise ValueError(f"Invalid n: {n!r} (must be an integer >= 2)")
        if not _is_int(r) or not 1 <= r < n:
            raise ValueError(f"Invalid r: {r!r} (must be an integer with 1 <= r < n = {n})")
        if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"Invalid sigma: {sigma!r} (must be a finite number >= 0)")
        noise_sigma = sigma if noise_sigma is None else noise_sigma
        if (not isinstance(noise_sigma, numbers.Real) or isinstance(noise_sigma, bool) or not math.isfinite(noise_sigma)
                or noise_sigma < 0):
            raise ValueError(f"Invalid noise_sigma: {noise_sigma!r} (must be a finite number >= 0, or None for sigma)")
        if not _is_int(seed):
            raise ValueError(f"Invalid seed: {seed!r} (must be an integer)")
        if noise not in NOISES:
            raise ValueError(f"Invalid noise: {noise!r} (must be one of {', '.join(map(repr, NOISES))})")
        self.n, self.r, self.sigma, self.seed = n, r, float(sigma), seed
        self.linear_term, self.noise = bool(linear_term), noise
        #: the oracle's noise level: one noise entry is ±noise_sigma (σ unless set apart)
        self.noise_sigma = float(noise_sigma)
        k = n - r
        generator = torch.Generator().manual_seed(seed)
        D = sigma * torch.randn(k, k, generator=generator)  # float32 draws, as in the authors' script
        tail = sigma * torch.randn(r, n, generator=generator)
        self.D = D.double()
        self.B = torch.zeros(n, n, dtype=torch.float64)
        if linear_term:
            self.B[:k, :k] = self.D
        self.x0 = torch.zeros(n, n, dtype=torch.float64)
        self.x0[:k, :k] = sigma / 2 * torch.eye(k, dtype=torch.float64)
        self.x0[k:] = tail.double()
        self.C = torch.zeros(n, n, dtype=torch.float64)
        self.C[k:, k:] = torch.eye(r, dtype=torch.float64)

    def __repr__(self) -> str:
        return (f"Counterexample(n={self.n}, r={self.r}, sigma={self.sigma}, seed={self.seed}, "
                f"linear_term={self.linear_term}, noise={self.noise!r}, noise_sigma={self.noise_sigma})")

    # ------------------------------------------------------------------ the function
    def f(self, X: Tensor) -> Tensor:
        """f(X) for X of shape (..., n, n)."""
        top = X[..., : self.n - self.r, :]
        return 0.5 * (top * top).sum((-2, -1)) + (self.B * X).sum((-2, -1))

    def grad(self, X: Tensor) -> Tensor:
        """The exact gradient AᵀA X + B (the last r rows are zero), for X of shape (..., n, n)."""
        G = X.clone()
        G[..., self.n - self.r :, :] = 0
        return G + self.B

    @property
    def smoothness(self) -> float:
        """L = ‖AᵀA‖₂ = 1."""
        return 1.0

    @property
    def noise_variance(self) -> float:
        """E‖noise‖²_F of one sample: noise_sigma² r for both noise models (0 for exact gradients)."""
        return 0.0 if self.noise == "none" else self.noise_sigma**2 * self.r

    @property
    def f_star(self) -> float:
        """min f = −½‖D‖²_F (0 without the linear term)."""
        return -0.5 * float((self.B * self.B).sum())

    @property
    def m0_singular_values(self) -> Tensor:
        """Singular values of M₀ = X₀[:n−r, :n−r] + D, the quantities the SVD compares with the noise level."""
        k = self.n - self.r
        return torch.linalg.svdvals(self.x0[:k, :k] + self.B[:k, :k])

    @property
    def galore_plateau(self) -> float:
        """Closed-form value where GaLore stalls: f* + ½Σᵢ min(sᵢ(M₀), noise_sigma)², for the two-point noise.

        The stall needs |ξ| ≡ 1: no refresh then sees a singular value of M below noise_sigma. With exact
        gradients, and with ``noise="gaussian"`` (|ξ| < s with positive probability for every s > 0, so every
        value keeps shrinking), it is f*. The isotropic noise is outside this derivation (the value returned is
        the two-point formula, not a prediction).
        """
        threshold = 0.0 if self.noise in ("none", "gaussian") else self.noise_sigma
        s = self.m0_singular_values.clamp(max=threshold)
        return self.f_star + 0.5 * float((s * s).sum())

    # ------------------------------------------------------------------ the stochastic oracle
    @property
    def noise_scale(self) -> float:
        """Standard deviation of one isotropic noise entry: noise_sigma·√r / n (total variance noise_sigma²·r)."""
        return self.noise_sigma * math.sqrt(self.r) / self.n

    def noise_periods(self, generator: torch.Generator, period: int, refresh_batch: int = 1) -> Iterator[Tensor]:
        """Noise of one run, one block of ``period`` steps at a time; the first step of each block has a batch.

        Anisotropic: a (period,) tensor of ξ, where ξ₀ is the mean of ``refresh_batch`` independent signs and
        the others single signs; the noise matrix at that step is ξ·noise_sigma·C. Gaussian: the same with
        standard normal ξ (ξ₀ scaled by 1/√refresh_batch, the exact law of a mean of that many). Isotropic: a (period, n, n)
        tensor of noise matrices, the first scaled by 1/√refresh_batch (the exact law of a mean of that many).
        Blocks are drawn from ``generator`` a chunk of periods at a time (the chunk size is a fixed function
        of the shapes), so the stream is a pure function of the generator's seed; both engines of :func:`run`
        read the same stream. Exact gradients (``noise="none"``): blocks of ξ = 0, drawing nothing.
        """
        if self.noise == "none":
            while True:
                yield torch.zeros(period, dtype=torch.float64)
        while True:
            if self.noise == "anisotropic":
                draws = period - 1 + refresh_batch
                chunk = max(1, 2**15 // draws)
                signs = torch.randint(0, 2, (chunk, draws), generator=generator, dtype=torch.float64)
                signs.mul_(2).sub_(1)
                blocks = torch.cat([signs[:, :refresh_batch].mean(1, keepdim=True), signs[:, refresh_batch:]], 1)
            elif self.noise == "gaussian":
                chunk = max(1, 2**15 // period)
                blocks = torch.randn(chunk, period, generator=generator, dtype=torch.float64)
                blocks[:, 0] /= math.sqrt(refresh_batch)
            else:
                chunk = max(1, 2**15 // (period * self.n * self.n))
                blocks = torch.randn(chunk, period, self.n, self.n, generator=generator, dtype=torch.float64)
                blocks *= self.noise_scale
                blocks[:, 0] /= math.sqrt(refresh_batch)
            yield from blocks

    def noise_matrix(self, noise: Tensor) -> Tensor:
        """The (n, n) noise matrix of one step from one entry of a :meth:`noise_periods` block."""
        return noise * self.noise_sigma * self.C if noise.dim() == 0 else noise

    def stochastic_grad(self, X: Tensor, noise: Tensor) -> Tensor:
        """∇f(X) plus the noise of one step (``noise`` is one entry of a :meth:`noise_periods` block)."""
        return self.grad(X) + self.noise_matrix(noise)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One curve of Figure 1: how the subspace is chosen at refreshes, and with which batch."""

    name: str
    full: bool = False
    switch_step: int | str | None = None  # refreshes at t >= switch_step are random (0: GoLore throughout);
    refresh_batch: int = 1                # "auto": decided by the optimizer (GoLore@auto)

    @property
    def auto(self) -> bool:
        return self.switch_step == "auto"

    def projection_at(self, step: int) -> str:
        return "random" if self.switch_step is not None and step >= self.switch_step else "svd"


def run_method(name: str, steps: int, batch: int = 100) -> Method:
    """A method name of :mod:`golore_lab.methods` (``full``, ``galore``, ``golore@X``, ``golore@auto``,
    ``lb-galore``) for a run of ``steps`` steps: GoLore@X switches at step round((1 − X/100) · steps),
    GoLore@auto when its optimizer decides, L.B. GaLore refreshes with a batch of ``batch``."""
    method = parse_name(name)
    return Method(name, full=method.full, switch_step=method.switch_step(steps),
                  refresh_batch=batch if method.large_batch else 1)


@dataclass(frozen=True)
class Settings:
    """Hyper-parameters of one panel (validated by :func:`run`)."""

    optimizer: str
    steps: int
    lr: float
    update_proj_gap: int
    momentum: float = 0.0
    dampening: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    scale: float = 1.0
    state_on_refresh: str = "project"
    log_every: int = 100
    weight_decay: float = 0.0


PAPER = {
    "sgd": dict(optimizer="sgd", steps=200_000, lr=3e-5, update_proj_gap=100, methods=("full", "galore", "lb-galore",
                                                                                         "golore@75")),
    "adamw": dict(optimizer="adamw", steps=100_000, lr=3e-5, update_proj_gap=100,
                  methods=("full", "galore", "lb-galore", "golore@50")),
}
"""The settings of the paper's Figure 1 as the authors' toy script runs them: τ = 100, lr 3e-5. The L.B. batch
of 100 is not stated with the figure; it is the batch that reproduces it."""


def run(problem: Counterexample, methods: Iterable[str] = ("full", "galore", "lb-galore", "golore@75"),
        optimizer: str = "sgd", steps: int = 200_000, lr: float = 3e-5, update_proj_gap: int = 100,
        seeds: Iterable[int] = range(5), *, batch: int = 100, momentum: float = 0.0, dampening: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
        scale: float = 1.0, state_on_refresh: str = "project", log_every: int = 100, engine: str = "fast",
        progress: bool = False) -> pd.DataFrame:
    """Run each method with each noise seed; return a tidy DataFrame of the exact loss along the way.

    Columns: ``method, optimizer, seed, step`` and :data:`LOGGED`: ``loss`` = exact f(X), ``grad_norm_sq`` =
    ‖∇f(X)‖²_F, ``captured`` = ‖Pᵀ∇f(X)‖²/‖∇f(X)‖² for the basis P of the step that led to X (NaN at step 0,
    1 for full training), ``top_sv`` = the largest singular value of M = X₁₁ + D (GaLore keeps a direction of
    M at a refresh iff its singular value exceeds σ). One row per run every ``log_every`` steps from step 0. ``optimizer`` is ``"sgd"`` (``momentum`` 0 is the
    paper's MSGD panel; torch's ``momentum``/``dampening`` otherwise) or ``"adamw"``. ``weight_decay`` is
    0 in the authors' toy script; it is the optimizers' own (coupled L2 for SGD, decoupled for AdamW). The
    matrix is projected on the left (P ∈ St(n, r), the authors' convention). Seed s drives the run's noise
    (a ``torch.Generator`` seeded with s) and its random projections (the optimizer's ``seed=s``); all methods
    with the same seed see the same noise until their batches differ.

    ``frame.attrs["switch_steps"]`` maps ``(method, seed)`` of every ``golore@auto`` run to the step of its
    switch to random subspaces (None: it never switched), from the optimizer's ``switch_log``.
    """
    methods = [run_method(m, steps, batch) for m in methods]
    seeds = list(seeds)
    settings = Settings(optimizer, steps, lr, update_proj_gap, momentum, dampening, tuple(betas), eps, scale,
                        state_on_refresh, log_every, weight_decay)
    _validate(settings, batch, seeds, engine, auto=any(m.auto for m in methods))
    runs = [(m, s) for m in methods for s in seeds]
    if not runs:
        raise ValueError("Nothing to run: methods and seeds must not be empty")
    slow = [i for i, (m, _) in enumerate(runs) if engine == "optimizer" or m.auto]
    fast = [i for i in range(len(runs)) if i not in slow]
    logs = np.empty((len(LOGGED), len(runs), steps // log_every + 1))
    switch_steps = {}
    with num_threads(1):  # tiny matrices: OpenMP threads only add overhead (and stall on a busy machine)
        if fast:
            logs[:, fast] = _run_fast(problem, [runs[i] for i in fast], settings, progress)
        if slow:
            logs[:, slow], switch_logs = _run_optimizer(problem, [runs[i] for i in slow], settings, progress)
            for i, log in zip(slow, switch_logs):
                if runs[i][0].auto:
                    switch_steps[(runs[i][0].name, runs[i][1])] = log[0]["step"] if log else None
    logged = np.arange(logs.shape[2]) * log_every
    frames = [pd.DataFrame({"method": m.name, "optimizer": optimizer, "seed": s, "step": logged,
                            **{column: logs[j, i] for j, column in enumerate(LOGGED)}})
              for i, (m, s) in enumerate(runs)]
    frame = pd.concat(frames, ignore_index=True)
    frame.attrs["switch_steps"] = switch_steps
    return frame


def _validate(s: Settings, batch: int, seeds: list, engine: str, auto: bool = False) -> None:
    if s.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"Invalid optimizer: {s.optimizer!r} (must be 'sgd' or 'adamw')")
    if engine not in ("fast", "optimizer"):
        raise ValueError(f"Invalid engine: {engine!r} (must be 'fast' or 'optimizer')")
    for name in ("steps", "update_proj_gap", "log_every"):
        value = getattr(s, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")
    if s.steps % s.log_every:
        raise ValueError(f"Invalid log_every: {s.log_every} (must divide steps = {s.steps})")
    if not _is_int(batch) or batch < 1:
        raise ValueError(f"Invalid batch: {batch!r} (must be an integer >= 1)")
    if not isinstance(s.lr, numbers.Real) or not math.isfinite(s.lr) or s.lr <= 0:
        raise ValueError(f"Invalid lr: {s.lr!r} (must be a finite number > 0)")
    if not all(_is_int(seed) for seed in seeds):
        raise ValueError(f"Invalid seeds: {seeds!r} (must be integers)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Invalid seeds: {seeds!r} (must be distinct)")
    # the remaining hyper-parameters are validated by the optimizers themselves:
    _make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], s, Method("galore"), rank=1, seed=0)
    if auto:  # e.g. update_proj_gap too short for the test, refused before any run is computed
        _make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], s, Method("golore@auto", switch_step="auto"),
                        rank=1, seed=0)


def _make_optimizer(params, s: Settings, method: Method, rank: int, seed: int):
    from .optim import SubspaceAdamW, SubspaceSGD

    group = {"params": params}
    if not method.full:
        group.update(rank=rank, update_proj_gap=s.update_proj_gap, scale=s.scale, proj_type="left",
                     switch_step=method.switch_step)
    common = dict(lr=s.lr, state_on_refresh=s.state_on_refresh, seed=seed, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return SubspaceSGD([group], momentum=s.momentum, dampening=s.dampening, **common)
    return SubspaceAdamW([group], betas=s.betas, eps=s.eps, **common)


# ---------------------------------------------------------------------------------------------- engines
def _run_optimizer(problem: Counterexample, runs, s: Settings, progress: bool):
    """The slow engine: one parameter, one library optimizer, one step at a time, per run.

    Returns the logs and each run's ``switch_log`` (empty unless GoLore@auto switched).
    """
    from tqdm import tqdm

    n_logs = s.steps // s.log_every + 1
    logs = np.empty((len(LOGGED), len(runs), n_logs))
    switch_logs = []
    k = problem.n - problem.r
    for i, (method, seed) in enumerate(tqdm(runs, disable=not progress, desc="runs")):
        X = torch.nn.Parameter(problem.x0.clone())
        opt = _make_optimizer([X], s, method, problem.r, seed)
        stream = problem.noise_periods(torch.Generator().manual_seed(seed), s.update_proj_gap,
                                       method.refresh_batch)
        block = None
        for t in range(s.steps + 1):
            if t % s.log_every == 0:
                with torch.no_grad():
                    G = problem.grad(X)
                    basis = opt.state[X].get("proj")
                    if method.full:
                        captured = 1.0
                    else:
                        captured = (basis.T @ G).square().sum() / G.square().sum() if basis is not None else math.nan
                    top_sv = torch.linalg.matrix_norm(X[:k, :k] + problem.B[:k, :k], ord=2)
                    logs[:, i, t // s.log_every] = [problem.f(X).item(), G.square().sum().item(), float(captured),
                                                    top_sv.item()]
            if t == s.steps:
                break
            if t % s.update_proj_gap == 0:
                block = next(stream)
            X.grad = problem.stochastic_grad(X.detach(), block[t % s.update_proj_gap])
            opt.step()
        switch_logs.append(opt.switch_log() if not method.full else [])
    return logs, switch_logs


def _run_fast(problem: Counterexample, runs, s: Settings, progress: bool):
    """The fast engine: all runs in one batch, numpy float64, the iterate as X = X_anchor + P Y.

    Within a refresh period the basis P (n, r) is fixed and the projected gradient is affine in Y (r, n):
    R = Pᵀ(∇f(X_anchor) + AᵀA P Y + noise) = c + K Y + Pᵀ noise with K = PᵀAᵀAP (r, r). So one step costs a
    batched (r × r)(r × n) product and a few element-wise operations, whatever the method. Runs of lower rank
    are padded with zero columns of P, which leave their coordinates exactly zero (0 gradient, 0 update), so
    "full" (P = I) and the rank-r methods share one array. The rules are those of :mod:`golore_lab.rules`,
    written out for numpy: Adam's bias correction, the SGD buffer's first step, the momentum projection.
    """
    from tqdm import tqdm

    n, r, tau = problem.n, problem.r, s.update_proj_gap
    R = len(runs)
    rp = n if any(m.full for m, _ in runs) else r  # padded rank
    k = n - r
    H = np.diag(np.r_[np.ones(k), np.zeros(r)])  # AᵀA
    B = problem.B.numpy()
    iso = problem.noise == "isotropic"
    sigC = problem.noise_sigma * problem.C.numpy()
    full = np.array([m.full for m, _ in runs])
    svd_runs = [i for i, (m, _) in enumerate(runs) if not m.full]

    X = np.broadcast_to(problem.x0.numpy(), (R, n, n)).copy()
    P = np.zeros((R, n, rp))
    P[full] = np.eye(n)[:, :rp]
    Y, m1, v, buf, tmp, denom = (np.zeros((R, rp, n)) for _ in range(6))
    buf_started = np.zeros((R, 1, 1), dtype=bool)
    moment_start = np.zeros((R, 1, 1))
    has_basis = False
    streams = [problem.noise_periods(torch.Generator().manual_seed(seed), tau, m.refresh_batch) for m, seed in runs]
    n_logs = s.steps // s.log_every + 1
    logs = np.full((len(LOGGED), R, n_logs), np.nan)
    beta1, beta2 = s.betas
    eta = s.lr * s.scale
    wd = s.weight_decay
    decoupled = s.optimizer == "adamw" and wd > 0

    def log(Xs, t, P):
        top = Xs[:, :k, :]
        G = np.einsum("ij,rjk->rik", H, Xs) + B
        column = logs[:, :, t // s.log_every]
        column[0] = 0.5 * (top * top).sum((1, 2)) + (B * Xs).sum((1, 2))
        column[1] = (G * G).sum((1, 2))
        if P is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                column[2] = np.square(P.transpose(0, 2, 1) @ G).sum((1, 2)) / column[1]
        column[2, full] = 1.0  # P = I, also at the optimum where ∇f = 0
        column[3] = np.linalg.svd(top[:, :, :k] + B[:k, :k], compute_uv=False)[:, 0]

    log(X, 0, None)
    for t0 in tqdm(range(0, s.steps, tau), disable=not progress, desc=f"{s.optimizer} periods"):
        noise = np.stack([next(st).numpy() for st in streams])  # (R, tau) or (R, tau, n, n)
        xi = None if iso else noise[:, :, None, None]  # (R, tau, 1, 1)
        noise0 = noise[:, 0] if iso else xi[:, 0] * sigC
        HX_B = np.einsum("ij,rjk->rik", H, X) + B
        # ---- refresh: new bases from the refresh step's stochastic gradient
        P_old = P.copy()
        G0 = torch.from_numpy(HX_B + noise0 + (0.0 if decoupled else wd * X))  # SGD's L2 term is in its gradient
        kinds = {i: runs[i][0].projection_at(t0) for i in svd_runs}
        svd_idx = [i for i in svd_runs if kinds[i] == "svd"]
        if s.state_on_refresh == "keep":  # reused moments depend on the singular vectors' signs: same calls
            for i in svd_idx:  # as the optimizer, one matrix at a time (a batched SVD may flip a sign)
                P[i, :, :r] = proj.svd_projection(G0[i], r, "left").numpy()
        elif svd_idx:
            P[svd_idx, :, :r] = proj.svd_projection(G0[svd_idx], r, "left").numpy()
        for i in svd_runs:
            if kinds[i] == "random":
                generator = proj.refresh_generator(runs[i][1], 0, t0)
                P[i, :, :r] = proj.random_projection(G0[i], r, "left", generator).numpy()
        if has_basis and s.state_on_refresh == "project":
            O = P.transpose(0, 2, 1) @ P_old  # P_newᵀ P_old, (R, rp, rp)
            m1, v, buf = O @ m1, (O * O) @ v, O @ buf
        elif has_basis and s.state_on_refresh == "reset":
            changed = ~full[:, None, None]
            m1[~full] = v[~full] = 0.0
            buf_started &= ~changed
            moment_start = np.where(changed, t0, moment_start)
        has_basis = True
        # ---- the period, in subspace coordinates: X = gamma_j X_anchor + P Y_j
        PT = P.transpose(0, 2, 1)
        K = PT @ H @ P  # (R, rp, rp)
        if decoupled:  # AdamW: X ← (1 − lr wd) X − lr scale P N, so the anchor decays by a scalar gamma
            gammas = (1 - s.lr * wd) ** np.arange(tau + 1)
            cH, c = PT @ (HX_B - B), PT @ B
        else:  # SGD: R = Pᵀ(∇f + wd X + noise), affine in Y with K + wd PᵀP
            gammas = np.ones(tau + 1)
            K += wd * (PT @ P)
            c = PT @ (HX_B + wd * X)
        # step j's projected gradient is K Y + c + gamma_j cH + E_j with E_j = Pᵀ noise_j
        length = min(tau, s.steps - t0)  # the last period may be cut short by ``steps``
        closed = s.optimizer == "sgd" and not s.momentum and s.log_every % tau == 0 and length == tau
        if closed:
            Y = _sgd_period(K, c, PT[:, None] @ noise if iso else (xi[..., 0, 0], PT @ sigC), eta)
        else:
            forcing = PT[:, None] @ noise if iso else xi * (PT @ sigC)[:, None]  # (R, tau, rp, n)
            forcing += c[:, None]
            if decoupled:
                forcing += gammas[None, :tau, None, None] * cH[:, None]
            Y[:] = 0.0
            for j in range(length):
                t = t0 + j
                grad = K @ Y
                grad += forcing[:, j]
                if s.optimizer == "adamw":
                    # N = m/bc1 / (√v/√bc2 + ε) = m · (√bc2/bc1) / (√v + ε√bc2)
                    count = t + 1 - moment_start if s.state_on_refresh == "reset" else t + 1
                    bc2_sqrt = np.sqrt(1 - beta2**count)
                    m1 *= beta1
                    np.multiply(grad, 1 - beta1, out=tmp)
                    m1 += tmp
                    v *= beta2
                    np.multiply(grad, grad, out=tmp)
                    tmp *= 1 - beta2
                    v += tmp
                    np.sqrt(v, out=denom)
                    denom += s.eps * bc2_sqrt
                    np.divide(m1, denom, out=tmp)
                    tmp *= eta * bc2_sqrt / (1 - beta1**count)
                    if decoupled:
                        Y *= 1 - s.lr * wd
                    Y -= tmp
                elif s.momentum:
                    buf = np.where(buf_started, s.momentum * buf + (1 - s.dampening) * grad, grad)
                    buf_started[:] = True
                    Y -= eta * buf
                else:
                    Y -= eta * grad
                if (t + 1) % s.log_every == 0:
                    log(gammas[j + 1] * X + P @ Y, t + 1, P)
        X = gammas[length] * X + P @ Y
        if closed and (t0 + tau) % s.log_every == 0:
            log(X, t0 + tau, P)
    return logs


def _sgd_period(K: np.ndarray, c: np.ndarray, noise, eta: float) -> np.ndarray:
    """Y after one period of plain SGD from Y = 0, in closed form: Y_{j+1} = (I − ηK) Y_j − η (c + E_j).

    With K = V diag(λ) Vᵀ (symmetric) and q = 1 − ηλ, Y_τ = −η V Σ_j diag(q^{τ−1−j}) Vᵀ (c + E_j): one eigh
    and a few contractions per period instead of τ steps (exact up to rounding; the tests hold it to the step
    loop). ``noise`` is either the (R, tau, rp, n) array of projected noise E_j, or a pair (ξ (R, tau),
    e (R, rp, n)) with E_j = ξ_j e, which never forms that array.
    """
    lam, V = np.linalg.eigh(K)  # (R, rp), (R, rp, rp)
    VT = V.transpose(0, 2, 1)
    if isinstance(noise, tuple):
        xi, e = noise
        tau = xi.shape[1]
    else:
        tau = noise.shape[1]
    powers = (1 - eta * lam)[..., None] ** np.arange(tau - 1, -1, -1)  # (R, rp, tau): q^{τ−1−j}
    total = powers.sum(-1)[..., None] * (VT @ c)  # (R, rp, n)
    if isinstance(noise, tuple):
        total += np.einsum("rit,rt->ri", powers, xi)[..., None] * (VT @ e)
    else:
        total += np.einsum("rit,rtik->rik", powers, VT[:, None] @ noise)
    return -eta * (V @ total)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std, min and max of the loss over seeds, per method and logged step (the band of the figures)."""
    grouped = frame.groupby(["optimizer", "method", "step"], sort=False)["loss"]
    return grouped.agg(["mean", "std", "min", "max"]).reset_index()
