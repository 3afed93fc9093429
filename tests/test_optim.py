"""The optimizers: exact equivalences, the float64 reference, state, resume, peers and every error message."""
from __future__ import annotations

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


def test_random_stiefel_mean_projector_is_r_over_m_identity():
    """E[PPᵀ] = (r/m) I. Each entry of the Monte Carlo mean has standard deviation <= sqrt(r/m (1-r/m)/N)
    (a projector's entries are bounded by its diagonal), so 5 of those is a tolerance a wrong sampler fails."""
    m, r, N = 8, 3, 20000
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(m, m, dtype=torch.float64)
    for _ in range(N):
        P = random_stiefel(m, r, g, torch.float64)
        mean += P @ P.T
    mean /= N
    tol = 5 * (r / m * (1 - r / m) / N) ** 0.5
    assert (mean - r / m * torch.eye(m, dtype=torch.float64)).abs().max() < tol
    # A sampler without the sign fix is biased (diag(R) > 0 is what makes QR unique): the same test catches it.
    biased = torch.zeros(m, m, dtype=torch.float64)
    for _ in range(2000):
        q, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
        biased += q @ q.T
    assert torch.allclose(torch.diagonal(biased / 2000).sum(), torch.tensor(float(r), dtype=torch.float64))


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
    with pytest.raises(ValueError, match=r"Unknown param-group key\(s\) \['projection_type'\]"):
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
