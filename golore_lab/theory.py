"""Convergence facts behind He et al. (arXiv 2410.11289), one checkable fact per function.

``docs/theory.md`` states each result, derives it and names the abstract's claim it bears on; every function's
docstring carries its own derivation. Every statement, constant and closed form here is this package's own,
derived from the assumptions below; none is a theorem constant of the paper. The stochastic arguments
(GoLore, L.B. GaLore) cover τ = 1 only. Notation: a weight X (m × n, here the counterexample's
10 × 10), a left basis P ∈ St(m, r), its projector Π = PPᵀ, δ = r/m, step size η, refresh period τ.

Assumptions (A):

* f is bounded below, Δ = f(X₀) − f* < ∞;
* f is L-smooth: ‖∇f(X) − ∇f(Y)‖_F ≤ L‖X − Y‖_F;
* the oracle g = ∇f + e is unbiased, E e = 0, with E‖e‖²_F ≤ σ² (σ²/B for a mean of B samples).

Careful with the name σ: in :class:`~golore_lab.counterexample.Counterexample` σ is the size of one noise
*entry* (e = ±σC, C = diag(0, I_r)), so the assumption's σ² is E‖e‖²_F = σ²r = 4 for the paper's problem.
Functions here call the assumption's value ``noise_variance``.

The sections follow the notebook ``05_convergence_proofs`` and ``docs/theory.md``: assumptions,
non-convergence (and what weight decay does to it), Haar moments, the perturbation bound and the tie-free
capture range, the odd/even batch law of L.B. GaLore (the package's), GoLore's descent, the noise floor at a
fixed step (the experiment that tests the stochastic results), L.B. GaLore's τ = 1 bound, deterministic
GaLore's rate. The runners (``*_rates``,
``*_trace``) use the library's optimizers and the counterexample's fast engine, and return tidy DataFrames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import counterexample as ce
from . import projection as proj
from .optim import SubspaceSGD


def _frob_sq(x: Tensor) -> float:
    return float(x.square().sum())


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of log y against log x: the exponent a of y ∝ xᵃ."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


# ============================================================================================ 1. assumptions
@dataclass(frozen=True)
class Assumptions:
    """The constants of assumptions (A) for one problem, each computed, not copied from a formula.

    ``smoothness`` L, ``noise_variance`` σ² = E‖e‖²_F of one oracle call, ``gap`` Δ = f(X₀) − f*, and the
    subspace ratio ``delta`` δ = r/m.
    """

    smoothness: float
    noise_variance: float
    noise_bias: float
    f0: float
    f_star: float
    rank: int
    dim: int

    @property
    def gap(self) -> float:
        """Δ = f(X₀) − f*."""
        return self.f0 - self.f_star

    @property
    def delta(self) -> float:
        """δ = r/m."""
        return self.rank / self.dim


def hessian(grad: Callable[[Tensor], Tensor], X: Tensor) -> Tensor:
    """The Hessian of f at X as a (mn × mn) matrix, column k = ∇f(X + E_k) − ∇f(X) (E_k the k-th unit matrix).

    Exact when ∇f is affine (a quadratic, like the counterexample); a unit finite difference otherwise.
    ``grad`` must accept a batch (..., m, n).
    """
    d = X.numel()
    units = torch.eye(d, dtype=X.dtype).reshape(d, *X.shape)
    return (grad(X + units) - grad(X)).reshape(d, d).T


def noise_law(problem: ce.Counterexample, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The exact law of the counterexample's noise multiplier ξ̄ for a mean of ``batch`` oracle calls.

    The noise is ξ̄σC with ξ̄ the mean of B independent signs: ξ̄ = (2k − B)/B with k ~ Binomial(B, ½).
    Returns (values, probabilities). Exact gradients (``noise="none"``): ξ̄ = 0 surely. The isotropic noise
    has no finite law; it is rejected.
    """
    if problem.noise == "none":
        return np.zeros(1), np.ones(1)
    if problem.noise != "anisotropic":
        raise ValueError(f"noise_law needs the anisotropic or exact oracle, not {problem.noise!r}")
    from scipy.stats import binom

    k = np.arange(batch + 1)
    return (2 * k - batch) / batch, binom.pmf(k, batch, 0.5)


def assumptions(problem: ce.Counterexample, batch: int = 1) -> Assumptions:
    """Compute the constants of (A) for ``problem`` (the oracle averaged over ``batch`` calls).

    * L = the largest |eigenvalue| of the Hessian (:func:`hessian`), which for a quadratic is the best
      smoothness constant;
    * σ² = E‖e‖²_F and the bias ‖E e‖_F, as exact finite sums over the oracle's law (:func:`noise_law`);
    * f* = the problem's closed form −½‖D‖²_F (checked against f at its minimiser in the tests), f(X₀).
    """
    X0 = problem.x0
    L = float(torch.linalg.eigvalsh(hessian(problem.grad, X0)).abs().max())
    if problem.noise in ("gaussian", "isotropic"):  # centred Gaussian entries: E e = 0, E‖e‖² = σ²r/B
        mean, variance = torch.zeros_like(X0), problem.noise_variance / batch
    else:
        values, probs = noise_law(problem, batch)
        noise = torch.as_tensor(values)[:, None, None] * problem.noise_sigma * problem.C  # (outcomes, n, n)
        weights = torch.as_tensor(probs)
        mean = (weights[:, None, None] * noise).sum(0)
        variance = float((weights * noise.square().sum((-2, -1))).sum())
    return Assumptions(smoothness=L, noise_variance=variance, noise_bias=math.sqrt(_frob_sq(mean)),
                       f0=float(problem.f(X0)), f_star=problem.f_star, rank=problem.r, dim=problem.n)


# ============================================================================================ 2. non-convergence
def principal_sines(P: Tensor, Q: Tensor) -> Tensor:
    """Sines of the principal angles between span(P) and span(Q) (orthonormal columns, P (m, r), Q (m, s)).

    All zero iff span(P) ⊆ span(Q). The cosines are the singular values of PᵀQ.
    """
    cosines = torch.linalg.svdvals(P.T @ Q).clamp(max=1.0)
    return torch.sqrt(1 - cosines.square())


def galore_refresh(problem: ce.Counterexample, X: Tensor) -> pd.DataFrame:
    """GaLore's refresh at X for every outcome of a one-sample oracle: which subspace does the SVD pick?

    For each noise value ξ (±1), the top-r left singular space P of g = ∇f(X) + ξσC is compared with the
    noise block span(C) = span(e_{m−r+1}, …, e_m). Columns: ``xi``, ``max_sine`` (largest principal sine
    between P and the noise block: 0 means P *is* the noise block), ``proj_grad`` = ‖Pᵀ∇f(X)‖_F,
    ``grad`` = ‖∇f(X)‖_F, ``top_singular`` = ‖∇f(X)‖₂.

    The theorem's proof: on the "no B" instance ∇f(X) = diag(½I, 0) has ‖∇f‖₂ = ½ < σ = 1, so the top r
    singular values of diag(½I, ±I) are the noise block's, P = span(C), Pᵀ∇f = 0 and the step P N moves
    only the last r rows, which f ignores: ∇f(X) never changes, and by induction no refresh ever picks
    anything else.
    """
    values, _ = noise_law(problem, 1)
    noise_block = torch.eye(problem.n, dtype=torch.float64)[:, problem.n - problem.r:]  # (m, r)
    G = problem.grad(X)
    rows = []
    for xi in values:
        g = problem.stochastic_grad(X, torch.tensor(float(xi), dtype=torch.float64))
        P = proj.svd_projection(g, problem.r, "left")
        rows.append(dict(xi=float(xi), max_sine=float(principal_sines(P, noise_block).max()),
                         proj_grad=math.sqrt(_frob_sq(P.T @ G)), grad=math.sqrt(_frob_sq(G)),
                         top_singular=float(torch.linalg.matrix_norm(G, 2))))
    return pd.DataFrame(rows)


