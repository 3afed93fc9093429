"""The counterexample: construction, closed forms, the two engines, and the paper's numbers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from golore_lab import counterexample as ce
from golore_lab.counterexample import Counterexample, run


@pytest.fixture(scope="module")
def problem():
    return Counterexample()


# ------------------------------------------------------------------ construction and closed forms
def test_paper_numbers(problem):
    assert problem.f(problem.x0).item() == pytest.approx(0.8107, abs=5e-5)
    assert problem.f_star == pytest.approx(-23.2174, abs=5e-5)
    assert problem.galore_plateau == pytest.approx(-20.776, abs=5e-4)
    s = problem.m0_singular_values
    np.testing.assert_allclose(s.numpy(), [5.045, 3.947, 1.976, 1.496, 0.894, 0.288], atol=5e-4)


def test_construction_matches_the_authors_global_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    p = Counterexample()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(42)
    D = torch.randn(6, 6)
    tail = torch.randn(4, 10)
    torch.random.set_rng_state(state)
    assert torch.equal(p.B[:6, :6], D.double()) and torch.equal(p.x0[6:], tail.double())
    assert torch.equal(p.x0[:6], torch.cat([0.5 * torch.eye(6), torch.zeros(6, 4)], 1).double())


def test_gradient_is_autograd_of_f(problem):
    X = torch.randn(3, 10, 10, dtype=torch.float64, requires_grad=True)
    problem.f(X).sum().backward()
    torch.testing.assert_close(problem.grad(X.detach()), X.grad)
    assert problem.f(problem.x0 * 0 - torch.cat([problem.B[:6], torch.zeros(4, 10, dtype=torch.float64)])) == \
        pytest.approx(problem.f_star)


def test_f_equals_half_norm_of_m_minus_half_norm_of_d(problem):
    """The identity behind the closed forms, while the top-right block is zero."""
    X = problem.x0.clone()
    X[:6, :6] += torch.randn(6, 6, dtype=torch.float64)
    M = X[:6, :6] + problem.B[:6, :6]
    assert problem.f(X).item() == pytest.approx(0.5 * M.square().sum().item() + problem.f_star)


def test_no_b_instance(problem):
    p = Counterexample(linear_term=False)
    assert p.f_star == 0 and p.galore_plateau == pytest.approx(0.75) and p.f(p.x0).item() == pytest.approx(0.75)
    assert torch.equal(p.x0, problem.x0)


def test_noise_models_have_the_same_total_variance(problem):
    iso = Counterexample(noise="isotropic")
    g = torch.Generator().manual_seed(0)
    blocks = torch.stack([next(iso.noise_periods(g, 100)) for _ in range(40)])[:, 1:]  # (40, 99, n, n)
    total = blocks.square().sum((-2, -1)).mean().item()
    assert total == pytest.approx(iso.noise_variance, rel=0.03)
    aniso = next(problem.noise_periods(torch.Generator().manual_seed(0), 100, refresh_batch=100))
    assert set(aniso[1:].tolist()) <= {-1.0, 1.0}
    assert problem.noise_matrix(aniso[1]).square().sum().item() == pytest.approx(problem.noise_variance)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_noise_sigma_defaults_to_sigma(sigma):
    """Without ``noise_sigma`` the problem is the σ-scaled one: same D, X₀, oracle, plateau as noise_sigma = σ."""
    a, b = Counterexample(sigma=sigma), Counterexample(sigma=sigma, noise_sigma=sigma)
    assert a.noise_sigma == sigma
    assert torch.equal(a.D, b.D) and torch.equal(a.x0, b.x0)
    assert (a.galore_plateau, a.noise_variance, a.noise_scale) == (b.galore_plateau, b.noise_variance, b.noise_scale)
    xi = torch.tensor(-1.0, dtype=torch.float64)
    assert torch.equal(a.noise_matrix(xi), -sigma * a.C)
    # with the default, the whole problem scales with σ: (plateau − f*)/f* does not move
    base = Counterexample()
    assert (a.galore_plateau - a.f_star) / a.f_star == pytest.approx((base.galore_plateau - base.f_star) / base.f_star)


@pytest.mark.parametrize("level", [0.0, 0.5, 2.0])
def test_noise_sigma_moves_the_plateau_and_leaves_the_problem(problem, level):
    """D and X₀ stay those of σ = 1; the oracle's noise, its variance and GaLore's plateau follow noise_sigma.

    The plateau is f* + ½Σmin(sᵢ(M₀), ν)² (ν = noise_sigma), and a plain-SGD GaLore run ends in its bracket:
    each value above ν is shrunk by q = (1 − η)^τ per refresh until it is ≤ ν, so it ends in (qν, ν]; the run
    is long enough for Σᵢkᵢ refreshes, kᵢ = ⌈log(sᵢ/ν)/log(1/q)⌉, which surely finishes (every refresh of a
    one-sample oracle has threshold ν). ν = 0: the SVD sees M alone and GaLore goes to f*.
    """
    p = Counterexample(noise_sigma=level)
    assert torch.equal(p.D, problem.D) and torch.equal(p.x0, problem.x0) and p.f_star == problem.f_star
    assert p.noise_variance == pytest.approx(level**2 * p.r)
    assert torch.equal(p.noise_matrix(torch.tensor(1.0, dtype=torch.float64)), level * p.C)
    s = p.m0_singular_values.numpy()
    plateau = p.f_star + 0.5 * float(np.sum(np.minimum(s, level) ** 2))
    assert p.galore_plateau == pytest.approx(plateau, abs=1e-12)
    assert p.galore_plateau != pytest.approx(problem.galore_plateau, abs=0.1)
    eta, gap = 1e-2, 10
    q = (1 - eta) ** gap
    if level > 0:
        refreshes = int(np.maximum(0, np.ceil(np.log(s / level) / -np.log(q))).sum())
    else:  # every refresh keeps the top r values of M: they reach 1e-6, then the next ones do
        refreshes = int(np.ceil(np.log(s / 1e-6) / -np.log(q)).sum())
    frame = run(p, methods=["galore"], optimizer="sgd", steps=refreshes * gap, lr=eta, update_proj_gap=gap,
                seeds=[0, 1], log_every=gap * refreshes)
    end = frame[frame.step == refreshes * gap].loss.to_numpy()
    if level > 0:
        low = p.f_star + 0.5 * float(np.sum(np.minimum(s, q * level) ** 2))
        assert (end >= low - 1e-9).all() and (end <= p.galore_plateau + 1e-9).all()
    else:
        assert (end - p.f_star <= 0.5 * (p.n - p.r) * 1e-12).all()


def test_noise_stream_is_seeded(problem):
    a = [next(s) for s in [problem.noise_periods(torch.Generator().manual_seed(3), 50)] for _ in range(5)]
    b = [next(s) for s in [problem.noise_periods(torch.Generator().manual_seed(3), 50)] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs,message", [
    (dict(r=10), r"Invalid r: 10 \(must be an integer with 1 <= r < n = 10\)"),
    (dict(r=0), r"Invalid r: 0"),
    (dict(r=2.0), r"Invalid r: 2.0"),
    (dict(sigma=-1.0), r"Invalid sigma: -1.0"),
    (dict(sigma=float("nan")), r"Invalid sigma: nan"),
    (dict(n=1), r"Invalid n: 1"),
    (dict(noise="gauss"), r"Invalid noise: 'gauss'"),
    (dict(seed=1.5), r"Invalid seed: 1.5"),
    (dict(noise_sigma=-0.5), r"Invalid noise_sigma: -0.5"),
    (dict(noise_sigma=True), r"Invalid noise_sigma: True"),
])
def test_bad_problem_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Counterexample(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(methods=["sgd"]), r"Invalid method: 'sgd'"),
    (dict(methods=["golore@150"]), r"Invalid method: 'golore@150'"),
    (dict(methods=["golore@x"]), r"Invalid method: 'golore@x'"),
    (dict(optimizer="adam"), r"Invalid optimizer: 'adam'"),
    (dict(steps=0), r"Invalid steps: 0"),
    (dict(log_every=7), r"Invalid log_every: 7 \(must divide steps = 200\)"),
    (dict(lr=-1.0), r"Invalid lr: -1.0"),
    (dict(seeds=[1, 1]), r"Invalid seeds: \[1, 1\] \(must be distinct\)"),
    (dict(batch=0), r"Invalid batch: 0"),
    (dict(engine="gpu"), r"Invalid engine: 'gpu'"),
    (dict(momentum=-0.1), r"Invalid momentum value: -0.1"),
    (dict(optimizer="adamw", betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1.0"),
    (dict(state_on_refresh="drop"), r"Invalid state_on_refresh: 'drop'"),
])
def test_bad_run_input(problem, kwargs, message):
    args = dict(methods=["galore"], steps=200, seeds=[0]) | kwargs
    with pytest.raises(ValueError, match=message):
        run(problem, **args)


def test_golore_switch_step_rounding():
    assert ce.run_method("golore@75", 200_000).switch_step == 50_000
    assert ce.run_method("golore@20", 999).switch_step == 799
    assert ce.run_method("golore@100", 10).switch_step == 0
    assert ce.run_method("lb-galore", 10, batch=7).refresh_batch == 7 and ce.run_method("galore", 10).switch_step is None


def test_bare_golore_is_refused_naming_the_new_spelling(problem):
    with pytest.raises(ValueError, match=r"'golore' is ambiguous; write 'golore@100' for pure GoLore"):
        run(problem, methods=["golore"], steps=100, seeds=[0])


# ------------------------------------------------------------------ one algorithm, two speeds
ENGINE_CASES = [
    ("sgd", {}, "anisotropic"),
    ("sgd", dict(momentum=0.9, dampening=0.1), "anisotropic"),
    ("sgd", dict(weight_decay=0.05), "isotropic"),
    ("adamw", {}, "anisotropic"),
    ("adamw", dict(weight_decay=0.1, state_on_refresh="reset"), "anisotropic"),
    ("adamw", dict(state_on_refresh="keep"), "isotropic"),
]


@pytest.mark.parametrize("optimizer,extra,noise", ENGINE_CASES)
def test_fast_engine_matches_the_library_optimizer_step_by_step(optimizer, extra, noise):
    """1000 steps, 10 refreshes, GoLore switching at step 500, L.B. GaLore, every step logged."""
    p = Counterexample(noise=noise)
    kw = dict(methods=("full", "galore", "lb-galore", "golore@50"), optimizer=optimizer, steps=1000,
              lr=3e-3, update_proj_gap=100, seeds=[0, 7], batch=20, log_every=1, **extra)
    fast = run(p, engine="fast", **kw)
    slow = run(p, engine="optimizer", **kw)
    assert len(fast) == 4 * 2 * 1001
    pd.testing.assert_frame_equal(fast[["method", "optimizer", "seed", "step"]],
                                  slow[["method", "optimizer", "seed", "step"]])
    for column in ce.LOGGED:  # loss, grad_norm_sq, captured, top_sv
        np.testing.assert_allclose(fast[column], slow[column], rtol=0, atol=1e-9, equal_nan=True, err_msg=column)
    # the runs are not trivially equal: the methods part ways
    last = fast[fast.step == 1000].groupby("method").loss.mean()
    assert last.max() - last.min() > 0.05


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_steps_need_not_be_a_multiple_of_the_refresh_period(problem, optimizer):
    kw = dict(methods=("galore", "golore@50"), optimizer=optimizer, steps=250, lr=3e-3, update_proj_gap=100,
              seeds=[0], log_every=1)
    fast, slow = run(problem, **kw), run(problem, engine="optimizer", **kw)
    assert fast.step.max() == 250 and not fast.loss.isna().any()
    np.testing.assert_allclose(fast.loss, slow.loss, atol=1e-9)


def test_closed_form_sgd_period_matches_the_step_loop(problem):
    """Plain SGD with logs at period ends uses the closed form; every-step logging uses the loop."""
    kw = dict(methods=("full", "galore", "golore@50", "lb-galore"), steps=2000, lr=1e-3, seeds=[0, 1])
    a = run(problem, log_every=100, **kw)
    b = run(problem, log_every=1, **kw)
    b = b[b.step % 100 == 0].reset_index(drop=True)
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-10)


# ------------------------------------------------------------------ the paper's numbers
def _table(frame, steps):
    return frame[frame.step.isin(steps)].groupby(["method", "step"]).loss.agg(["mean", "std"])


SGD_TABLE = {  # the paper's Figure 1, MSGD panel: logged point x (one per 100 steps) -> value
    "full": {100: -10.03, 500: -22.02, 1000: -23.16, 2000: -23.217},
    "galore": {100: -9.83, 500: -20.65, 1000: -20.78, 2000: -20.784},
    "lb-galore": {100: -9.83, 500: -21.77, 1000: -23.08, 2000: -23.208},
    "golore@75": {100: -9.83, 500: -20.65, 1000: -22.44, 2000: -23.146},
}


@pytest.fixture(scope="module")
def sgd_panel():
    return run(Counterexample(), seeds=range(10), **ce.PAPER["sgd"])


def perturbed(eps: float, seed: int) -> Counterexample:
    """The paper's problem with D (and so B) moved by ``eps`` times a standard normal matrix."""
    p = Counterexample()
    p.D = p.D + eps * torch.randn(p.D.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p.B[: p.n - p.r, : p.n - p.r] = p.D
    return p


def galore_end(problem: Counterexample, optimizer: str) -> float:
    """GaLore's exact loss at the end of the paper's panel, noise seed 0."""
    frame = run(problem, seeds=[0], **{**ce.PAPER[optimizer], "methods": ("galore",)})
    return float(frame.loss.iloc[-1])


def test_sgd_panel_reproduces_the_paper(problem, sgd_panel):
    """Full length (200 000 steps), 10 seeds. Agreement with the table: within its rounding + 3 std over seeds.

    The rounding window is enough on every machine because no entry is sensitive to the last bits: a 1e-12
    change of D moves GaLore's end value by < 1e-6 (checked below; it moves the others by as little), the
    runs being contractions of M (see test_sgd_galore_end_lies_in_its_closed_form_bracket)."""
    stats = _table(sgd_panel, [x * 100 for x in (100, 500, 1000, 2000)])
    for method, row in SGD_TABLE.items():
        for x, value in row.items():
            mean, std = stats.loc[(method, x * 100)]
            digits = len(str(value).split(".")[1])
            assert abs(mean - value) <= 0.5 * 10**-digits + 3 * np.nan_to_num(std) + 1e-9, (method, x, mean)
    end = sgd_panel[sgd_panel.step == 200_000].groupby("method")
    assert end.grad_norm_sq.min()["galore"] > 4.0  # not stationary (4.88 at the closed-form plateau)
    assert abs(end.loss.mean()["full"] - problem.f_star) < 0.01
    base = galore_end(problem, "sgd")
    assert max(abs(galore_end(perturbed(1e-12, k), "sgd") - base) for k in range(2)) < 1e-6


def test_sgd_galore_end_lies_in_its_closed_form_bracket(problem, sgd_panel):
    """While the top-right block of X is zero, f = f* + ½Σsᵢ(M)², and GaLore's refresh keeps exactly the
    directions of M whose singular values exceed σ (the noise fills the other slots). Plain SGD multiplies a
    kept singular value by (1 − η) each step, so one that is kept ends in (σ(1 − η)^τ, σ] and the others never
    move: the end loss lies in [plateau − ½kσ²(1 − (1 − η)^{2τ}), plateau] with k = #{sᵢ(M₀) > σ}."""
    eta, tau = ce.PAPER["sgd"]["lr"], ce.PAPER["sgd"]["update_proj_gap"]
    k = int((problem.m0_singular_values > problem.sigma).sum())
    low = problem.galore_plateau - 0.5 * k * problem.sigma**2 * (1 - (1 - eta) ** (2 * tau))
    end = sgd_panel[(sgd_panel.step == 200_000) & (sgd_panel.method == "galore")].loss
    assert k == 4 and (end >= low - 1e-9).all() and (end <= problem.galore_plateau + 1e-9).all()


AUTHORS_ADAMW_TABLE = {  # the paper's Figure 1, AdamW panel (the authors' script)
    "full": {100: -7.51, 500: -21.43, 1000: -23.217},
    "galore": {100: -5.83, 500: -18.39, 1000: -20.83},
    "lb-galore": {100: -5.84, 500: -19.77, 1000: -23.03},
    "golore@50": {100: -5.82, 500: -18.39, 1000: -23.09},
}


@pytest.fixture(scope="module")
def adamw_panel():
    return run(Counterexample(), seeds=range(5), **ce.PAPER["adamw"])


def test_adamw_panel_paper_algorithm(problem, adamw_panel):
    """The paper's algorithm (wd 0, momentum projection), 100 000 steps: GaLore stalls a little below the
    closed-form plateau (Adam's normalised steps keep shrinking a selected singular value for the rest of its
    refresh period after it has crossed σ), full training and GoLore@50% reach f*.

    GaLore's end value is not a smooth function of the input: Adam's normalised steps decide, step by step,
    how far past σ each singular value goes, and a 1e-12 change of D moves the end value by up to ~1e-2
    (measured: eight perturbations spread over [−20.828, −20.811], one machine gives −20.8197, another
    −20.8257). So its comparison with the authors' −20.83 allows the rounding of that number plus twice the
    spread measured here under three such perturbations. L.B. GaLore is stable (perturbations move it by
    < 1e-4, the seeds by < 1e-5): rounding + 3 std over seeds + 1e-4."""
    end = adamw_panel[adamw_panel.step == 100_000].groupby("method")
    galore = end.loss.mean()["galore"]
    assert problem.galore_plateau - 0.1 < galore < problem.galore_plateau
    assert end.grad_norm_sq.min()["galore"] > 4.0
    assert abs(end.loss.mean()["full"] - problem.f_star) < 0.01
    assert abs(end.loss.max()["golore@50"] - problem.f_star) < 0.02
    stats = _table(adamw_panel, [100_000])
    values = [galore] + [galore_end(perturbed(1e-12, k), "adamw") for k in range(3)]
    spread = max(values) - min(values)
    assert spread < 0.05  # sensitive, but an order of magnitude inside the closed-form bracket's 0.1
    assert abs(galore - -20.83) <= 0.005 + 2 * spread
    lb = stats.loc[("lb-galore", 100_000)]
    assert abs(lb["mean"] - -23.03) <= 0.005 + 3 * lb["std"] + 1e-4


def test_adamw_panel_authors_configuration_reproduces_their_table(problem):
    """The authors' traces come from torch.optim.AdamW's default weight decay 0.01 and no stored momentum
    projection, i.e. ``weight_decay=0.01, state_on_refresh="keep"``. With those, every entry of their table is
    matched within 0.05 (their L.B. GaLore also divides every step's noise by B, which golore_lab does not;
    that is the largest residual, 0.046 at point 500), plus 3 standard errors of the mean over the 3 seeds
    (up to 0.02 for GaLore at point 1000, whose end value also moves by ~0.01 under a 1e-12 change of D)."""
    frame = run(Counterexample(), seeds=range(3), weight_decay=0.01, state_on_refresh="keep", **ce.PAPER["adamw"])
    stats = _table(frame, [x * 100 for x in (100, 500, 1000)])
    for method, row in AUTHORS_ADAMW_TABLE.items():
        for x, value in row.items():
            mean, std = stats.loc[(method, x * 100)]
            assert abs(mean - value) <= 0.05 + 3 * std / np.sqrt(3), (method, x, mean)
    golore = stats.loc[("golore@50", 100_000), "mean"]
    # without the momentum projection GoLore is still clearly short of f* at the end (-23.09 here), where the
    # paper's algorithm is within 0.02 of it (test_adamw_panel_paper_algorithm)
    assert golore - problem.f_star > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_five_times_longer(problem, optimizer):
    config = dict(ce.PAPER[optimizer])
    config["steps"] *= 5
    config["methods"] = ("galore", "lb-galore", config["methods"][-1])
    frame = run(problem, seeds=range(3), **config)
    end = frame[frame.step == config["steps"]].groupby("method").loss
    assert abs(end.max()["lb-galore"] - problem.f_star) < 0.02
    assert abs(end.max()[config["methods"][-1]] - problem.f_star) < 0.02
    galore = frame[frame.method == "galore"]
    moved = galore[galore.step >= ce.PAPER[optimizer]["steps"]].groupby("seed").loss.agg(lambda x: x.max() - x.min())
    assert moved.max() < 1e-3


# ------------------------------------------------------------------ the non-convergence theorem
@pytest.mark.parametrize("optimizer,extra", [("sgd", {}), ("sgd", dict(momentum=0.9)), ("adamw", {})])
@pytest.mark.parametrize("lr,gap", [(3e-5, 100), (1e-2, 10), (0.3, 1)])
def test_no_b_galore_never_moves(optimizer, extra, lr, gap):
    p = Counterexample(linear_term=False)
    frame = run(p, methods=("galore", "golore@100", "lb-galore", "full"), optimizer=optimizer, steps=3000, lr=lr,
                update_proj_gap=gap, seeds=[0, 1], log_every=1, **extra)
    galore = frame[frame.method == "galore"]
    assert (galore.loss - 0.75).abs().max() < 1e-9
    assert galore.grad_norm_sq.min() == pytest.approx(1.5)


def test_the_stall_needs_the_two_point_noise(problem):
    """GaLore-SGD (η 1e-2, τ 10): two-point ±1 stalls at the law's exact limit; N(0, 1) in the same rows does not.

    Same rows, same covariance: only the law of |ξ| differs. With |ξ| ≡ 1 no refresh ever sees a singular value
    of M below σ; with ξ ~ N(0, 1), |ξ| < s has probability > 0 for every s > 0, so every value keeps
    shrinking (measured f − f*: ≈ 1e-3 at step 10⁴, ≈ 1e-5 at 10⁵, over seeds 0–2).
    """
    from golore_lab import theory as th

    kw = dict(methods=("galore",), optimizer="sgd", steps=100_000, lr=1e-2, update_proj_gap=10, seeds=[0, 1, 2],
              log_every=10_000)
    two_point = run(problem, **kw)
    gaussian_problem = Counterexample(noise="gaussian")
    gaussian = run(gaussian_problem, **kw)
    limit = th.lb_galore_limit(problem, 1, 1e-2, 10)
    assert round(limit - problem.f_star, 4) == 2.2135
    assert (two_point[two_point.step >= 10_000].loss - limit).abs().max() < 1e-9
    gap = gaussian.assign(gap=gaussian.loss - problem.f_star).pivot(index="step", columns="seed", values="gap")
    assert (gap.loc[10_000] < 0.01).all() and (gap.loc[100_000] < 1e-4).all()
    assert (gap.diff().iloc[1:] <= 1e-12).all().all()  # the loss only decreases
    assert gaussian_problem.galore_plateau == pytest.approx(problem.f_star)
    assert th.lb_galore_plateau(gaussian_problem, 1) == pytest.approx(problem.f_star)  # the law: θ = 0


@pytest.mark.parametrize("length", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_no_b_others_converge(length):
    """GoLore, L.B. GaLore and full training head to f* = 0 on the "no B" instance while GaLore stays at 0.75.

    At the paper's length plain SGD's GoLore is at ~0.006 (it needs m/r times the iterations of full SGD:
    0.75 e^{-2ηT r/m} ≈ 0.006), so the bound is 0.01 there. In runs 5× longer the bound is 1e-3 (measured: GoLore
    ~1e-5, the order of its constant-step noise term; L.B. GaLore ~1.6e-4).
    """
    p = Counterexample(linear_term=False)
    for optimizer in ("sgd", "adamw"):
        config = {**ce.PAPER[optimizer], "methods": ("golore@100", "lb-galore", "full")}
        config["steps"] *= length
        frame = run(p, seeds=[0, 1], **config)
        end = frame[frame.step == config["steps"]]
        assert end.loss.max() < (0.01 if length == 1 else 1e-3), end
