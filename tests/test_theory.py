"""The convergence proofs' facts (notebook 05), each checked numerically; each check has a case where it fails."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from golore_lab import counterexample as ce
from golore_lab import projection as proj
from golore_lab import theory as th


@pytest.fixture(scope="module")
def problem():
    return ce.Counterexample()


@pytest.fixture(scope="module")
def no_b():
    return ce.Counterexample(linear_term=False)


# ------------------------------------------------------------------ 1. assumptions
def test_assumptions_of_the_counterexample(problem, no_b):
    a = th.assumptions(problem)
    assert a.smoothness == pytest.approx(1.0) and a.delta == pytest.approx(0.4)
    assert a.noise_variance == pytest.approx(4.0) and a.noise_bias < 1e-12
    assert a.gap == pytest.approx(0.8107 + 23.2174, abs=1e-4)
    assert th.assumptions(problem, batch=16).noise_variance == pytest.approx(4.0 / 16)
    assert th.assumptions(no_b).gap == pytest.approx(0.75)
    eigenvalues = torch.linalg.eigvalsh(th.hessian(problem.grad, problem.x0))
    assert torch.allclose(eigenvalues, torch.cat([torch.zeros(40), torch.ones(60)]).double())
    assert th.assumptions(ce.Counterexample(noise="none")).noise_variance == 0.0


def test_smoothness_and_lower_bound_hold_at_random_points(problem):
    g = torch.Generator().manual_seed(0)
    X, Y = (torch.randn(200, 10, 10, generator=g, dtype=torch.float64) for _ in range(2))
    ratios = torch.linalg.matrix_norm(problem.grad(X) - problem.grad(Y)) / torch.linalg.matrix_norm(X - Y)
    assert ratios.max() <= 1.0 + 1e-12
    assert (problem.f(3 * X) >= problem.f_star).all()
    minimiser = torch.zeros(10, 10, dtype=torch.float64)
    minimiser[:6, :6] = -problem.B[:6, :6]
    assert problem.f(minimiser).item() == pytest.approx(problem.f_star)
    # a Hessian that is not the identity on the top rows is seen as such
    assert th.hessian(lambda Z: 3 * problem.grad(Z), problem.x0).abs().max() == pytest.approx(3.0)


def test_noise_law_is_the_streams_law(problem):
    values, probs = th.noise_law(problem, 5)
    assert probs.sum() == pytest.approx(1.0) and (probs * values).sum() == pytest.approx(0.0)
    assert (probs * values**2).sum() == pytest.approx(1 / 5)
    stream = problem.noise_periods(torch.Generator().manual_seed(0), period=2, refresh_batch=5)
    firsts = torch.stack([next(stream)[0] for _ in range(20000)]).numpy()
    for value, p in zip(values, probs):
        assert np.mean(np.isclose(firsts, value)) == pytest.approx(p, abs=0.015)
    with pytest.raises(ValueError, match="anisotropic or exact"):
        th.noise_law(ce.Counterexample(noise="isotropic"))


def test_exact_gradient_problem():
    p = ce.Counterexample(noise="none")
    assert p.galore_plateau == pytest.approx(p.f_star) and p.noise_variance == 0.0
    assert torch.equal(next(p.noise_periods(torch.Generator(), 7)), torch.zeros(7, dtype=torch.float64))
    kw = dict(methods=("galore", "golore@100"), steps=60, lr=0.05, update_proj_gap=10, seeds=[0], log_every=1)
    fast, slow = ce.run(p, **kw), ce.run(p, engine="optimizer", **kw)
    np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ 2. non-convergence
def test_galore_refresh_is_the_noise_block_for_every_sign(problem, no_b):
    X = no_b.x0.clone()
    X[6:] = torch.randn(4, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # rows f ignores
    for point in (no_b.x0, X):
        out = th.galore_refresh(no_b, point)
        assert sorted(out.xi) == [-1.0, 1.0]
        assert (out.max_sine < 1e-12).all() and (out.proj_grad < 1e-12).all()
        assert np.allclose(out.top_singular, 0.5) and np.allclose(out.grad**2, 1.5)
    with_b = th.galore_refresh(problem, problem.x0)  # ‖∇f‖₂ = 5.04 > σ: the SVD sees the gradient
    assert (with_b.max_sine > 0.99).all() and (with_b.proj_grad > 6).all()


def test_no_b_galore_never_moves_over_a_grid():
    grid = th.no_b_grid(lrs=(1e-3, 1.0), gaps=(1, 25), steps=100, seeds=(0,))
    assert len(grid) == 3 * 2 * 2
    assert (grid.galore_max_move < 1e-12).all()
    assert np.allclose(grid.galore_min_grad_sq, 1.5)
    assert (grid.golore_max_move > 1e-3).all()  # the same runs with random subspaces do move


# ------------------------------------------------------------------ 3. Haar moments
def test_stiefel_mean_error_shrinks_like_one_over_root_n():
    study = th.stiefel_mean_study(10, 4, [2**k for k in range(3, 11)], replicates=6, seed=3)
    rms = th.rms_by_size(study)
    np.testing.assert_allclose(rms.rms, rms.predicted, rtol=0.3)
    assert -0.6 < th.loglog_slope(rms.samples, rms.rms) < -0.4
    assert rms.predicted.iloc[0] == pytest.approx(math.sqrt(4 * 0.6 / 8))


def test_stiefel_mean_check_rejects_a_biased_sampler(no_b):
    """GaLore's bases of the no-B stochastic gradient: E[PPᵀ] = diag(0, I_r), far from (r/m)I."""
    def svd_bases(dim, rank, count, seed):
        xis = next(no_b.noise_periods(torch.Generator().manual_seed(seed), period=count))
        grads = torch.stack([no_b.stochastic_grad(no_b.x0, xi) for xi in xis])
        return proj.svd_projection(grads, rank, "left")

    rms = th.rms_by_size(th.stiefel_mean_study(10, 4, [8, 64, 512], replicates=2, sampler=svd_bases))
    assert rms.rms.iloc[-1] > 20 * rms.predicted.iloc[-1]
    assert th.loglog_slope(rms.samples, rms.rms) > -0.1