#: the subspace optimizers of the non-convergence grid: name -> (optimizer, extra keywords of ``ce.run``)
SUBSPACE_OPTIMIZERS = {"SGD": ("sgd", {}), "momentum SGD": ("sgd", dict(momentum=0.9)), "AdamW": ("adamw", {})}


def no_b_grid(lrs: Iterable[float] = (1e-3, 1e-1, 1.0), gaps: Iterable[int] = (1, 10, 100), steps: int = 300,
              seeds: Iterable[int] = (0, 1), weight_decay: float = 0.0) -> pd.DataFrame:
    """GaLore and GoLore on the "no B" instance for every subspace optimizer × learning rate × τ.

    One row per (optimizer, lr, update_proj_gap): ``galore_max_move`` = max over seeds and steps of
    |f(X_t) − f(X₀)| (every step is logged), ``galore_min_grad_sq`` = min ‖∇f(X_t)‖², and, for contrast,
    ``golore_max_move``, the same for GoLore on the same noise (f(X₀) = 0.75, f* = 0).

    The theorem covers updates that stay in the subspace, X ← X − ηP N: ``weight_decay`` = 0. With weight
    decay (coupled L2 for SGD, decoupled for AdamW, the optimizers' own) GaLore moves and the grid shows it
    (:func:`no_b_decoupled_decay`).
    """
    problem = ce.Counterexample(linear_term=False)
    f0 = float(problem.f(problem.x0))
    rows = []
    for name, (optimizer, extra) in SUBSPACE_OPTIMIZERS.items():
        for lr in lrs:
            for gap in gaps:
                frame = ce.run(problem, methods=("galore", "golore@100"), optimizer=optimizer, steps=steps, lr=lr,
                               update_proj_gap=gap, seeds=seeds, log_every=1, weight_decay=weight_decay, **extra)
                galore = frame[frame.method == "galore"]
                golore = frame[frame.method == "golore@100"]
                rows.append(dict(optimizer=name, lr=lr, update_proj_gap=gap,
                                 galore_max_move=float((galore.loss - f0).abs().max()),
                                 galore_min_grad_sq=float(galore.grad_norm_sq.min()),
                                 golore_max_move=float((golore.loss - f0).abs().max())))
    return pd.DataFrame(rows)


def no_b_decoupled_decay(lr: float, weight_decay: float, steps) -> np.ndarray:
    """f(X_t) of GaLore-AdamW with decoupled weight decay λ on the "no B" instance: (1 − ηλ)^{2t} f(X₀).

    Derivation: each step is X ← (1 − ηλ)X − ηP N. The basis stays the noise block (‖∇f‖₂ = ½(1 − ηλ)^t only
    shrinks, and the SVD sees g, not the decay), so P N moves only the last r rows; the first rows, the only
    ones f sees, are multiplied by (1 − ηλ) per step, and f = ½‖first rows‖² by (1 − ηλ)². So the non-
    convergence theorem does not cover weight decay: the decay moves X outside the subspace, towards 0 = X*.
    """
    problem = ce.Counterexample(linear_term=False)
    return float(problem.f(problem.x0)) * (1 - lr * weight_decay) ** (2 * np.asarray(steps, dtype=float))


# ============================================================================================ 3. Haar moments
def golore_bases(dim: int, rank: int, count: int, seed: int = 0) -> Tensor:
    """The bases GoLore's optimizer draws for one (dim × ·) parameter at refreshes 0, 1, …, count − 1.

    Exactly the library's draws: :func:`golore_lab.projection.random_projection` fed the counter-based
    generator :func:`golore_lab.projection.refresh_generator` (``seed``, parameter 0, step k). Returns a
    float64 tensor (count, dim, rank). So the Monte Carlo below tests the sampler *and* the seeding scheme, as
    far as a mean can: its closed-form error needs the draws of successive refreshes to be uncorrelated, which
    independence implies but does not follow from.
    """
    shape = torch.empty(dim, 1, dtype=torch.float64)
    return torch.stack([proj.random_projection(shape, rank, "left", proj.refresh_generator(seed, 0, k))
                        for k in range(count)])


def stiefel_mean_rms(dim: int, rank: int, samples: int | np.ndarray) -> np.ndarray:
    """Root-mean-square error of the Monte Carlo mean of N projectors PPᵀ around (r/m)I, in closed form.

    For one Haar projector Π (rank r, trace r, Π² = Π): ‖Π − δI‖²_F = tr Π − 2δ tr Π + δ² m = r(1 − r/m),
    the same for every draw. With E Π = δI and independent draws the errors average out:
    E‖(1/N)Σ Πᵢ − δI‖²_F = r(1 − r/m)/N, so the error shrinks exactly like 1/√N.
    """
    return np.sqrt(rank * (1 - rank / dim) / np.asarray(samples, dtype=float))


def stiefel_mean_errors(bases: Tensor, sizes: Iterable[int]) -> np.ndarray:
    """‖(1/N) Σ_{i<N} PᵢPᵢᵀ − (r/m) I‖_F for each N in ``sizes`` (running means of one sequence of bases)."""
    count, dim, rank = bases.shape
    cumulative = torch.cumsum(bases @ bases.mT, 0)  # (count, m, m)
    eye = torch.eye(dim, dtype=bases.dtype)
    return np.array([float(torch.linalg.matrix_norm(cumulative[N - 1] / N - rank / dim * eye)) for N in sizes])


def stiefel_mean_study(dim: int = 10, rank: int = 4, sizes: Iterable[int] = tuple(2**k for k in range(3, 12)),
                       replicates: int = 8, seed: int = 0,
                       sampler: Callable[[int, int, int, int], Tensor] = golore_bases) -> pd.DataFrame:
    """Monte Carlo of E[PPᵀ] = (r/m)I: error of the running mean against N, ``replicates`` independent times.

    ``sampler(dim, rank, count, seed) -> (count, dim, rank)``, GoLore's own bases by default (replicate j
    uses seed ``seed + j``). Columns: ``replicate, samples, error, predicted`` (the closed-form RMS
    :func:`stiefel_mean_rms`).
    """
    sizes = list(sizes)
    rows = []
    for j in range(replicates):
        errors = stiefel_mean_errors(sampler(dim, rank, max(sizes), seed + j), sizes)
        rows += [dict(replicate=j, samples=N, error=e, predicted=float(stiefel_mean_rms(dim, rank, N)))
                 for N, e in zip(sizes, errors)]
    return pd.DataFrame(rows)


def rms_by_size(study: pd.DataFrame) -> pd.DataFrame:
    """RMS over replicates of the error at each N, next to the prediction (``samples, rms, predicted``)."""
    grouped = study.groupby("samples")
    return pd.DataFrame({"rms": np.sqrt(grouped.error.apply(lambda e: float(np.mean(np.square(e))))),
                         "predicted": grouped.predicted.first()}).reset_index()


