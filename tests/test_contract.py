"""torch.optim's contract: what a user who treats SubspaceAdamW / SubspaceSGD as a torch optimizer relies on.

deepcopy and pickle, repeated ``load_state_dict``, torch's state-dict hooks, extra param-group keys, complex
parameters, a tensor ``lr`` of any one-element shape, ``maximize``, and a finite-gradient check that never refuses
a finite gradient. Each test compares with ``torch.optim`` where torch defines the behaviour.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from golore_lab import SubspaceAdamW, SubspaceSGD

RULES = {"adamw": (SubspaceAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
         "sgd": (SubspaceSGD, torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=0.1))}
MODES = {"full": {}, "subspace": {"rank": 2, "update_proj_gap": 2}}


def build(rule, mode, **kw):
    cls, _, hyper = RULES[rule]
    g = torch.Generator().manual_seed(0)
    W, v = torch.nn.Parameter(torch.randn(6, 4, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))
    opt = cls([{"params": [W], **MODES[mode]}, {"params": [v]}], **{**hyper, **kw})
    return opt, [W, v]


def feed(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def train(opt, params, start, stop):
    for step in range(start, stop):
        feed(params, step)
        opt.step()


# ------------------------------------------------------------------ deepcopy and pickle
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_steps_like_the_original(rule, mode, how):
    """torch's __getstate__ keeps defaults, state and param groups only: the copy must still step (and save, and
    load), exactly like the original from there on; refresh hooks are not copied (torch's hooks are not either)."""
    opt, params = build(rule, mode)
    opt.register_refresh_hook(lambda o, r: None)
    train(opt, params, 0, 3)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert not twin._refresh_hooks
    train(opt, params, 3, 6)
    train(twin, twin_params, 3, 6)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    twin.load_state_dict(twin.state_dict())
    train(twin, twin_params, 6, 7)


# ------------------------------------------------------------------ load_state_dict, again and through hooks
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
def test_second_load_into_the_same_optimizer(rule, mode):
    """Rolling back to a checkpoint twice: torch's __setstate__ adds 'differentiable' to the defaults on a load."""
    opt, params = build(rule, mode)
    train(opt, params, 0, 3)
    saved = copy.deepcopy(opt.state_dict())
    for _ in range(2):
        train(opt, params, 3, 5)
        opt.load_state_dict(saved)
    assert opt.state[params[0]]["step"] == 3


def test_load_pre_hook_result_is_what_is_checked_and_loaded():
    opt, params = build("adamw", "subspace")
    train(opt, params, 0, 3)
    saved = copy.deepcopy(opt.state_dict())

    def faster(optimizer, state_dict):
        for group in state_dict["param_groups"]:
            group["lr"] = 0.002
        return state_dict

    handle = opt.register_load_state_dict_pre_hook(faster)
    opt.load_state_dict(saved)
    assert [g["lr"] for g in opt.param_groups] == [0.002, 0.002]
    handle.remove()

    def breaks(optimizer, state_dict):
        state_dict["param_groups"][0]["rank"] = 0
        return state_dict

    opt.register_load_state_dict_pre_hook(breaks)
    with pytest.raises(ValueError, match=r"Param group 0 of the state dict: Invalid rank: 0"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["rank"] == 2


def test_load_pre_hook_upgrades_an_older_layout():
    """A dict in an older layout (here: 'betas' saved as two keys) loads when a pre-hook upgrades it: the checks
    run after the user's hooks."""
    opt, params = build("adamw", "subspace")
    train(opt, params, 0, 3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        group["beta1"], group["beta2"] = group.pop("betas")
    fresh, fresh_params = build("adamw", "subspace")
    with pytest.raises(ValueError, match=r"lacks keys \['betas'\]"):
        fresh.load_state_dict(copy.deepcopy(old))

    def upgrade(optimizer, state_dict):
        for group in state_dict["param_groups"]:
            group["betas"] = (group.pop("beta1"), group.pop("beta2"))
        return state_dict

    fresh.register_load_state_dict_pre_hook(upgrade)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["betas"] == (0.9, 0.999) and fresh.state[fresh_params[0]]["step"] == 3


def test_state_dict_hooks_see_the_saved_layout_and_load_post_hooks_the_checked_groups():
    def projector(grad, rank, side, generator):
        return torch.eye(grad.shape[1] if side == "right" else grad.shape[0], dtype=torch.float64)[:, :rank]

    opt, params = build("adamw", "subspace", projection=projector)
    train(opt, params, 0, 2)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sd["param_groups"][0]["projection"]))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.param_groups[0]["projection"]))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["<callable test_state_dict_hooks_see_the_saved_layout_and_load_post_hooks_the_checked_groups."
                    "<locals>.projector>", projector]