def test_projected_energy_is_delta(problem):
    bases = th.golore_bases(10, 4, 3000, seed=11)
    G_random = torch.randn(10, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for G in (problem.grad(problem.x0), G_random):
        mean, se = th.projected_energy(bases, G)
        assert abs(mean - 0.4) < 4 * se
    assert bases.shape == (3000, 10, 4)
    assert torch.allclose(bases.mT @ bases, torch.eye(4, dtype=torch.float64).expand(3000, 4, 4), atol=1e-12)


def test_projected_gradient_is_unbiased_for_golore_only(no_b):
    sizes = [64, 512, 4096]
    golore = th.projected_gradient_bias(no_b, no_b.x0, "random", 4096, sizes=sizes)
    galore = th.projected_gradient_bias(no_b, no_b.x0, "svd", 4096, sizes=sizes)
    assert golore.bias.iloc[-1] < 0.12 and golore.bias.is_monotonic_decreasing
    assert (galore.bias.iloc[1:] > 0.9).all()


def test_golore_basis_ignores_the_gradient(problem):
    assert th.basis_ignores_gradient(problem, steps=5)


# ------------------------------------------------------------------ 4. perturbation bound
def test_perturbation_bound_holds_on_random_trials():
    trials = th.perturbation_trials(trials=30, seed=5)
    assert (trials.lhs >= trials.sharp_bound - 1e-12).all() and (trials.sharp_bound >= trials.bound).all()
    assert trials.constant.max() <= 1 + math.sqrt(0.4)


def test_perturbation_bound_equality_and_shape_cases():
    G = torch.cat([torch.eye(10), torch.zeros(10, 5)], 1).double()  # flat spectrum, E = 0: equality
    out = th.perturbation_bound(G, torch.zeros_like(G), 4)
    assert out["lhs"] == pytest.approx(out["bound"]) == pytest.approx(math.sqrt(0.4 * 10))
    with pytest.raises(ValueError, match="needs m <= n"):
        th.perturbation_bound(G.T, torch.zeros_like(G.T), 4)


def test_counterexample_makes_the_bound_tight(no_b):
    plain = th.counterexample_trials(no_b)
    cancelling = th.counterexample_trials(no_b, cancel=True)
    for frame in (plain, cancelling):
        assert (frame.lhs >= frame.sharp_bound).all()
    assert plain.constant.max() == pytest.approx(math.sqrt(0.6), rel=1e-4)  # c = √(1 − δ)
    assert cancelling.constant.max() == pytest.approx(1.0, rel=1e-4)  # no c < 1 can hold
    assert plain[plain.level < 0.5].lhs.min() == pytest.approx(1.0)  # below σ/2 the SVD keeps the gradient
    assert plain[plain.level > 0.5].lhs.max() < 1e-12


def test_large_batch_capture(no_b):
    capture = th.large_batch_capture(no_b, [1, 3, 9, 33, 129, 513])
    assert capture.captured.iloc[0] == 0.0  # batch 1: the theorem
    assert capture.captured.iloc[-1] == pytest.approx(2 / 3)  # the SVD keeps 4 of the 6 directions of ½
    assert (capture.captured >= capture.pointwise_bound - 1e-12).all()
    assert (capture.captured >= capture.mean_bound).all()
    assert capture.pointwise_bound.is_monotonic_increasing and capture.pointwise_bound.iloc[-1] > 0.2


# ------------------------------------------------------------------ 5. GoLore's descent and rate
@pytest.fixture(scope="module")
def descent(problem):
    return th.golore_descent_trace(problem, lr=0.05, steps=600, seed=0)


def test_golore_descent_inequality_holds_step_by_step(problem, descent):
    assert ((descent.f_next - descent.f) <= descent.pathwise_bound + 1e-12).all()
    a = th.assumptions(problem)
    # the two expectations the proof takes: E⟨∇f, Πg⟩ = δ‖∇f‖², E‖Pᵀg‖² = δ‖g‖² (martingale increments)
    assert abs(th.martingale_z(descent.inner - a.delta * descent.grad_sq)) < 4
    assert abs(th.martingale_z(descent.proj_sq - a.delta * descent.oracle_sq)) < 4
    # ... with power: the wrong ratio r/m is rejected
    assert abs(th.martingale_z(descent.proj_sq - 0.5 * descent.oracle_sq)) > 6
    assert np.allclose(descent.oracle_sq, descent.grad_sq + a.noise_variance)  # ‖g‖² = ‖∇f‖² + σ² surely here
    assert descent.grad_sq.mean() <= th.golore_rate_bound(a, 0.05, len(descent))


def test_golore_descent_trace_uses_the_optimizer(problem, descent):
    """The trace's first step equals one hand-made GoLore step with the library's basis for step 0."""
    P = proj.random_projection(problem.x0, 4, "left", proj.refresh_generator(0, 0, 0)).double()
    xi = next(problem.noise_periods(torch.Generator().manual_seed(0), period=600))[0]
    g = problem.stochastic_grad(problem.x0, xi)
    X1 = problem.x0 - 0.05 * P @ (P.T @ g)
    assert descent.f_next.iloc[0] == pytest.approx(problem.f(X1).item(), rel=1e-12)


def test_stochastic_rates(problem):
    rates = th.stochastic_rates(problem, [500, 2000, 8000], seeds=range(3))
    assert set(rates.columns) >= {"method", "steps", "seed", "avg_grad_sq", "min_grad_sq", "lr", "batch"}
    assert rates[rates.steps == 8000].batch.iloc[0] == 90
    summary = th.rate_summary(rates)
    slopes = th.rate_slopes(summary)
    assert -0.75 < slopes["golore@100"] < -0.4 and -0.75 < slopes["lb-galore"] < -0.4
    assert abs(slopes["galore"]) < 0.15
    assert summary[(summary.method == "galore") & (summary.steps == 8000)]["mean"].item() > 3.5


# ------------------------------------------------------------------ 6. deterministic GaLore
def test_deterministic_galore_facts_step_by_step(problem):
    trace = th.deterministic_trace(problem, lr=0.05, update_proj_gap=10, steps=200)
    refresh = trace[trace.refresh]
    assert (refresh.proj_sq >= 0.4 * refresh.grad_sq).all()
    assert (trace.proj_sq >= 0.5 * trace.anchor_sq - trace.drift_sq - 1e-9).all()
    assert (trace.f_next <= trace.f - 0.05 / 2 * trace.proj_sq + 1e-9).all()
    assert trace.grad_sq.iloc[-1] < 1e-3 * trace.grad_sq.iloc[0]
    # on stochastic gradients the SVD basis misses ∇f: the refresh fact fails (no-B instance)
    no_b = ce.Counterexample(linear_term=False)
    assert th.galore_refresh(no_b, no_b.x0).proj_grad.max() ** 2 < 0.4 * 1.5


def test_deterministic_rate_is_one_over_t():
    exact = ce.Counterexample(noise="none")
    rate = th.deterministic_rate(exact, lr=0.05, update_proj_gap=10, steps=2000)
    assert (rate.avg_grad_sq <= rate.bound).all()
    late = rate[rate.steps >= 256]
    assert th.loglog_slope(late.steps, late.avg_grad_sq) == pytest.approx(-1.0, abs=0.02)
    with pytest.raises(ValueError, match="exact gradients"):
        th.deterministic_rate(ce.Counterexample(), lr=0.05, update_proj_gap=10, steps=100)
    with pytest.raises(ValueError, match=r"L·lr·update_proj_gap <= 1/2, got 1"):
        th.deterministic_bound(th.assumptions(exact), 0.1, 10, [1])
    with pytest.raises(ValueError, match="multiple of update_proj_gap"):
        th.deterministic_rate(exact, lr=0.05, update_proj_gap=10, steps=95)