def projected_energy(bases: Tensor, G: Tensor) -> tuple[float, float]:
    """Monte Carlo mean and standard error of ‖PᵀG‖²_F / ‖G‖²_F over ``bases``.

    For Haar P: E‖PᵀG‖² = tr(Gᵀ E[PPᵀ] G) = δ‖G‖², whatever G.
    """
    ratios = (bases.mT @ G).square().sum((-2, -1)) / _frob_sq(G)
    return float(ratios.mean()), float(ratios.std() / math.sqrt(len(ratios)))


def projected_gradient_bias(problem: ce.Counterexample, X: Tensor, projection: str, samples: int, seed: int = 0,
                            sizes: Iterable[int] | None = None) -> pd.DataFrame:
    """How far the mean of Πg (g the oracle at X, Π the method's projector) is from δ∇f(X).

    GoLore (``"random"``): P is drawn independently of the noise, so E[Πg] = E[Π] E[g] = δ∇f — the projected
    stochastic gradient is an unbiased estimate of δ∇f and the relative bias ‖mean − δ∇f‖/‖δ∇f‖ of the
    running mean shrinks like 1/√N. GaLore (``"svd"``): P = top-r space of g depends on the noise; on the
    "no B" instance Πg = ξσC, whose mean is 0, so the relative bias stays 1. Columns ``samples, bias``.
    The noise signs come from the problem's own seeded stream; GoLore's bases from :func:`golore_bases`.
    """
    sizes = sorted(sizes or [samples])
    stream = problem.noise_periods(torch.Generator().manual_seed(seed), period=samples)
    xis = next(stream)
    bases = golore_bases(problem.n, problem.r, samples, seed) if projection == "random" else None
    G = problem.grad(X)
    target = problem.r / problem.n * G
    total = torch.zeros_like(G)
    rows, k = [], 0
    for i in range(samples):
        g = problem.stochastic_grad(X, xis[i])
        P = bases[i] if bases is not None else proj.svd_projection(g, problem.r, "left")
        total += P @ (P.T @ g)
        if k < len(sizes) and i + 1 == sizes[k]:
            rows.append(dict(samples=i + 1, bias=math.sqrt(_frob_sq(total / (i + 1) - target) / _frob_sq(target))))
            k += 1
    return pd.DataFrame(rows)


def golore_bias_rms(problem: ce.Counterexample, X: Tensor, samples: int | np.ndarray) -> np.ndarray:
    """RMS of GoLore's relative bias ‖(1/N)ΣΠᵢgᵢ − δ∇f‖/‖δ∇f‖ after N independent (Π, g), in closed form.

    Πg is unbiased for δG (G = ∇f(X)) and Π² = Π, so E‖Πg − δG‖² = E⟨g, Πg⟩ − δ²‖G‖² = δ(‖G‖² + σ²) − δ²‖G‖²
    (σ² = E‖e‖² of one call), and the mean of N independent terms has 1/N of it.
    """
    G2 = _frob_sq(problem.grad(X))
    delta = problem.r / problem.n
    variance = delta * (G2 + problem.noise_variance) - delta**2 * G2
    return np.sqrt(variance / np.asarray(samples, dtype=float)) / (delta * math.sqrt(G2))


def basis_ignores_gradient(problem: ce.Counterexample, steps: int = 5, seed: int = 0) -> bool:
    """True if GoLore's optimizer draws bitwise the same bases whether it is fed ∇f or ∇f + noise.

    Two :class:`~golore_lab.SubspaceSGD` (``projection="random"``, τ = 1, same ``seed``) step from X₀, one on
    exact gradients, one on stochastic ones; their ``state["proj"]`` are compared at every step. This is the
    independence the proof uses: P is a function of (seed, step) only, so it is independent of the noise.
    """
    stream = problem.noise_periods(torch.Generator().manual_seed(seed + 1), period=steps)
    xis = next(stream)
    params, opts = [], []
    for _ in range(2):
        X = torch.nn.Parameter(problem.x0.clone())
        params.append(X)
        opts.append(SubspaceSGD([{"params": [X], "rank": problem.r, "update_proj_gap": 1, "proj_type": "left",
                                  "projection": "random"}], lr=0.1, seed=seed))
    for t in range(steps):
        params[0].grad = problem.grad(params[0].detach())
        params[1].grad = problem.stochastic_grad(params[1].detach(), xis[t])
        for opt in opts:
            opt.step()
        bases = [opt.state[X]["proj"] for opt, X in zip(opts, params)]
        if not torch.equal(*bases):
            return False
    return True


# ============================================================================================ 4. perturbation bound
def perturbation_bound(G: Tensor, E: Tensor, rank: int) -> dict[str, float]:
    """Both sides of ‖PᵀG‖_F ≥ √δ‖G‖_F − 2‖E‖_F, where P is the top-r left singular space of G + E.

    Derivation (for m ≤ n, δ = r/m). The top r of the m squared singular values of S = G + E carry at
    least the fraction r/m of ‖S‖², so ‖PᵀS‖ ≥ √δ‖S‖. Then
    ‖PᵀG‖ ≥ ‖PᵀS‖ − ‖PᵀE‖ ≥ √δ(‖G‖ − ‖E‖) − ‖E‖ = √δ‖G‖ − (1 + √δ)‖E‖ ≥ √δ‖G‖ − 2‖E‖.
    Returns ``lhs`` = ‖PᵀG‖, ``bound`` = √δ‖G‖ − 2‖E‖, ``sharp_bound`` = √δ‖G‖ − (1 + √δ)‖E‖, the norms
    ``grad`` = ‖G‖ and ``error`` = ‖E‖, and ``constant`` = (√δ‖G‖ − ‖PᵀG‖)/‖E‖, the smallest c for which
    ‖PᵀG‖ ≥ √δ‖G‖ − c‖E‖ holds on this instance (the bound says c ≤ 1 + √δ ≤ 2 always).
    """
    m, n = G.shape[-2:]
    if m > n:
        raise ValueError(f"perturbation_bound projects on the left and needs m <= n, got shape {tuple(G.shape)}")
    root_delta = math.sqrt(rank / m)
    P = proj.svd_projection(G + E, rank, "left")
    lhs, g, e = math.sqrt(_frob_sq(P.T @ G)), math.sqrt(_frob_sq(G)), math.sqrt(_frob_sq(E))
    return dict(lhs=lhs, bound=root_delta * g - 2 * e, sharp_bound=root_delta * g - (1 + root_delta) * e,
                grad=g, error=e, constant=(root_delta * g - lhs) / e if e > 0 else 0.0)


def perturbation_trials(dim: int = 10, cols: int = 10, rank: int = 4, trials: int = 200,
                        ratios: Iterable[float] = tuple(np.logspace(-2, 1, 13)), seed: int = 0) -> pd.DataFrame:
    """The bound on random instances: ``trials`` draws of G for each noise ratio ‖E‖/‖G‖ in ``ratios``.

    G = U diag(s) Vᵀ with Haar U, V and singular values s_i = exp(−κ i/m), κ ~ U(0, 5) (flat to fast-decaying
    spectra); E Gaussian, rescaled to the ratio. One row per trial: ``family="random"``, ``ratio`` and the
    fields of :func:`perturbation_bound`.
    """
    generator = torch.Generator().manual_seed(seed)
    k = min(dim, cols)
    rows = []
    for ratio in ratios:
        for _ in range(trials):
            U = proj.random_stiefel(dim, k, generator, torch.float64)
            V = proj.random_stiefel(cols, k, generator, torch.float64)
            kappa = 5 * float(torch.rand((), generator=generator, dtype=torch.float64))
            s = torch.exp(-kappa * torch.arange(k, dtype=torch.float64) / k)
            G = (U * s) @ V.T
            E = torch.randn(dim, cols, generator=generator, dtype=torch.float64)
            E *= ratio * math.sqrt(_frob_sq(G) / _frob_sq(E))
            rows.append(dict(family="random", ratio=float(ratio), **perturbation_bound(G, E, rank)))
    return pd.DataFrame(rows)


