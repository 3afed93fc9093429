"""The optimizers: exact equivalences, the float64 reference, state, resume, peers and every error message."""
from __future__ import annotations

import copy
import io
import itertools

import numpy as np
import pytest
import torch

from golore_lab import SubspaceAdamW, SubspaceSGD, microbatches
from golore_lab.projection import random_stiefel, refresh_generator, svd_projection

from reference import reference_run

torch.set_default_dtype(torch.float32)


def identity_projection(grad, rank, side, generator):
    """A user projector: the first ``rank`` coordinate axes (P = I when rank is full)."""
    dim = grad.shape[0] if side == "left" else grad.shape[1]
    return torch.eye(dim, dtype=torch.float64)[:, :rank]


def make_problem(m=6, n=9, seed=0, dtype=torch.float64):
    """A noisy least-squares gradient oracle G(t, W) = A (W − W*) + noise_t, identical for torch and numpy."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, m, generator=g, dtype=dtype) / m**0.5
    A = A @ A.T + 0.1 * torch.eye(m, dtype=dtype)
    target = torch.randn(m, n, generator=g, dtype=dtype)
    noise = 0.3 * torch.randn(400, m, n, generator=g, dtype=dtype)
    w0 = torch.randn(m, n, generator=g, dtype=dtype)

    def grad(t, W):
        W = torch.as_tensor(W, dtype=dtype)
        return A @ (W - target) + noise[t]

    return w0, grad


def run_torch(opt_cls, w0, grad_fn, steps, group_kw=None, **kw):
    W = torch.nn.Parameter(w0.clone())
    group = {"params": [W], **(group_kw or {})}
    opt = opt_cls([group], **kw)
    history = [W.detach().clone()]
    for t in range(steps):
        W.grad = grad_fn(t, W.detach()).to(W.dtype)
        opt.step()
        history.append(W.detach().clone())
    return history, opt


# ------------------------------------------------------------------ full rank == torch.optim
@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_full_rank_identity_matches_torch_adamw(proj_type):
    w0, grad = make_problem(dtype=torch.float32)
    full = min(w0.shape)
    ours, _ = run_torch(SubspaceAdamW, w0, grad, 120, {"rank": full, "proj_type": proj_type},
                        lr=1e-2, weight_decay=0.1, projection=identity_projection, update_proj_gap=7)
    if proj_type == "right":  # the right side has n > rank = m axes: compare on a square problem instead
        w0, grad = make_problem(m=7, n=7, dtype=torch.float32)
        ours, _ = run_torch(SubspaceAdamW, w0, grad, 120, {"rank": 7, "proj_type": proj_type},
                            lr=1e-2, weight_decay=0.1, projection=identity_projection, update_proj_gap=7)
    theirs, _ = run_torch(torch.optim.AdamW, w0, grad, 120, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=1e-5, atol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-5


def test_full_space_group_is_torch_adamw_exactly():
    w0, grad = make_problem(dtype=torch.float32)
    ours, _ = run_torch(SubspaceAdamW, w0, grad, 100, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    theirs, _ = run_torch(torch.optim.AdamW, w0, grad, 100, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=1e-6, atol=1e-6)


FULL_SHAPES = [(40, 24), (24,), (7, 3, 5), (1,)]
SKIP = (3, 1)  # (step, parameter) without a gradient


def full_space_steps(opt, params, matrix, steps):
    """Step ``opt`` at the given step indices on gradients that are a pure function of (step, parameter, value);
    parameter ``SKIP[1]`` has no gradient at step ``SKIP[0]``, so its step count falls behind the others' (one
    bucket, two bias corrections). Returns the parameters after every step."""
    history = []
    for t in steps:
        for i, p in enumerate(params + [matrix]):
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * t + i))
            p.grad = None if (t, i) == SKIP else (noise + p.detach().float()).to(p.dtype)
        opt.step()
        history.append([p.detach().clone() for p in params])
    return history


def train_full_space(make_opt, dtype, steps=12):
    """The parameters of FULL_SHAPES and a 6 × 9 matrix (a subspace optimizer puts it in a rank-2 group) trained
    ``steps`` steps: (history, optimizer, parameters, matrix)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in FULL_SHAPES]
    matrix = torch.nn.Parameter(torch.randn(6, 9, generator=g).to(dtype))
    opt = make_opt(params, matrix)
    return full_space_steps(opt, params, matrix, range(steps)), opt, params, matrix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_full_space_parameters_are_torch_adamw_fused_and_foreach(dtype, tensor_lr):
    """Full-space parameters go through torch's fused AdamW kernel: bit for bit what ``torch.optim.AdamW(fused=True)``
    computes (same kernel, same inputs, including the bias correction of a parameter whose count fell behind), and
    as close to ``AdamW(foreach=True)`` as torch's own two paths are to each other (×2: the two differ only in
    rounding, which a wrong rule -- an off-by-one count, a coupled decay -- exceeds by orders of magnitude)."""
    hyper = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    lr = 0.05

    def lr_value():
        return torch.tensor(lr) if tensor_lr else lr

    def torch_adamw(**mode):  # torch's foreach path takes a tensor lr only with capturable=True: a float there
        return lambda params, _: torch.optim.AdamW(params, lr=lr_value() if "fused" in mode else lr, **hyper, **mode)

    def ours(params, matrix):
        return SubspaceAdamW([{"params": [matrix], "rank": 2, "update_proj_gap": 5}, {"params": params}],
                             lr=lr_value(), **hyper)

    mine, opt, params, _ = train_full_space(ours, dtype)
    fused, fused_opt, fused_params, _ = train_full_space(torch_adamw(fused=True), dtype)
    foreach, *_ = train_full_space(torch_adamw(foreach=True), dtype)
    for step, (a, b, c) in enumerate(zip(mine, fused, foreach)):
        for i, (x, y, z) in enumerate(zip(a, b, c)):
            assert torch.equal(x, y), (step, i)
            spread = (y.double() - z.double()).abs().max().item()
            assert (x.double() - z.double()).abs().max().item() <= 2 * spread, (step, i)
    assert max((y.double() - z.double()).abs().max().item() for y, z in zip(fused[-1], foreach[-1])) > 0
    for p, q in zip(params, fused_params):
        state, theirs = opt.state[p], fused_opt.state[q]
        assert isinstance(state["step"], int) and state["step"] == int(theirs["step"])
        assert all(torch.equal(state[key], theirs[key]) for key in ("exp_avg", "exp_avg_sq"))
    assert opt.state[params[1]]["step"] == 11  # no gradient at step 3: one step behind the others