# ------------------------------------------------------------------ param-group keys
def test_extra_group_keys_are_kept_and_saved():
    W, v = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(3))
    opt = SubspaceAdamW([{"params": [W], "rank": 2, "name": "matrices", "lr_scale": 0.5},
                         {"params": [v], "name": "vectors"}])
    assert opt.param_groups[0]["name"] == "matrices" and opt.param_groups[0]["lr_scale"] == 0.5
    feed([W, v], 0)
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][1]["name"] == "vectors"
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr_scale"] == 0.5


@pytest.mark.parametrize("key, meant", [("rnak", "rank"), ("update_proj_gaps", "update_proj_gap"),
                                        ("beta", "betas"), ("weightdecay", "weight_decay"), ("maximise", "maximize")])
def test_near_misspelling_of_a_known_key_is_refused(key, meant):
    with pytest.raises(ValueError, match=rf"Unknown param-group key '{key}': did you mean '{meant}'\?"):
        SubspaceAdamW([{"params": [torch.nn.Parameter(torch.randn(6, 4))], key: 2}])


def test_torch_keys_that_change_the_algorithm_are_refused_when_true():
    p = torch.nn.Parameter(torch.randn(6, 4))
    SubspaceAdamW([{"params": [p], "amsgrad": False}])
    with pytest.raises(ValueError, match=r"Invalid amsgrad: True \(SubspaceAdamW does not implement"):
        SubspaceAdamW([{"params": [p], "amsgrad": True}])


# ------------------------------------------------------------------ tensor lr, maximize
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_one_element_tensor_lr_of_any_shape(rule, foreach):
    runs = []
    for lr in (0.01, torch.tensor(0.01), torch.tensor([0.01]), torch.tensor([[0.01]])):
        opt, params = build(rule, "subspace", lr=lr, foreach=foreach)
        train(opt, params, 0, 5)
        runs.append([p.detach().clone() for p in params])
    for other in runs[2:]:
        assert all(torch.equal(a, b) for a, b in zip(other, runs[1]))
    for a, b in zip(runs[1], runs[0]):
        torch.testing.assert_close(a, b)  # a tensor lr multiplies where a float is folded into alpha


@pytest.mark.parametrize("rule", RULES)
def test_maximize_full_space_is_torch(rule):
    cls, torch_cls, hyper = RULES[rule]
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 3, generator=g)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, ref = cls([ours], maximize=True, **hyper), torch_cls([theirs], maximize=True, foreach=False, **hyper)
    for step in range(5):
        grad = torch.randn(5, 3, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)  # fused vs per-tensor kernels: rounding


@pytest.mark.parametrize("rule", RULES)
def test_maximize_is_minimizing_the_negated_gradient(rule):
    plus, plus_params = build(rule, "subspace", maximize=True)
    minus, minus_params = build(rule, "subspace")
    for step in range(5):
        feed(plus_params, step)
        feed(minus_params, step)
        for p in minus_params:
            p.grad.neg_()
        plus.step()
        minus.step()
    assert all(torch.equal(a, b) for a, b in zip(plus_params, minus_params))
    with pytest.raises(ValueError, match=r"Invalid maximize: 1 \(must be True or False\)"):
        build(rule, "full", maximize=1)


# ------------------------------------------------------------------ complex parameters
def test_complex_adamw_step_is_torch_on_the_real_view():
    """Zero parameter, gradient 1+1j, lr 1: torch.optim.AdamW moves each real component by −lr: −1−1j."""
    z = torch.nn.Parameter(torch.zeros(1, dtype=torch.complex64))
    opt = SubspaceAdamW([z], lr=1.0)
    z.grad = torch.tensor([1 + 1j], dtype=torch.complex64)
    opt.step()
    torch.testing.assert_close(z.detach(), torch.tensor([-1 - 1j], dtype=torch.complex64))
    assert opt.state[z]["exp_avg"].dtype == torch.complex64