def counterexample_trials(problem: ce.Counterexample, levels: Iterable[float] | None = None,
                          cancel: bool = False) -> pd.DataFrame:
    """The bound on the counterexample's own gradient and noise: G = ∇f(X₀), E = s·σC for each level s.

    On the "no B" instance G = diag(½I_{m−r}, 0): while s < ½ the SVD keeps r directions of G
    (‖PᵀG‖ = ½√r); once s > ½ it keeps the noise block and ‖PᵀG‖ = 0, with ‖E‖/‖G‖ = √(r/(m−r)) only:
    the instance reaches c = (√δ‖G‖ − 0)/‖E‖ = √(1 − δ).

    ``cancel=True`` makes it tight: the noise also removes the fraction r/m of the signal,
    E = −(r/m)G + s·σC. At s = (1 − r/m)·½ (+) the SVD still picks the noise block while
    ‖E‖² = ¼ r(m−r)/m, and c = √δ‖G‖/‖E‖ = 1 (for any m, r): no bound of the form √δ‖G‖ − c‖E‖ with
    c < 1 can hold, against c ≤ 1 + √δ proved. Rows: ``family`` (``"counterexample"`` or
    ``"counterexample, cancelling"``), ``level`` s, ``ratio`` ‖E‖/‖G‖ and the fields of :func:`perturbation_bound`.
    By default the levels are 25 points in [0.02, 1] plus one just above the switch (½ or (1 − r/m)·½ for
    the "no B" instance), where c is largest.
    """
    G = problem.grad(problem.x0)
    if levels is None:
        switch = float(torch.linalg.matrix_norm(G, 2)) * (1 - problem.r / problem.n if cancel else 1) / problem.noise_sigma
        levels = np.r_[np.linspace(0.02, 1.0, 25), switch * (1 + 1e-6)]
    rows = []
    for level in levels:
        E = level * problem.noise_sigma * problem.C
        if cancel:
            E = E - problem.r / problem.n * G
        out = perturbation_bound(G, E, problem.r)
        rows.append(dict(family="counterexample, cancelling" if cancel else "counterexample", level=float(level),
                         ratio=out["error"] / out["grad"], **out))
    return pd.DataFrame(rows)


def large_batch_capture(problem: ce.Counterexample, batches: Iterable[int], X: Tensor | None = None) -> pd.DataFrame:
    """What a batch of B buys at a refresh: E‖Pᵀ∇f‖² over the exact law of the mean of B oracle calls.

    P = top-r left singular space of ∇f(X) + ξ̄σC, ξ̄ the mean of B signs (:func:`noise_law`), at X = X₀ by
    default. Columns per B: ``captured`` = E‖Pᵀ∇f‖²/‖∇f‖² (exact, a finite sum), ``pointwise_bound`` =
    E[(√δ‖∇f‖ − 2‖E‖)₊²]/‖∇f‖² (the perturbation bound squared, where positive), ``mean_bound`` =
    (½δ‖∇f‖² − 4σ²/B)/‖∇f‖², from (a − b)² ≥ ½a² − b² and E‖E‖² ≤ σ²/B: E‖Pᵀ∇f‖² ≥ ½δ‖∇f‖² − 4E‖E‖²
    ≥ ½δ‖∇f‖² − 4σ²/B. The last is the form the L.B. GaLore argument uses (:func:`lb_galore_rate_bound`).

    At a block-diagonal X (X₀), a batch whose law puts mass on an outcome where a singular value of the signal
    ties with the noise level is refused: the top-r space is then not unique and the capture would depend on how
    LAPACK breaks the tie (at the no-B X₀, B = 4 and 8 have ξ̄ = ±½, which ties all ten singular values at ½).
    :func:`capture_interval` gives the range over every tie-breaking instead.
    """
    X = problem.x0 if X is None else X
    G = problem.grad(X)
    g2, delta = _frob_sq(G), problem.r / problem.n
    k = problem.n - problem.r
    block_diagonal = float(X[:k, k:].abs().max()) == 0
    rows = []
    for batch in batches:
        if block_diagonal:
            interval = capture_interval(problem, [batch], X).iloc[0]
            if interval.tie_probability > 0:
                raise ValueError(f"Invalid batch: {batch} (with probability {interval.tie_probability:g} a singular "
                                 "value of the signal ties with the noise level: the top-r space is not unique and "
                                 f"the capture lies anywhere in [{interval.lower:.4g}, {interval.upper:.4g}]; "
                                 "use capture_interval)")
        values, probs = noise_law(problem, batch)
        captured = pointwise = 0.0
        for xi, p in zip(values, probs):
            E = float(xi) * problem.noise_sigma * problem.C
            out = perturbation_bound(G, E, problem.r)
            captured += p * out["lhs"] ** 2
            pointwise += p * max(out["bound"], 0.0) ** 2
        variance = problem.noise_variance / batch
        rows.append(dict(batch=batch, captured=captured / g2, pointwise_bound=pointwise / g2,
                         mean_bound=(0.5 * delta * g2 - 4 * variance) / g2, delta=delta))
    return pd.DataFrame(rows)


def capture_interval(problem: ce.Counterexample, batches: Iterable[int], X: Tensor | None = None,
                     tol: float = 1e-12) -> pd.DataFrame:
    """E‖Pᵀ∇f‖²/‖∇f‖² at a refresh of batch B, as the range over every way of breaking singular-value ties.

    No SVD is taken, so no tie is broken by LAPACK. While the top-right block of X is 0 (true at X₀) the
    stochastic gradient is diag(M, ξ̄σI_r): its singular values are those of M (s₁ ≥ … ≥ s_k) and r copies of
    v = |ξ̄|σ. The top-r space holds the a directions of M with sᵢ > v; if a < r the other r − a slots are any
    (r − a)-dimensional subspace of the eigenspace at v, which holds the e directions of M with sᵢ = v and the
    r noise coordinates. So ‖Pᵀ∇f‖² ranges over [Σ_{sᵢ>v} sᵢ², Σ_{sᵢ>v} sᵢ² + v²·min(r − a, e)] (the top r of
    M when a ≥ r). Columns per B: ``lower``, ``upper`` (fractions of ‖∇f‖²) and ``tie_probability``
    (the probability of an outcome whose range is not a point).
    """
    X = problem.x0 if X is None else X
    k = problem.n - problem.r
    if float(X[:k, k:].abs().max()) > 0:
        raise ValueError("capture_interval needs X with a zero top-right block (the stochastic gradient block-diagonal)")
    s = torch.linalg.svdvals(X[:k, :k] + problem.B[:k, :k]).numpy()
    g2 = float(np.sum(s * s))
    rows = []
    for batch in batches:
        values, probs = noise_law(problem, batch)
        lower = upper = tie = 0.0
        for xi, p in zip(values, probs):
            v = abs(float(xi)) * problem.noise_sigma
            above, equal = s[s > v + tol], s[np.abs(s - v) <= tol]
            if len(above) >= problem.r:
                low = high = float(np.sum(np.sort(above)[::-1][: problem.r] ** 2))
            else:
                low = float(np.sum(above**2))
                high = low + v * v * min(problem.r - len(above), len(equal))
            lower, upper = lower + p * low, upper + p * high
            tie += p * (high > low)
        rows.append(dict(batch=batch, lower=lower / g2, upper=upper / g2, tie_probability=tie))
    return pd.DataFrame(rows)