@pytest.mark.parametrize("transposed", ["parameter", "gradient"])
def test_full_space_parameter_the_fused_kernel_cannot_take_is_still_adamw(transposed):
    """A transposed (non-contiguous) parameter or gradient: torch's CPU fused kernel walks memory in order and would
    pair the wrong elements, so such a parameter takes the per-tensor rule (a transposed gradient: with element-wise
    kernels throughout), which equals ``AdamW(foreach=True)`` on the contiguous copy of the same problem up to
    rounding: a few float32 ulps of |W| + lr per step (8 ε per step below; an off-by-one bias correction or a
    coupled decay moves W by a percent of lr per step)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(9, 5, generator=g)
    grads = [torch.randn(9, 5, generator=g) for _ in range(10)]

    def run(opt_cls, contiguous, **kw):
        w = torch.nn.Parameter(start.T.contiguous() if contiguous or transposed != "parameter" else start.clone().T)
        opt = opt_cls([w], lr=lr, weight_decay=0.1, **kw)
        for grad in grads:
            w.grad = grad.T.contiguous() if contiguous or transposed != "gradient" else grad.clone().T
            opt.step()
        assert contiguous or not (w.is_contiguous() and w.grad.is_contiguous())
        return w.detach()

    lr, eps = 0.05, torch.finfo(torch.float32).eps
    tolerance = len(grads) * 8 * eps * (lr + start.abs().max().item())
    assert (run(SubspaceAdamW, False) - run(torch.optim.AdamW, True, foreach=True)).abs().max().item() <= tolerance


def test_full_space_resume_is_bit_identical():
    """The fused full-space path through save, ``torch.load(weights_only=True)`` and load: ``step`` stays an int
    and the resumed run equals the straight one bit for bit."""
    def ours(params, matrix):
        return SubspaceAdamW([{"params": [matrix], "rank": 2, "update_proj_gap": 5}, {"params": params}],
                             lr=0.05, weight_decay=0.1)

    straight, *_ = train_full_space(ours, torch.float32, steps=12)
    _, opt, params, matrix = train_full_space(ours, torch.float32, steps=6)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert all(isinstance(s["step"], int) for s in saved["state"].values())
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    matrix2 = torch.nn.Parameter(matrix.detach().clone())
    opt2 = ours(params2, matrix2)
    opt2.load_state_dict(saved)
    resumed = full_space_steps(opt2, params2, matrix2, range(6, 12))
    assert all(torch.equal(a, b) for a, b in zip(straight[-1], resumed[-1]))


@pytest.mark.parametrize("proj_type", ["left", "right"])
@pytest.mark.parametrize("sgd", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.9), dict(momentum=0.5, nesterov=True),
                                 dict(momentum=0.0)])
def test_full_rank_svd_matches_torch_sgd(proj_type, sgd):
    """SGD is linear: any full-rank orthogonal basis with momentum projection is plain SGD."""
    w0, grad = make_problem(m=7, n=7)
    ours, _ = run_torch(SubspaceSGD, w0, grad, 150, {"rank": 7, "proj_type": proj_type}, lr=0.05,
                        weight_decay=0.01, update_proj_gap=10, **sgd)
    theirs, _ = run_torch(torch.optim.SGD, w0, grad, 150, lr=0.05, weight_decay=0.01, **sgd)
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ the float64 reference
CASES = list(itertools.product(["adamw", "sgd"], ["left", "right", "std"], ["project", "keep", "reset"]))


@pytest.mark.parametrize("rule,proj_type,mode", CASES)
def test_matches_float64_reference(rule, proj_type, mode):
    """120 steps, a refresh every 10, GaLore (SVD) until step 60 then GoLore (random): step by step."""
    w0, grad = make_problem()
    kw = dict(rank=2, update_proj_gap=10, proj_type=proj_type, switch_step=60, state_on_refresh=mode, seed=3,
              scale=0.5, lr=0.02)
    if rule == "adamw":
        hyper = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
        ours, _ = run_torch(SubspaceAdamW, w0, grad, 120, **kw, **hyper)
    else:
        hyper = dict(momentum=0.9, dampening=0.1, weight_decay=0.05)
        ours, _ = run_torch(SubspaceSGD, w0, grad, 120, **kw, **hyper)
    ref = reference_run(w0.numpy(), grad, 120, rule=rule, **kw, **hyper)
    for t, (a, b) in enumerate(zip(ours, ref)):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-9, atol=1e-9, err_msg=f"step {t}")


def test_reference_sees_the_switch():
    """Sanity of the reference itself: GaLore and GoLore@50% part ways at the switch step, not before."""
    w0, grad = make_problem()
    common = dict(rule="sgd", rank=2, update_proj_gap=10, lr=0.02)
    galore = reference_run(w0.numpy(), grad, 80, **common)
    golore = reference_run(w0.numpy(), grad, 80, switch_step=40, **common)
    assert np.array_equal(galore[40], golore[40]) and not np.allclose(galore[41], golore[41])


# ------------------------------------------------------------------ random projections
def test_random_stiefel_is_orthonormal_and_seeded():
    P = random_stiefel(50, 7, torch.Generator().manual_seed(1), torch.float64)
    torch.testing.assert_close(P.T @ P, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    Q = random_stiefel(50, 7, torch.Generator().manual_seed(1), torch.float64)
    assert torch.equal(P, Q)
    assert not torch.equal(P, random_stiefel(50, 7, torch.Generator().manual_seed(2), torch.float64))


def haar_deviations(sampler, m=8, r=3, n=10000, seed=0):
    """Monte Carlo means of P and PPᵀ over ``n`` draws, in units of their standard errors under the Haar law.

    For P uniform on St(m, r): E[P] = 0 with Var P_ij = 1/m (each column is uniform on the sphere), and
    E[PPᵀ] = (r/m) I, where (PPᵀ)_ii ~ Beta(r/2, (m − r)/2) has variance 2r(m − r)/(m²(m + 2)) and, since
    PPᵀ is idempotent (Σ_j (PPᵀ)_ij² = (PPᵀ)_ii), an off-diagonal entry has variance r(m − r)/(m(m − 1)(m + 2)).
    Returns the largest |mean − expectation| / standard error of each, over all entries.
    """
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(m, r, dtype=torch.float64)
    second = torch.zeros(m, m, dtype=torch.float64)
    for _ in range(n):
        P = sampler(m, r, g)
        first += P
        second += P @ P.T
    first, second = first / n, second / n
    var_diag = 2 * r * (m - r) / (m**2 * (m + 2))
    var_off = r * (m - r) / (m * (m - 1) * (m + 2))
    var = torch.full((m, m), var_off, dtype=torch.float64).fill_diagonal_(var_diag)
    z_second = (second - r / m * torch.eye(m, dtype=torch.float64)).abs() / (var / n).sqrt()
    z_first = first.abs() / (1 / (m * n)) ** 0.5
    return float(z_first.max()), float(z_second.max())


def test_random_stiefel_is_haar():
    """E[P] = 0 and E[PPᵀ] = (r/m) I within 5 Monte Carlo standard errors (24 and 64 entries: a false alarm
    has probability < 1e-4). Two biased samplers fail the same check with fewer draws: QR without the sign fix
    (diag(R) > 0 is what makes QR unique, and Q then Haar; LAPACK's Householder QR puts E[P_ii] near −0.28),
    and Gaussian entries replaced by uniform ones (a subspace biased towards the all-ones direction)."""
    z_first, z_second = haar_deviations(lambda m, r, g: random_stiefel(m, r, g, torch.float64))
    assert z_first < 5 and z_second < 5

    def qr_without_sign_fix(m, r, g):
        return torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]

    z_first, _ = haar_deviations(qr_without_sign_fix, n=2000)
    assert z_first > 5

    def uniform_entries(m, r, g):
        return torch.linalg.qr(torch.rand(m, r, generator=g, dtype=torch.float64))[0]

    _, z_second = haar_deviations(uniform_entries, n=2000)
    assert z_second > 5


def test_random_bases_differ_between_parameters():
    """Two parameters of the same shape in one group draw independent bases (the seed mixes the position)."""
    W1, W2 = (torch.nn.Parameter(torch.randn(6, 9)) for _ in range(2))
    opt = SubspaceSGD([W1, W2], lr=0.1, rank=2, projection="random", seed=4)
    W1.grad, W2.grad = torch.randn(6, 9), torch.randn(6, 9)
    opt.step()
    P1, P2 = opt.state[W1]["proj"], opt.state[W2]["proj"]
    assert not torch.allclose(P1 @ P1.T, P2 @ P2.T, atol=1e-3)
    expected = random_stiefel(6, 2, refresh_generator(4, 1, 0))
    assert torch.equal(P2, expected)


def test_random_projection_is_a_function_of_seed_position_step_only():
    """Two optimizers built separately (as on two DDP ranks) draw the same bases; the global RNG is untouched."""
    w0, grad = make_problem()
    rng_before = torch.random.get_rng_state()
    _, a = run_torch(SubspaceAdamW, w0, grad, 25, rank=2, update_proj_gap=10, projection="random", seed=5)
    torch.manual_seed(123)  # a different global state must not matter
    _, b = run_torch(SubspaceAdamW, w0, grad, 25, rank=2, update_proj_gap=10, projection="random", seed=5)
    assert torch.equal(next(iter(a.state.values()))["proj"], next(iter(b.state.values()))["proj"])
    _, c = run_torch(SubspaceAdamW, w0, grad, 25, rank=2, update_proj_gap=10, projection="random", seed=6)
    assert not torch.equal(next(iter(a.state.values()))["proj"], next(iter(c.state.values()))["proj"])
    torch.random.set_rng_state(rng_before)


def test_projection_frozen_between_refreshes():
    w0, grad = make_problem()
    W = torch.nn.Parameter(w0.clone())
    opt = SubspaceSGD([W], lr=0.01, rank=2, update_proj_gap=4, projection="random")
    bases = []
    for t in range(9):
        W.grad = grad(t, W.detach())
        opt.step()
        bases.append(opt.state[W]["proj"].clone())
    assert all(torch.equal(bases[0], b) for b in bases[:4])
    assert not torch.equal(bases[3], bases[4]) and all(torch.equal(bases[4], b) for b in bases[4:8])


# ------------------------------------------------------------------ momentum projection by hand
def test_momentum_projection_hand_example():
    """m = 3, n = 2, r = 1, SGD with momentum 0.5 (first step: buffer = R).

    Step 0: P = e1, G0 = [[2, 4], [0, 0], [0, 0]] -> R0 = [[2, 4]], buffer [[2, 4]].
    Step 1: P_new = (e1 + e2)/√2, so O = P_newᵀ P_old = 1/√2 and the buffer becomes [[2, 4]]/√2;
    G1 = [[0, 0], [2, 2], [0, 0]] -> R1 = [[√2, √2]]; buffer = 0.5·[[2, 4]]/√2 + [[√2, √2]] = [[1/√2 + √2, 2/√2 + √2]].
    """
    bases = iter([torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[1.0], [1.0], [0.0]]) / 2**0.5])

    def scripted(grad, rank, side, generator):
        return next(bases)

    W = torch.nn.Parameter(torch.zeros(3, 2))
    opt = SubspaceSGD([W], lr=1.0, momentum=0.5, rank=1, update_proj_gap=1, proj_type="left", projection=scripted)
    W.grad = torch.tensor([[2.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    opt.step()
    torch.testing.assert_close(opt.state[W]["momentum_buffer"], torch.tensor([[2.0, 4.0]]))
    W.grad = torch.tensor([[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    opt.step()
    s = 2**0.5
    expected = torch.tensor([[1 / s + s, 2 / s + s]])
    torch.testing.assert_close(opt.state[W]["momentum_buffer"], expected)


def test_second_moment_carry_hand_example():
    """Adam's v under "project": v ← (O∘O) v with O = P_newᵀ P_old; a rotation by 90° swaps the rows."""
    bases = iter([torch.eye(3)[:, :2], torch.eye(3)[:, [1, 0]]])

    def scripted(grad, rank, side, generator):
        return next(bases)

    W = torch.nn.Parameter(torch.zeros(3, 4))
    opt = SubspaceAdamW([W], lr=0.1, rank=2, update_proj_gap=1, proj_type="left", projection=scripted)
    W.grad = torch.arange(12.0).reshape(3, 4)
    opt.step()
    m, v = opt.state[W]["exp_avg"].clone(), opt.state[W]["exp_avg_sq"].clone()
    W.grad = torch.zeros(3, 4)
    opt.step()
    torch.testing.assert_close(opt.state[W]["exp_avg"], 0.9 * m[[1, 0]])
    torch.testing.assert_close(opt.state[W]["exp_avg_sq"], 0.999 * v[[1, 0]])
    assert (opt.state[W]["exp_avg_sq"] >= 0).all()


# ------------------------------------------------------------------ peers: galore-torch
def test_keep_matches_official_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    shapes = [(12, 20), (20, 12), (16, 16)]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(60)]
    finals = []
    for cls, extra in [(galore_torch.GaLoreAdamW, {"no_deprecation_warning": True}),
                       (SubspaceAdamW, {"state_on_refresh": "keep"})]:
        params = [torch.nn.Parameter(torch.ones(*s)) for s in shapes]
        vec = torch.nn.Parameter(torch.ones(5))
        groups = [{"params": params, "rank": 4, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"},
                  {"params": [vec]}]
        opt = cls(groups, lr=1e-2, eps=1e-12, weight_decay=0.0, **extra)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            vec.grad = step_grads[0][0, :5].clone()
            opt.step()
        finals.append([p.detach().clone() for p in params + [vec]])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ state: save, load, resume
ALGOS = {
    "galore": dict(projection="svd"),
    "golore": dict(projection="random"),
    "golore@50%": dict(switch_step=20),
    "keep": dict(state_on_refresh="keep"),
    "reset": dict(state_on_refresh="reset"),
}


@pytest.mark.parametrize("algo", sorted(ALGOS))
@pytest.mark.parametrize("cls", [SubspaceAdamW, SubspaceSGD])
def test_resume_is_bit_identical(algo, cls):
    """2N steps == N steps + save + torch.load(weights_only=True) + load_state_dict + N steps."""
    w0, grad = make_problem(dtype=torch.float32)
    extra = dict(momentum=0.9) if cls is SubspaceSGD else {}
    kw = dict(lr=0.01, rank=2, update_proj_gap=7, **ALGOS[algo], **extra)
    straight, _ = run_torch(cls, w0, grad, 40, **kw)

    W = torch.nn.Parameter(w0.clone())
    opt = cls([W], **kw)
    for t in range(20):
        W.grad = grad(t, W.detach()).float()
        opt.step()
    buf = io.BytesIO()
    torch.save({"W": W.detach(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    W2 = torch.nn.Parameter(saved["W"].clone())
    opt2 = cls([W2], **kw)
    opt2.load_state_dict(saved["opt"])
    for t in range(20, 40):
        W2.grad = grad(t, W2.detach()).float()
        opt2.step()
    assert torch.equal(W2.detach(), straight[-1])


def test_custom_projector_state_dict_loads_weights_only():
    w0, grad = make_problem(dtype=torch.float32)
    _, opt = run_torch(SubspaceAdamW, w0, grad, 5, rank=2, update_proj_gap=2, projection=identity_projection)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    W = torch.nn.Parameter(w0.clone())
    opt2 = SubspaceAdamW([W], rank=2, update_proj_gap=2, projection=identity_projection)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["projection"] is identity_projection


def test_state_holds_only_rank_sized_tensors():
    w0, grad = make_problem(m=6, n=9, dtype=torch.float32)
    _, opt = run_torch(SubspaceAdamW, w0, grad, 3, rank=2, proj_type="left")
    state = next(iter(opt.state.values()))
    assert state["proj"].shape == (6, 2) and state["exp_avg"].shape == (2, 9) and state["exp_avg_sq"].shape == (2, 9)
    _, opt = run_torch(SubspaceAdamW, w0, grad, 3, rank=2)  # std: m < n -> left
    assert next(iter(opt.state.values()))["proj"].shape == (6, 2)
    _, opt = run_torch(SubspaceAdamW, w0, grad, 3, rank=2, proj_type="reverse_std")
    assert next(iter(opt.state.values()))["exp_avg"].shape == (6, 2)


# ------------------------------------------------------------------ dtypes, NaN, refresh_due
def test_bf16_parameters_train():
    torch.manual_seed(0)
    target = torch.randn(16, 24)
    W = torch.nn.Parameter(torch.zeros(16, 24, dtype=torch.bfloat16))
    opt = SubspaceAdamW([W], lr=0.05, rank=4, update_proj_gap=5)
    first = None
    for _ in range(60):
        loss = ((W.float() - target) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert W.dtype == torch.bfloat16 and opt.state[W]["proj"].dtype == torch.bfloat16
    assert loss.item() < 0.8 * first


def test_svd_runs_in_float32_for_bf16():
    g = torch.randn(10, 6).to(torch.bfloat16)
    assert svd_projection(g, 2, "left").dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_changes_nothing(bad):
    w0, grad = make_problem(dtype=torch.float32)
    W = torch.nn.Parameter(w0.clone())
    v = torch.nn.Parameter(torch.ones(3))
    opt = SubspaceAdamW([{"params": [W], "rank": 2, "update_proj_gap": 3}, {"params": [v]}], lr=0.1)
    for t in range(4):
        W.grad, v.grad = grad(t, W.detach()).float(), torch.ones(3)
        opt.step()
    before = {k: x.clone() for k, x in opt.state[W].items() if torch.is_tensor(x)}
    w_before, v_before = W.detach().clone(), v.detach().clone()
    for t in (4, 6):  # 6 is a refresh step (7th step): the SVD must not see the NaN either
        W.grad, v.grad = grad(t, W.detach()).float(), torch.ones(3)
        W.grad[1, 2] = bad
        with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[0\]"):
            opt.step()
    v.grad = torch.tensor([1.0, bad, 1.0])
    W.grad = grad(4, W.detach()).float()
    with pytest.raises(FloatingPointError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.step()
    assert torch.equal(W.detach(), w_before) and torch.equal(v.detach(), v_before)
    assert all(torch.equal(opt.state[W][k], x) for k, x in before.items()) and opt.state[W]["step"] == 4


def test_non_finite_gradient_names_a_named_parameter():
    model = torch.nn.Linear(4, 3)
    opt = SubspaceSGD([{"params": [model.weight], "param_names": ["fc.weight"], "rank": 2}], lr=0.1)
    model.weight.grad = torch.full((3, 4), float("nan"))
    with pytest.raises(FloatingPointError, match="fc.weight"):
        opt.step()


def test_refresh_due_and_microbatches():
    W = torch.nn.Parameter(torch.randn(5, 7))
    opt = SubspaceSGD([W], lr=0.01, rank=2, update_proj_gap=3)
    due = []
    for t in range(7):
        due.append(opt.refresh_due())
        assert microbatches(opt, 1, 8) == (8 if due[-1] else 1)
        W.grad = torch.randn(5, 7)
        opt.step()
    assert due == [True, False, False, True, False, False, True]
    assert not SubspaceSGD([torch.nn.Parameter(torch.randn(3))], lr=0.1).refresh_due()


# ------------------------------------------------------------------ bad input: every message
def _matrix():
    return torch.nn.Parameter(torch.randn(4, 6))


ERRORS = [
    (dict(rank=0), r"Invalid rank: 0 \(must be an integer >= 1\)"),
    (dict(rank=2.5), r"Invalid rank: 2.5"),
    (dict(rank=True), r"Invalid rank: True"),
    (dict(rank=5), r"Invalid rank: 5 exceeds min\(m, n\) = 4 of parameter param_groups\[0\]\['params'\]\[0\]"),
    (dict(rank=2, update_proj_gap=0), r"Invalid update_proj_gap: 0"),
    (dict(rank=2, proj_type="full"), r"Invalid proj_type: 'full'"),
    (dict(rank=2, projection="pca"), r"Invalid projection: 'pca'"),
    (dict(rank=2, switch_step=-1), r"Invalid switch_step: -1"),
    (dict(rank=2, scale=0.0), r"Invalid scale: 0.0"),
    (dict(rank=2, state_on_refresh="drop"), r"Invalid state_on_refresh: 'drop'"),
    (dict(lr=-1.0), r"Invalid learning rate: -1.0"),
    (dict(lr=float("nan")), r"Invalid learning rate: nan"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay: -0.1"),
    (dict(seed="a"), r"Invalid seed: 'a'"),
    (dict(betas=(1.0, 0.999)), r"Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), r"Invalid beta parameter at index 1: -0.1"),
    (dict(eps=-1e-8), r"Invalid epsilon value: -1e-08"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS)
def test_bad_input_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SubspaceAdamW([{"params": [_matrix()], **kwargs}])


def test_bad_sgd_input_messages():
    with pytest.raises(ValueError, match=r"Invalid momentum value: -0.5"):
        SubspaceSGD([_matrix()], lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match=r"Nesterov momentum requires"):
        SubspaceSGD([_matrix()], lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"Invalid dampening value: 'x'"):
        SubspaceSGD([_matrix()], lr=0.1, momentum=0.9, dampening="x")


def test_unknown_keys_and_kwargs():
    with pytest.raises(ValueError, match=r"Unknown param-group key 'projection_type': did you mean 'proj_type'\?"):
        SubspaceAdamW([{"params": [_matrix()], "rank": 2, "projection_type": "std"}])
    with pytest.raises(TypeError, match=r"Unknown keyword argument\(s\) \['momentum'\]"):
        SubspaceAdamW([_matrix()], momentum=0.9)
    with pytest.raises(TypeError, match=r"Unknown keyword argument\(s\) \['betas'\]"):
        SubspaceSGD([_matrix()], betas=(0.9, 0.99))


def test_rank_group_rejects_non_matrices():
    conv = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    with pytest.raises(ValueError, match=r"shape \(8, 3, 3, 3\): a group with a rank must hold matrices only"):
        SubspaceAdamW([{"params": [conv], "rank": 2}])


def test_sparse_gradient_is_rejected():
    W = torch.nn.Parameter(torch.randn(4, 6))
    opt = SubspaceSGD([W], lr=0.1)
    W.grad = torch.randn(4, 6).to_sparse()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\] has a sparse gradient"):
        opt.step()


def test_micro_batch_counts_are_validated():
    opt = SubspaceSGD([_matrix()], lr=0.1, rank=2)
    with pytest.raises(ValueError, match=r"Invalid micro-batch counts: base=0, refresh=8"):
        microbatches(opt, 0, 8)


def test_refresh_generator_is_deterministic():
    a = torch.randn(3, generator=refresh_generator(1, 2, 3))
    assert torch.equal(a, torch.randn(3, generator=refresh_generator(1, 2, 3)))
    assert not torch.equal(a, torch.randn(3, generator=refresh_generator(1, 2, 4)))


def test_stored_basis_owns_only_its_own_memory():
    """The SVD basis is a contiguous copy, not a view that keeps the full U or Vh alive in the state."""
    for shape, proj_type in [((40, 24), "left"), ((24, 40), "right"), ((24, 40), "left")]:
        W = torch.nn.Parameter(torch.randn(*shape))
        opt = SubspaceAdamW([W], lr=0.1, rank=3, proj_type=proj_type)
        W.grad = torch.randn(*shape)
        opt.step()
        basis = opt.state[W]["proj"]
        assert basis.is_contiguous() and basis.untyped_storage().nbytes() == basis.numel() * basis.element_size()


# ------------------------------------------------------------------ load_state_dict: validated before anything changes
def snapshot(opt):
    """The optimizer's state dict with every tensor cloned, to compare before and after a refused load."""
    state = opt.state_dict()
    return {"param_groups": copy.deepcopy(state["param_groups"]),
            "state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in state["state"].items()}}


def assert_same(a, b):
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for n, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][n]) if torch.is_tensor(v) else v == b["state"][k][n]


def trained(cls=SubspaceAdamW, shape=(10, 6), steps=3, **kw):
    """An optimizer over one (10, 6) matrix (rank 2, group keys ``kw``) and a vector, after ``steps`` steps."""
    g = torch.Generator().manual_seed(0)
    W, v = torch.nn.Parameter(torch.randn(*shape, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))
    extra = {"momentum": 0.9} if cls is SubspaceSGD else {}
    opt = cls([{"params": [W], "rank": 2, "update_proj_gap": 2, **kw}, {"params": [v]}], lr=0.01, **extra)
    for _ in range(steps):
        W.grad, v.grad = torch.randn(*shape, generator=g), torch.randn(3, generator=g)
        opt.step()
    return opt, W, v


def refused(opt, W, v, state_dict, message, **kw):
    """Loading ``state_dict`` raises a ValueError matching ``message``; the optimizer is exactly as before and steps."""
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state_dict, **kw)
    assert_same(before, snapshot(opt))
    W.grad, v.grad = torch.ones_like(W), torch.ones_like(v)
    opt.step()


def test_load_refuses_a_torch_adamw_state_dict():
    opt, W, v = trained()
    sd = torch.optim.AdamW([{"params": [torch.nn.Parameter(W.detach().clone())]},
                            {"params": [torch.nn.Parameter(v.detach().clone())]}]).state_dict()
    refused(opt, W, v, sd, r"Not a subspace optimizer's state dict .* cannot be loaded into SubspaceAdamW")


def test_load_refuses_another_subspace_rule():
    opt, W, v = trained()
    sgd, _, _ = trained(SubspaceSGD)
    refused(opt, W, v, sgd.state_dict(), r"A SubspaceSGD state dict cannot be loaded into SubspaceAdamW")
    opt, W, v = trained(SubspaceSGD)
    adamw, _, _ = trained(SubspaceAdamW)
    refused(opt, W, v, adamw.state_dict(), r"A SubspaceAdamW state dict cannot be loaded into SubspaceSGD")


def test_load_refuses_state_of_another_shape():
    """State for an (8, 6) parameter does not load for a (10, 6) one: the basis (rank 2, right side) would fit,
    the moments (8, 2) do not. Then a basis, a vector's moment, an unknown entry, a bad counter."""
    opt, W, v = trained()
    other, _, _ = trained(shape=(8, 6))
    refused(opt, W, v, other.state_dict(), r"State 'exp_avg' of parameter param_groups\[0\]\['params'\]\[0\] "
                                           r"with shape \(10, 6\) is \(8, 2\); rank 2 implies \(10, 2\)")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["proj"] = torch.zeros(6, 3)
    refused(opt, W, v, sd, r"State 'proj' .* is \(6, 3\); rank 2 implies \(6, 2\)")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg_sq"] = torch.zeros(4)
    refused(opt, W, v, sd, r"State 'exp_avg_sq' of parameter param_groups\[1\]\['params'\]\[0\] with shape \(3,\)")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["projector"] = torch.zeros(1)
    refused(opt, W, v, sd, r"unknown entry 'projector'")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = -1
    refused(opt, W, v, sd, r"State 'step' of parameter .* is -1")


@pytest.mark.parametrize("key, value, message", [
    ("rank", 0, r"Param group 0 of the state dict: Invalid rank: 0"),
    ("lr", float("nan"), r"Param group 0 of the state dict: Invalid learning rate: nan"),
    ("betas", (0.9, 1.5), r"Invalid beta parameter at index 1: 1.5"),
    ("update_proj_gap", True, r"Invalid update_proj_gap: True"),
    ("rank", 7, r"Invalid rank: 7 exceeds min\(m, n\) = 6"),
])
def test_load_refuses_what_the_constructor_refuses(key, value, message):
    opt, W, v = trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][key] = value
    refused(opt, W, v, sd, message)


def test_load_refuses_other_groups():
    opt, W, v = trained()
    sd = copy.deepcopy(opt.state_dict())
    refused(opt, W, v, {**sd, "param_groups": sd["param_groups"][:1]}, r"state dict has 1 param group\(s\), .* has 2")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][1]["params"] = [1, 2]
    refused(opt, W, v, sd, r"Param group 1 of the state dict has 2 parameter\(s\), this SubspaceAdamW's has 1")
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["betas"]
    refused(opt, W, v, sd, r"Not a SubspaceAdamW state dict: param group 0 of the state dict lacks keys \['betas'\]")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["amsgrad"] = True
    refused(opt, W, v, sd, r"Param group 0 of the state dict: Invalid amsgrad: True \(SubspaceAdamW does not "
                           r"implement torch.optim's amsgrad")
    refused(opt, W, v, [1, 2], r"Not an optimizer state dict")


@pytest.mark.parametrize("key, value", [("switch_step", 4), ("seed", 1), ("rank", 1), ("projection", "random"),
                                        ("state_on_refresh", "keep"), ("scale", 0.5)])
def test_load_refuses_other_subspace_settings_unless_kept(key, value):
    """A saved setting never silently replaces the constructor's; keep_settings=True keeps the constructor's."""
    opt, W, v = trained()
    saved, _, _ = trained(**{key: value})
    mine = opt.param_groups[0][key]
    refused(opt, W, v, saved.state_dict(), rf"Param group 0: the state dict's {key}={value!r} differs from this "
                                           rf"SubspaceAdamW's {key}={mine!r} \(load_state_dict\(\.\.\., keep_settings")
    if key == "rank":  # the saved (10, 1) state cannot serve rank 2: refused even when keeping the settings
        refused(opt, W, v, saved.state_dict(), r"State 'proj' .* is \(6, 1\); rank 2 implies \(6, 2\)",
                keep_settings=True)
        return
    opt.load_state_dict(saved.state_dict(), keep_settings=True)
    assert opt.param_groups[0][key] == mine and opt.param_groups[0]["lr"] == saved.param_groups[0]["lr"]
    assert opt.state[W]["step"] == 3


def test_load_keeps_the_constructor_switch_and_the_scheduled_lr():
    """Resuming with a later switch (longer run): refused by default, kept with keep_settings; the saved lr (what a
    scheduler set) is loaded as torch does."""
    opt, W, v = trained(switch_fraction=0.5, total_steps=10)
    assert opt.param_groups[0]["switch_step"] == 5
    for group in opt.param_groups:
        group["lr"] = 0.004
    longer, W2, v2 = trained(switch_fraction=0.5, total_steps=20, steps=0)
    refused(longer, W2, v2, opt.state_dict(), r"the state dict's switch_step=5 differs from this SubspaceAdamW's "
                                              r"switch_step=10")
    longer, W2, v2 = trained(switch_fraction=0.5, total_steps=20, steps=0)
    longer.load_state_dict(opt.state_dict(), keep_settings=True)
    group = longer.param_groups[0]
    assert (group["switch_step"], group["total_steps"], group["lr"]) == (10, 20, 0.004)


def test_load_keeps_the_projector_object_and_checks_its_name():
    opt, W, v = trained(projection=identity_projection)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["projection"] is identity_projection

    def other_projection(grad, rank, side, generator):
        return identity_projection(grad, rank, side, generator)

    mine, W2, v2 = trained(projection=other_projection)
    refused(mine, W2, v2, opt.state_dict(), r"projection=<callable identity_projection> differs from .*"
                                            r"projection=<callable .*other_projection>")


# ------------------------------------------------------------------ a user's projector is checked at refresh steps
@pytest.mark.parametrize("bad, message", [
    (lambda g, r, s, gen: torch.linalg.qr(torch.randn(g.shape[1], r + 1, generator=gen))[0],
     r"returned shape \(6, 3\), torch.float32; a basis must be a floating \(6, 2\) tensor"),
    (lambda g, r, s, gen: 2 * torch.eye(g.shape[1])[:, :r],
     r"returned a basis without orthonormal columns: max \|PᵀP − I\| = 3 > "),
    (lambda g, r, s, gen: torch.randn(g.shape[1], r, generator=gen), r"returned a basis without orthonormal columns"),
    (lambda g, r, s, gen: torch.eye(g.shape[1], dtype=torch.int64)[:, :r], r"returned shape \(6, 2\), torch.int64"),
    (lambda g, r, s, gen: torch.full((g.shape[1], r), float("nan")),
     r"returned a basis without orthonormal columns: .* = nan"),
    (lambda g, r, s, gen: [[1.0, 0.0]] * 6, r"returned list"),
])
def test_bad_projector_result_is_refused_naming_the_parameter(bad, message):
    W = torch.nn.Parameter(torch.randn(10, 6))
    opt = SubspaceAdamW([{"params": [W], "param_names": ["block.fc.weight"], "rank": 2}], projection=bad)
    W.grad = torch.randn(10, 6)
    before = W.detach().clone()
    with pytest.raises(ValueError, match=r"The projector <callable .*> for parameter 'block.fc.weight' "
                                         r"\(right side, rank 2\) " + message):
        opt.step()
    assert torch.equal(W.detach(), before) and not opt.state[W]


def test_projector_tolerance_accepts_rounding():
    """A float32 QR of a 4096 × 32 Gaussian is orthonormal to rounding (about 1e-6): accepted."""
    def qr(grad, rank, side, generator):
        return torch.linalg.qr(torch.randn(grad.shape[0], rank, generator=generator))[0]

    W = torch.nn.Parameter(torch.zeros(4096, 40))
    opt = SubspaceSGD([W], lr=0.1, rank=32, proj_type="left", projection=qr)
    W.grad = torch.randn(4096, 40)
    opt.step()
    assert opt.state[W]["proj"].shape == (4096, 32)


# ------------------------------------------------------------------ numbers, tensors, the switch given as a fraction
def test_numpy_numbers_are_accepted_and_saved_as_python_numbers():
    W = torch.nn.Parameter(torch.randn(10, 6))
    opt = SubspaceAdamW([{"params": [W], "rank": np.int64(2), "scale": np.float32(0.5)}], lr=np.float64(0.01),
                        betas=(np.float32(0.9), 0.99), update_proj_gap=np.int32(3), seed=np.uint8(7))
    group = opt.param_groups[0]
    assert [type(group[k]) for k in ("rank", "scale", "lr", "update_proj_gap", "seed")] == [int, float, float, int, int]
    assert group["betas"] == (pytest.approx(0.9), 0.99) and type(group["betas"][0]) is float
    W.grad = torch.randn(10, 6)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))


def test_tensor_learning_rate():
    """A one-element float tensor lr (schedulers, torch.compile) trains like the same float; other tensors are
    refused."""
    w0, grad = make_problem(dtype=torch.float32)
    a, _ = run_torch(SubspaceAdamW, w0, grad, 10, rank=2, update_proj_gap=3, lr=0.01)
    b, opt = run_torch(SubspaceAdamW, w0, grad, 10, rank=2, update_proj_gap=3, lr=torch.tensor(0.01))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    torch.testing.assert_close(a[-1], b[-1])
    for bad in (torch.tensor([0.01, 0.02]), torch.tensor(1), torch.tensor(float("inf")), torch.tensor(-0.1)):
        with pytest.raises(ValueError, match=r"Invalid learning rate: tensor"):
            SubspaceSGD([_matrix()], lr=bad)


def test_switch_fraction_is_switch_step():
    """switch_fraction=x, total_steps=T is switch_step=round((1 − x)·T), the method name golore@{100x}'s switch."""
    from golore_lab.methods import parse

    for fraction, total in [(0.2, 1000), (0.5, 7), (0.25, 10), (1.0, 30)]:
        opt = SubspaceSGD([_matrix()], lr=0.1, rank=2, switch_fraction=fraction, total_steps=total)
        assert opt.param_groups[0]["switch_step"] == parse(f"golore@{100 * fraction:g}").switch_step(total)
    w0, grad = make_problem()
    a, _ = run_torch(SubspaceSGD, w0, grad, 30, rank=2, update_proj_gap=5, lr=0.02, switch_step=20)
    b, _ = run_torch(SubspaceSGD, w0, grad, 30, {"switch_fraction": 1 / 3, "total_steps": 30}, rank=2,
                     update_proj_gap=5, lr=0.02)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_switch_given_two_ways_must_agree():
    with pytest.raises(ValueError, match=r"Conflicting switch: switch_step=500 but switch_fraction=0.2 with "
                                         r"total_steps=1000 gives switch_step=800; give one of the two"):
        SubspaceAdamW([{"params": [_matrix()], "rank": 2, "switch_step": 500}], switch_fraction=0.2, total_steps=1000)
    opt = SubspaceAdamW([_matrix()], rank=2, switch_step=800, switch_fraction=0.2, total_steps=1000)
    assert opt.param_groups[0]["switch_step"] == 800
    with pytest.raises(ValueError, match=r"switch_fraction=0.2 needs total_steps"):
        SubspaceAdamW([_matrix()], rank=2, switch_fraction=0.2)
    with pytest.raises(ValueError, match=r"Invalid total_steps: 100 without switch_fraction"):
        SubspaceAdamW([_matrix()], rank=2, total_steps=100)
    with pytest.raises(ValueError, match=r"Invalid switch_fraction: 0 \(must be a number 0 < x <= 1"):
        SubspaceAdamW([_matrix()], rank=2, switch_fraction=0, total_steps=100)


def test_bad_group_added_later_is_not_added():
    opt = SubspaceAdamW([_matrix()], rank=2)
    with pytest.raises(ValueError, match=r"Invalid scale: -1"):
        opt.add_param_group({"params": [_matrix()], "scale": -1})
    assert len(opt.param_groups) == 1
    extra = _matrix()
    opt.add_param_group({"params": [extra], "rank": 1})   # the refused group's tensor set did not stick either
    assert len(opt.param_groups) == 2


def test_mutation_check_is_current():
    """Every mutant of bench/mutations.py still applies to the source exactly once and compiles (the full check,
    ``python bench/mutations.py``, takes minutes; this keeps it from going stale when the code moves)."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = importlib.util.spec_from_file_location("bench_mutations", root / "bench" / "mutations.py")
    mutations = importlib.util.module_from_spec(found)
    sys.modules[found.name] = mutations    # dataclasses look their module up there
    try:
        found.loader.exec_module(mutations)
    finally:
        del sys.modules[found.name]
    assert len(mutations.MUTANTS) >= 14 and len({m.name for m in mutations.MUTANTS}) == len(mutations.MUTANTS)
    for mutant in mutations.MUTANTS:
        source = (root / "golore_lab" / mutant.file).read_text()
        assert source.count(mutant.old) == 1, mutant.name
        compile(source.replace(mutant.old, mutant.new), mutant.file, "exec")