@pytest.mark.parametrize("rule", RULES)
def test_complex_full_space_matches_torch(rule):
    cls, torch_cls, hyper = RULES[rule]
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=g, dtype=torch.complex128)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, ref = cls([ours], **hyper), torch_cls([theirs], foreach=False, **hyper)
    for step in range(6):
        grad = torch.randn(4, 3, generator=g, dtype=torch.complex128)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    key = "exp_avg_sq" if rule == "adamw" else "momentum_buffer"
    torch.testing.assert_close(opt.state[ours][key], ref.state[theirs][key], rtol=1e-13, atol=1e-13)
    opt.load_state_dict(opt.state_dict())


def test_complex_matrix_in_a_rank_group_is_refused():
    z = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"Parameter param_groups\[0\]\['params'\]\[0\] is complex: a group with a "
                                         r"rank holds real matrices only"):
        SubspaceAdamW([z], rank=2)


# ------------------------------------------------------------------ the finite check
@pytest.mark.parametrize("finite_check", ["sync", "deferred"])
@pytest.mark.parametrize("dtype, big", [(torch.float32, 1e20), (torch.float32, 3e38), (torch.float64, 1e200)])
def test_finite_gradient_whose_norm_overflows_steps_like_torch(dtype, big, finite_check):
    ours = torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
    theirs = torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
    opt, ref = SubspaceAdamW([ours], lr=0.01), torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.0, foreach=False)
    opt.finite_check = finite_check
    grad = torch.full((4, 3), big, dtype=dtype)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    ref.step()
    opt.raise_if_nonfinite()
    torch.testing.assert_close(ours, theirs)  # (g² overflows to inf above ~1e19 / 1e154: torch then moves by 0)
    sgd = torch.nn.Parameter(torch.ones(4, 3, dtype=dtype))
    opt = SubspaceSGD([sgd], lr=1e-300 if dtype == torch.float64 else 1e-30)
    opt.finite_check = finite_check
    sgd.grad = grad.clone()
    opt.step()
    opt.raise_if_nonfinite()
    assert torch.equal(sgd.detach(), 1 - opt.param_groups[0]["lr"] * grad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("finite_check", ["sync", "deferred"])
def test_non_finite_entry_among_huge_ones_is_still_caught(bad, finite_check):
    W = torch.nn.Parameter(torch.ones(4, 3))
    opt = SubspaceAdamW([W], lr=0.01)
    opt.finite_check = finite_check
    W.grad = torch.full((4, 3), 1e30)
    W.grad[2, 1] = bad
    if finite_check == "sync":
        with pytest.raises(FloatingPointError, match=r"Non-finite gradient in parameter param_groups\[0\]"):
            opt.step()
    else:
        opt.step()
        with pytest.raises(FloatingPointError, match=r"Non-finite gradient in parameter\(s\) param_groups\[0\]"):
            opt.raise_if_nonfinite()


def test_projected_gradient_that_overflows_is_named_as_such():
    """Entries 3e38 (finite float32) on a basis whose columns sum two coordinates: R = G Q holds √2·3e38 = inf."""
    def pairs(grad, rank, side, generator):
        basis = torch.zeros(grad.shape[1], rank)
        for j in range(rank):
            basis[2 * j:2 * j + 2, j] = 2 ** -0.5
        return basis

    W = torch.nn.Parameter(torch.ones(8, 6))
    opt = SubspaceAdamW([W], lr=0.01, rank=2, projection=pairs)
    W.grad = torch.full((8, 6), 3e38)
    with pytest.raises(FloatingPointError, match=r"The projected gradient of parameter param_groups\[0\]\['params'\]"
                                                 r"\[0\] overflows although its gradient is finite"):
        opt.step()


# ------------------------------------------------------------------ a user's projector on every path
@pytest.mark.parametrize("foreach", [False, True])
def test_two_identity_projector_is_refused_on_every_path(foreach):
    def doubled(grad, rank, side, generator):
        return 2 * torch.eye(grad.shape[1] if side == "right" else grad.shape[0])[:, :rank]

    params = [torch.nn.Parameter(torch.randn(8, 6)) for _ in range(2)]
    opt = SubspaceAdamW([{"params": params, "rank": 2, "foreach": foreach}], projection=doubled)
    feed(params, 0)
    with pytest.raises(ValueError, match=r"returned a basis without orthonormal columns: max \|PᵀP − I\| = 3"):
        opt.step()