# ============================================================================================ 4b. the odd/even batch law
@dataclass(frozen=True)
class RefreshThreshold:
    """The smallest noise level a refresh of L.B. GaLore can see, and how often it sees it.

    ``level`` θ = σ·min|ξ̄| over the law of ξ̄ (the mean of B signs): σ/B for odd B, 0 for even B;
    ``probability`` P(|ξ̄| = min|ξ̄|) at each refresh: C(B, ⌊B/2⌋)/2^(B−1) for odd B, C(B, B/2)/2^B for even B.
    """

    level: float
    probability: float


def refresh_threshold(problem: ce.Counterexample, batch: int) -> RefreshThreshold:
    """θ and its probability for a refresh batch of ``batch`` oracle calls (see :class:`RefreshThreshold`).

    ``noise="gaussian"`` (ξ ~ N(0, 1) in the same rows): |ξ̄| has a density at 0, so θ = 0 — every level
    above 0 is undercut with positive probability at every refresh — and the level 0 itself has probability 0.
    That is why the stall needs the two-point law: |ξ| ≡ 1 never lets a refresh see the signal below σ.
    """
    if problem.noise == "gaussian":
        return RefreshThreshold(level=0.0, probability=0.0)
    values, probs = noise_law(problem, batch)
    magnitudes = np.abs(values)
    smallest = magnitudes.min()
    return RefreshThreshold(level=problem.noise_sigma * float(smallest),
                            probability=float(probs[np.isclose(magnitudes, smallest)].sum()))


def lb_galore_plateau(problem: ce.Counterexample, batch: int) -> float:
    """Where L.B. GaLore with a refresh batch of B ends on the counterexample, as ητ → 0: f* + ½Σᵢ min(sᵢ(M₀), θ)².

    The package's own law (not the paper's), for plain SGD and the two-point noise; ``noise="gaussian"`` has
    θ = 0 (:func:`refresh_threshold`) and gives f*.

    θ = σ/B for odd B, 0 for even B (:func:`refresh_threshold`), so even batches reach f* and odd ones stall;
    B = 1 is GaLore's plateau. The law, for the subspace step P N with plain SGD (derivation in
    ``docs/theory.md``, "The odd/even batch law"): a refresh sees diag(M, ξ̄σI_r), whose top-r SVD keeps the
    directions of M with sᵢ > |ξ̄|σ; those shrink by (1 − η)^τ over the period, the others do not move. A
    singular value therefore shrinks while it exceeds the threshold of some refresh, and θ — the smallest one,
    seen with positive probability at every refresh — is where it stops. Exact limit at finite ητ:
    :func:`lb_galore_limit`.
    """
    threshold = refresh_threshold(problem, batch).level
    s = problem.m0_singular_values.clamp(max=threshold)
    return problem.f_star + 0.5 * float((s * s).sum())


def lb_galore_shrinks(problem: ce.Counterexample, threshold: float, lr: float,
                      update_proj_gap: int) -> np.ndarray:
    """kᵢ = the number of periods in the subspace that bring sᵢ(M₀) to ``threshold`` or below: ⌈log(sᵢ/θ)/log(1/q)⌉₊.

    q = (1 − η)^τ is the factor by which plain SGD shrinks a kept direction of M over one period. A refresh at
    threshold θ' ≥ θ shrinks a value only while it exceeds θ', so a value never shrinks below q·θ, and a
    refresh at θ shrinks at least one value above θ (the largest is always kept). Hence Σᵢ kᵢ refreshes at θ
    surely bring every value to θ or below, whatever the other refreshes did. ``threshold`` must be > 0.
    """
    if not threshold > 0:
        raise ValueError(f"Invalid threshold: {threshold!r} (must be > 0)")
    if not 0 < lr < 1:
        raise ValueError(f"Invalid lr: {lr!r} (the shrink factor (1 - lr)^tau needs 0 < lr < 1)")
    log_q = update_proj_gap * math.log1p(-lr)
    s = problem.m0_singular_values.numpy()
    return np.maximum(0, np.ceil(np.log(s / threshold) / -log_q)).astype(int)


def lb_galore_limit(problem: ce.Counterexample, batch: int, lr: float, update_proj_gap: int) -> float:
    """The exact end value of L.B. GaLore with plain SGD for an odd refresh batch: f* + ½Σᵢ (sᵢ qᵏⁱ)².

    Each singular value stops at its first value sᵢq^kᵢ ≤ θ = σ/B (:func:`lb_galore_shrinks`), inside (qθ, θ]:
    the limit lies in [f* + ½Σ min(sᵢ, qθ)², :func:`lb_galore_plateau`] and tends to the plateau as ητ → 0.
    Reached surely once Σᵢ kᵢ refreshes saw |ξ̄| = 1/B. Even B have θ = 0 and limit f* (reached only
    asymptotically); they are refused here.
    """
    threshold = refresh_threshold(problem, batch).level
    if threshold == 0:
        raise ValueError(f"Invalid batch: {batch} (an even batch, or exact gradients, has threshold 0: "
                         "the limit is f* and is reached only asymptotically)")
    q = (1 - lr) ** update_proj_gap
    s = problem.m0_singular_values.numpy() * q ** lb_galore_shrinks(problem, threshold, lr, update_proj_gap)
    return problem.f_star + 0.5 * float(np.sum(s * s))


# ============================================================================================ 5. GoLore's descent and rate
def golore_descent_trace(problem: ce.Counterexample, lr: float, steps: int, seed: int = 0) -> pd.DataFrame:
    """GoLore (plain SGD, τ = 1) stepped with the library optimizer, with both sides of its descent inequality.

    Step t: g = ∇f(X_t) + e_t, a fresh Haar P_t, X_{t+1} = X_t − ηP_tP_tᵀg. L-smoothness gives, surely,

    .. math::
        f(X_{t+1}) ≤ f(X_t) − η⟨∇f(X_t), Π_t g⟩ + \\tfrac{Lη²}{2}‖P_tᵀ g‖²          (pathwise)

    and taking E over (P_t, e_t), independent, with E Π = δI, E e = 0, E‖e‖² ≤ σ²:

    .. math::
        E_t f(X_{t+1}) ≤ f(X_t) − ηδ‖∇f‖² + \\tfrac{Lη²δ}{2}(‖∇f‖² + σ²)
                      ≤ f(X_t) − \\tfrac{ηδ}{2}‖∇f‖² + \\tfrac{Lη²δσ²}{2}      (η ≤ 1/L)

    Summing over T steps: (1/T) Σ_t E‖∇f(X_t)‖² ≤ 2Δ/(ηδT) + Lησ².

    One row per step: ``step, f, f_next, grad_sq`` ‖∇f‖², ``inner`` ⟨∇f, Πg⟩, ``proj_sq`` ‖Pᵀg‖²,
    ``oracle_sq`` ‖g‖², ``pathwise_bound`` (the right side of (pathwise) minus f(X_t)) and ``expected_bound``
    (the right side of the first expectation line minus f(X_t)). σ² and L come from :func:`assumptions`.
    """
    a = assumptions(problem)
    L, delta = a.smoothness, a.delta
    X = torch.nn.Parameter(problem.x0.clone())
    opt = SubspaceSGD([{"params": [X], "rank": problem.r, "update_proj_gap": 1, "proj_type": "left",
                        "projection": "random"}], lr=lr, seed=seed)
    xis = next(problem.noise_periods(torch.Generator().manual_seed(seed), period=steps))
    rows = []
    for t in range(steps):
        x = X.detach()
        grad = problem.grad(x)
        g = problem.stochastic_grad(x, xis[t])
        f = float(problem.f(x))
        X.grad = g.clone()
        opt.step()
        P = opt.state[X]["proj"]  # (m, r), the basis used at this step
        inner = float((grad * (P @ (P.T @ g))).sum())
        proj_sq, grad_sq = _frob_sq(P.T @ g), _frob_sq(grad)
        rows.append(dict(step=t, f=f, f_next=float(problem.f(X.detach())), grad_sq=grad_sq, inner=inner,
                         proj_sq=proj_sq, oracle_sq=_frob_sq(g),
                         pathwise_bound=-lr * inner + L * lr**2 / 2 * proj_sq,
                         expected_bound=-lr * delta * grad_sq + L * lr**2 * delta / 2 * (grad_sq + a.noise_variance)))
    return pd.DataFrame(rows)


def golore_rate_bound(a: Assumptions, lr: float, steps: int) -> float:
    """The derived bound on (1/T) Σ E‖∇f(X_t)‖² for GoLore-SGD with τ = 1, η ≤ 1/L: 2Δ/(ηδT) + Lησ²."""
    return 2 * a.gap / (lr * a.delta * steps) + a.smoothness * lr * a.noise_variance


def martingale_z(increments: np.ndarray) -> float:
    """z-score of the mean of ``increments`` against 0: mean / (std / √T). |z| ≲ 3 for mean-zero increments."""
    increments = np.asarray(increments, float)
    return float(increments.mean() / (increments.std(ddof=1) / math.sqrt(len(increments))))


def stochastic_rates(problem: ce.Counterexample, steps_grid: Iterable[int],
                     methods: Iterable[str] = ("galore", "golore@100", "lb-galore"), seeds: Iterable[int] = range(4),
                     lr_scale: float = 1.0, batch_scale: float = 1.0, update_proj_gap: int = 1,
                     log_every: int = 1) -> pd.DataFrame:
    """Average ‖∇f‖² at η = ``lr_scale``/√T for each horizon T (L.B. batch ⌈``batch_scale``·√T⌉).

    **Not a test of the convergence theorems**: on a strongly convex quadratic any method that converges at
    all has (1/T)Σ‖∇f‖² ≈ C/(ηT) = C/√T at η = 1/√T — exact-gradient GaLore too — so the slope −½ does not
    separate the noise term from the deterministic one (:func:`noise_floors` does). Kept to show exactly that.
    ``log_every`` = 1 (the default) averages every step, as the theorems' (1/T)Σ does; logging once per
    period of τ steps instead samples the start of each period only and steepens the fitted slope.
    One row per (method, T, seed): ``method, steps, seed, lr, batch, avg_grad_sq, min_grad_sq``.
    """
    methods, seeds = list(methods), list(seeds)
    frames = []
    for T in steps_grid:
        lr, batch = lr_scale / math.sqrt(T), math.ceil(batch_scale * math.sqrt(T))
        frame = ce.run(problem, methods=methods, optimizer="sgd", steps=T, lr=lr, update_proj_gap=update_proj_gap,
                       seeds=seeds, batch=batch, log_every=log_every)
        frame = frame[frame.step < T]
        stats = frame.groupby(["method", "seed"], sort=False).grad_norm_sq.agg(avg_grad_sq="mean", min_grad_sq="min")
        frames.append(stats.reset_index().assign(steps=T, lr=lr, batch=batch))
    columns = ["method", "steps", "seed", "lr", "batch", "avg_grad_sq", "min_grad_sq"]
    return pd.concat(frames, ignore_index=True)[columns]


# ============================================================================================ 5b. the noise floor at fixed η
def _haar_offdiagonal_moment(m: int, r: int) -> float:
    """E[Πᵢⱼ²] for i ≠ j, Π a Haar rank-r projector of ℝᵐ: r(m − r)/(m(m − 1)(m + 2)).

    From Σⱼ Πᵢⱼ² = Πᵢᵢ (Π² = Π), E Πᵢᵢ = r/m and E Πᵢᵢ² = r(r + 2)/(m(m + 2)) (Πᵢᵢ ~ Beta(r/2, (m − r)/2)).
    """
    return r * (m - r) / (m * (m - 1) * (m + 2))


def golore_floor_constants(problem: ce.Counterexample) -> tuple[float, float]:
    """(c₂, c₃) of :func:`golore_expected_grad_sq`: E[(Π_tt²)ᵢᵢ] and E‖P_top P_lastᵀ‖²_F for Haar P.

    Π_tt is the (k × k) block of Π = PPᵀ on the k = n − r rows f sees, P_top/P_last the first k/last r rows of P.
    c₂ = E Πᵢᵢ² + (k − 1)E Πᵢⱼ², c₃ = k·r·E Πᵢⱼ² (:func:`_haar_offdiagonal_moment`).
    """
    m, r = problem.n, problem.r
    k, off = m - r, _haar_offdiagonal_moment(problem.n, problem.r)
    return r * (r + 2) / (m * (m + 2)) + (k - 1) * off, k * r * off


def golore_expected_grad_sq(problem: ce.Counterexample, lr: float, steps) -> np.ndarray:
    """E‖∇f(X_t)‖² of GoLore-SGD with τ = 1 on the counterexample, exactly (package's derivation).

    Write Y for the first k = n − r rows of X + B, so ∇f = [Y; 0] and ‖∇f‖² = ‖Y‖². A step with a fresh Haar
    P and the noise ξσC (E ξ = 0, E ξ² = 1: two-point or Gaussian) is
    Y⁺ = (I − ηΠ_tt)Y − ησξ P_top P_lastᵀ [0 I_r]. P is independent of Y and ξ of both, so the cross term
    vanishes and, E[Π_tt²] being c₂I (Haar P is invariant under rotations of the first k coordinates),
    E‖Y⁺‖² = a E‖Y‖² + η²σ²c₃ with a = 1 − 2ηδ + η²c₂ (:func:`golore_floor_constants`). Hence
    E‖∇f(X_t)‖² = aᵗ(‖∇f(X₀)‖² − s*) + s*, with the noise floor s* = ησ²c₃/(2δ − ηc₂) — proportional to η
    for small η (2/3·η at the paper's instance), and below the bound's Lη·E‖e‖² = 4η. The noise
    reaches the rows f sees only through the random basis: the SVD basis of GaLore never lets it in here.
    """
    if problem.noise not in ("anisotropic", "gaussian"):
        raise ValueError(f"golore_expected_grad_sq needs noise in the last rows ('anisotropic' or 'gaussian'), "
                         f"not {problem.noise!r}")
    c2, c3 = golore_floor_constants(problem)
    delta = problem.r / problem.n
    if not 0 < lr < 2 * delta / c2:
        raise ValueError(f"Invalid lr: {lr!r} (the second moment contracts only for 0 < lr < 2δ/c₂ = {2 * delta / c2:.4g})")
    a = 1 - 2 * lr * delta + lr**2 * c2
    floor = lr * problem.noise_sigma**2 * c3 / (2 * delta - lr * c2)
    start = _frob_sq(problem.grad(problem.x0))
    return a ** np.asarray(steps, dtype=float) * (start - floor) + floor


def golore_floor(problem: ce.Counterexample, lr: float) -> float:
    """GoLore-SGD's (τ = 1) stationary E‖∇f‖² on the counterexample: ησ²c₃/(2δ − ηc₂) (:func:`golore_expected_grad_sq`)."""
    return float(golore_expected_grad_sq(problem, lr, np.inf))


def lb_galore_floor(problem: ce.Counterexample, batch: int, lr: float, update_proj_gap: int = 1) -> float:
    """Where ‖∇f‖² of L.B. GaLore (plain SGD) ends on the counterexample: 2(f_∞ − f*), 0 for a threshold of 0.

    ‖∇f‖² = ‖M‖² = 2(f − f*) while the top-right block stays 0, and f_∞ is the odd/even law's exact end value
    (:func:`lb_galore_limit`; the package's own law, two-point noise). B = 1 is GaLore. The noise never enters
    the rows f sees (the SVD basis is block-aligned), so this floor is all bias and does not grow with η.
    """
    if refresh_threshold(problem, batch).level == 0:
        return 0.0
    return 2 * (lb_galore_limit(problem, batch, lr, update_proj_gap) - problem.f_star)


def noise_floors(problem: ce.Counterexample, lrs: Iterable[float], batches: Iterable[int] = (1,),
                 methods: Iterable[str] = ("golore@100", "lb-galore"), seeds: Iterable[int] = range(4),
                 horizon: float = 100.0) -> pd.DataFrame:
    """The rate experiment that separates the noise term from the deterministic one: fixed η, τ = 1, long runs.

    For each η in ``lrs`` every method runs T = round(``horizon``/η) steps (long enough for the start-up term,
    which decays like (1 − ηδ)ᵗ or faster, to vanish in the second half), every step logged; the floor is the
    mean of ‖∇f(X_t)‖² over T/2 ≤ t ≤ T. ``lb-galore`` runs once per batch in ``batches`` (B = 1 is GaLore).
    The theorems predict: GoLore's floor ∝ η (its noise term Lησ²), L.B. GaLore's a bias that shrinks as B
    grows, whatever η; a method with a floor that vanishes neither with η nor with B violates both.
    One row per (method, batch, lr, seed): ``method, batch, lr, seed, steps, floor, predicted`` (the closed
    forms :func:`golore_floor` / :func:`lb_galore_floor`; NaN for another method).
    """
    methods, seeds = list(methods), list(seeds)
    rows = []
    for lr in lrs:
        T = int(round(horizon / lr))
        others = [m for m in methods if m != "lb-galore"]  # their runs ignore ``batch``: they join the first call
        calls = [(b, ["lb-galore"]) for b in batches] if "lb-galore" in methods else []
        calls = [(calls[0][0], others + calls[0][1])] + calls[1:] if calls else [(1, others)]
        for batch, names in calls:
            frame = ce.run(problem, methods=names, optimizer="sgd", steps=T, lr=lr, update_proj_gap=1, seeds=seeds,
                           batch=batch, log_every=1)
            late = frame[frame.step >= T // 2]
            for (method, seed), g in late.groupby(["method", "seed"], sort=False):
                predicted = math.nan
                if method == "golore@100":
                    predicted = golore_floor(problem, lr)
                elif method in ("lb-galore", "galore") and problem.noise == "anisotropic":
                    predicted = lb_galore_floor(problem, batch if method == "lb-galore" else 1, lr)
                rows.append(dict(method=method, batch=batch if method == "lb-galore" else 1, lr=lr, seed=seed, steps=T,
                                 floor=float(g.grad_norm_sq.mean()), predicted=predicted))
    return pd.DataFrame(rows)


# ============================================================================================ 5c. L.B. GaLore, τ = 1
def lb_galore_rate_bound(a: Assumptions, lr: float, steps, batch: int) -> np.ndarray:
    """The derived bound on (1/T)Σ E‖∇f‖² of L.B. GaLore-SGD with τ = 1, η ≤ 1/(4L): 8Δ/(ηδT) + 14σ²/(δB).

    τ = 1 (a refresh, with its batch of B, at every step; golore_lab's L.B. GaLore uses the batch at refresh
    steps only, which at τ = 1 is every step). Step X⁺ = X − ηΠg, g = ∇f + E, Π the top-r projector of g — it
    depends on E, so E[ΠE] ≠ 0 and the cross term must be bounded, not averaged away:

    * ⟨∇f, Πg⟩ = ‖Π∇f‖² + ⟨Π∇f, ΠE⟩ ≥ ½‖Π∇f‖² − ½‖E‖² and ‖Πg‖² ≤ 2‖Π∇f‖² + 2‖E‖², so smoothness gives
      f⁺ ≤ f − (η/2 − Lη²)‖Π∇f‖² + (η/2 + Lη²)‖E‖² ≤ f − (η/4)‖Π∇f‖² + (3η/4)‖E‖²  (Lη ≤ ¼);
    * the perturbation bound and (a − b)² ≥ ½a² − b²: ‖Π∇f‖² ≥ (δ/2)‖∇f‖² − 4‖E‖²;
    * together, surely: f⁺ ≤ f − (ηδ/8)‖∇f‖² + (7η/4)‖E‖². Summing with E‖E‖² ≤ σ²/B and f ≥ f*:
      (1/T)Σ E‖∇f‖² ≤ 8Δ/(ηδT) + 14σ²/(δB).

    The constants are this package's (:func:`lb_galore_descent_trace` checks each line at every step). τ > 1
    needs the in-period drift as well (not done here).
    """
    if a.smoothness * lr > 0.25 + 1e-12:
        raise ValueError(f"lb_galore_rate_bound needs L·lr <= 1/4, got {a.smoothness * lr:g}")
    if not _is_batch(batch):
        raise ValueError(f"Invalid batch: {batch!r} (must be an integer >= 1)")
    return 8 * a.gap / (lr * a.delta * np.asarray(steps, dtype=float)) + 14 * a.noise_variance / (a.delta * batch)


def _is_batch(batch) -> bool:
    return isinstance(batch, (int, np.integer)) and not isinstance(batch, bool) and batch >= 1


def lb_galore_descent_trace(problem: ce.Counterexample, lr: float, steps: int, batch: int,
                            seed: int = 0) -> pd.DataFrame:
    """L.B. GaLore (τ = 1, plain SGD, a batch of B at every step) stepped with the library optimizer.

    The gradient fed to :class:`~golore_lab.SubspaceSGD` (``projection="svd"``, ``update_proj_gap=1``) is
    ∇f + E with E = ξ̄σC, ξ̄ the mean of B draws from the problem's seeded noise stream. One row per step:
    ``f, f_next, grad_sq`` ‖∇f‖², ``proj_grad_sq`` ‖Π∇f‖², ``error_sq`` ‖E‖²; the lines of
    :func:`lb_galore_rate_bound` are ``descent_bound`` = −(η/4)‖Π∇f‖² + (3η/4)‖E‖²,
    ``capture_bound`` = (δ/2)‖∇f‖² − 4‖E‖² and ``combined_bound`` = −(ηδ/8)‖∇f‖² + (7η/4)‖E‖².
    """
    delta = problem.r / problem.n
    X = torch.nn.Parameter(problem.x0.clone())
    opt = SubspaceSGD([{"params": [X], "rank": problem.r, "update_proj_gap": 1, "proj_type": "left",
                        "projection": "svd"}], lr=lr, seed=seed)
    stream = problem.noise_periods(torch.Generator().manual_seed(seed), period=1, refresh_batch=batch)
    rows = []
    for _ in range(steps):
        x = X.detach().clone()
        grad = problem.grad(x)
        E = problem.noise_matrix(next(stream)[0])
        X.grad = grad + E
        opt.step()
        P = opt.state[X]["proj"]
        grad_sq, proj_sq, error_sq = _frob_sq(grad), _frob_sq(P.T @ grad), _frob_sq(E)
        rows.append(dict(f=float(problem.f(x)), f_next=float(problem.f(X.detach())), grad_sq=grad_sq,
                         proj_grad_sq=proj_sq, error_sq=error_sq,
                         descent_bound=-lr / 4 * proj_sq + 3 * lr / 4 * error_sq,
                         capture_bound=delta / 2 * grad_sq - 4 * error_sq,
                         combined_bound=-lr * delta / 8 * grad_sq + 7 * lr / 4 * error_sq))
    return pd.DataFrame(rows)


def rate_summary(rates: pd.DataFrame, value: str = "avg_grad_sq") -> pd.DataFrame:
    """Mean over seeds of ``value`` per method and T (``method, steps, mean, min, max``)."""
    return rates.groupby(["method", "steps"], sort=False)[value].agg(["mean", "min", "max"]).reset_index()


def rate_slopes(summary: pd.DataFrame, min_steps: int = 0) -> pd.Series:
    """The fitted log-log slope of the seed-mean against T per method, over T ≥ ``min_steps``."""
    kept = summary[summary.steps >= min_steps]
    return pd.Series({method: loglog_slope(g.steps, g["mean"]) for method, g in kept.groupby("method", sort=False)})


# ============================================================================================ 6. deterministic GaLore
def deterministic_bound(a: Assumptions, lr: float, update_proj_gap: int, steps) -> np.ndarray:
    """A derived bound on (1/T) Σ_{t<T} ‖∇f(X_t)‖² for GaLore with exact gradients, β₁ = 1, Lητ ≤ ½.

    Write Π for the period's projector (top-r space of ∇f at its refresh t₀) and S = Σ_{t in period}
    ‖Π∇f_t‖². (i) descent: f_{t+1} ≤ f_t − (η/2)‖Π∇f_t‖² (η ≤ 1/L), so Σ_periods S ≤ 2Δ/η. (ii) drift:
    ‖X_t − X_{t₀}‖² ≤ η²τS. (iii) ‖∇f_t‖² ≤ 2‖∇f_{t₀}‖² + 2L²‖X_t − X_{t₀}‖² ≤ (2/δ)‖Π∇f_{t₀}‖² + 2L²η²τS,
    using the refresh ‖Π∇f_{t₀}‖² ≥ δ‖∇f_{t₀}‖². (iv) ‖Π∇f_{t₀}‖² ≤ 2‖Π∇f_s‖² + 2L²η²τS for every s of
    the period; averaged, ≤ (2/τ)S + 2L²η²τS. Summing (iii) over the period with (iv) and Lητ ≤ ½:
    Σ‖∇f_t‖² ≤ (4/δ + 1/δ + ½)S, hence (1/T)Σ‖∇f_t‖² ≤ (10/δ + 1)Δ/(ηT) = O(1/T). The constants are
    derived here, not the paper's (``docs/theory.md``, "Deterministic GaLore").
    """
    if a.smoothness * lr * update_proj_gap > 0.5 + 1e-12:
        raise ValueError(f"deterministic_bound needs L·lr·update_proj_gap <= 1/2, got "
                         f"{a.smoothness * lr * update_proj_gap:g}")
    return (10 / a.delta + 1) * a.gap / (lr * np.asarray(steps, dtype=float))


def deterministic_trace(problem: ce.Counterexample, lr: float, update_proj_gap: int, steps: int) -> pd.DataFrame:
    """GaLore on exact gradients (plain SGD, MP vacuous) stepped with the library optimizer, with the proof's facts.

    One row per step t: ``step, refresh`` (t mod τ = 0), ``f, f_next, grad_sq`` ‖∇f_t‖², ``proj_sq``
    ‖Pᵀ∇f_t‖² (P the period's basis), ``anchor_sq`` ‖Pᵀ∇f_{t₀}‖² at the period's refresh t₀, ``drift_sq``
    ‖X_t − X_{t₀}‖². The facts checked on it: at a refresh proj_sq ≥ δ·grad_sq; inside a period
    proj_sq ≥ ½anchor_sq − L²drift_sq; every step f_next ≤ f − (η/2)proj_sq (η ≤ 1/L).
    """
    X = torch.nn.Parameter(problem.x0.clone())
    opt = SubspaceSGD([{"params": [X], "rank": problem.r, "update_proj_gap": update_proj_gap, "proj_type": "left",
                        "projection": "svd"}], lr=lr)
    rows = []
    anchor = anchor_sq = None
    for t in range(steps):
        x = X.detach().clone()
        grad = problem.grad(x)
        X.grad = grad.clone()
        opt.step()
        P = opt.state[X]["proj"]
        proj_sq = _frob_sq(P.T @ grad)
        if t % update_proj_gap == 0:
            anchor, anchor_sq = x, proj_sq
        rows.append(dict(step=t, refresh=t % update_proj_gap == 0, f=float(problem.f(x)),
                         f_next=float(problem.f(X.detach())), grad_sq=_frob_sq(grad), proj_sq=proj_sq,
                         anchor_sq=anchor_sq, drift_sq=_frob_sq(x - anchor)))
    return pd.DataFrame(rows)


def deterministic_rate(problem: ce.Counterexample, lr: float, update_proj_gap: int, steps: int,
                       methods: Iterable[str] = ("galore",)) -> pd.DataFrame:
    """(1/T) Σ_{t<T} ‖∇f(X_t)‖² for every T ≤ ``steps`` of one exact-gradient run (fast engine, every step logged).

    ``problem`` must have exact gradients (``Counterexample(noise="none")``); ``steps`` must be a multiple of
    ``update_proj_gap``. Columns ``method, steps, avg_grad_sq, bound`` (:func:`deterministic_bound`).
    """
    if problem.noise != "none":
        raise ValueError(f"deterministic_rate needs exact gradients (noise='none'), got noise={problem.noise!r}")
    if steps % update_proj_gap:
        raise ValueError(f"Invalid steps: {steps} (must be a multiple of update_proj_gap = {update_proj_gap})")
    frame = ce.run(problem, methods=methods, optimizer="sgd", steps=steps, lr=lr, update_proj_gap=update_proj_gap,
                   seeds=[0], log_every=1)
    bound = deterministic_bound(assumptions(problem), lr, update_proj_gap, np.arange(1, steps + 1))
    frames = []
    for method, rows in frame.groupby("method", sort=False):
        values = rows.grad_norm_sq.to_numpy()[:steps]  # steps 0 .. T−1
        T = np.arange(1, steps + 1)
        frames.append(pd.DataFrame(dict(method=method, steps=T, avg_grad_sq=np.cumsum(values) / T, bound=bound)))
    return pd.concat(frames, ignore_index=True)
