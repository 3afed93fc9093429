"""The batched (``foreach``) path against the per-tensor path, the tensor learning rate, the deferred check.

Both paths run the same algorithm in float64; they differ only in how BLAS/LAPACK calls are grouped (a bmm or
a stacked SVD/QR instead of one call per matrix, a separate add instead of a fused addmm), i.e. in rounding at
the level of float64's ε ≈ 2e-16 per operation. A 1e-12 relative tolerance is four orders above that and far
below what any algorithmic slip (a wrong basis, transport or bias correction) changes, which is O(lr).
"""
from __future__ import annotations

import pytest
import torch

from golore_lab import SubspaceAdamW, SubspaceSGD, batched

SHAPES = [(12, 8), (12, 8), (12, 8), (8, 12), (8, 12), (10, 10)]  # buckets of 3, 2 and 1


def train(foreach, opt_cls, steps=7, lr=0.05, tensor_lr=False, **group):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in SHAPES]
    bias = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    kw = dict(lr=lr, weight_decay=0.1) if opt_cls is SubspaceAdamW else dict(lr=lr, momentum=0.9, weight_decay=0.1)
    opt = opt_cls([{"params": params, "rank": 3, "update_proj_gap": 3, "foreach": foreach, **group},
                   {"params": [bias]}], **kw)
    if tensor_lr:
        for grp in opt.param_groups:
            grp["lr"] = torch.tensor(grp["lr"], dtype=torch.float64)
    bases = []
    opt.register_refresh_hook(lambda o, r: bases.append((r.position, r.step, r.kind, r.basis.clone())))
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params + [bias]:
            p.grad = torch.randn(p.shape, generator=data, dtype=torch.float64) + p.detach() ** 2
        opt.step()
    return [p.detach() for p in params + [bias]], opt, sorted(bases, key=lambda b: b[:2])


@pytest.mark.parametrize("opt_cls", [SubspaceAdamW, SubspaceSGD])
@pytest.mark.parametrize("group", [dict(projection="svd"), dict(projection="random"), dict(switch_step=4),
                                   dict(state_on_refresh="keep"), dict(state_on_refresh="reset", scale=0.3),
                                   dict(proj_type="reverse_std", projection="random")],
                         ids=["svd", "random", "switch", "keep", "reset", "reverse"])
def test_batched_matches_per_tensor(opt_cls, group):
    loop, loop_opt, loop_bases = train(False, opt_cls, **group)
    stacked, stacked_opt, stacked_bases = train(True, opt_cls, **group)
    for a, b in zip(loop, stacked):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert [b[:3] for b in loop_bases] == [b[:3] for b in stacked_bases]
    for (*_, kind, a), (*_, b) in zip(loop_bases, stacked_bases):
        if kind == "svd":  # singular vectors are defined up to sign (the update is not affected)
            a, b = a.abs(), b.abs()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for p_loop, p_stacked in zip(loop_opt.state, stacked_opt.state):
        s, t = loop_opt.state[p_loop], stacked_opt.state[p_stacked]
        assert s.keys() == t.keys()
        for key in s:
            if torch.is_tensor(s[key]) and key != "proj":
                torch.testing.assert_close(t[key].abs(), s[key].abs(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("group", [dict(projection="svd"), dict(projection="random", state_on_refresh="reset")],
                         ids=["svd", "random-reset"])
def test_fused_adamw_kernel_matches_the_element_wise_rule(foreach, group, monkeypatch):
    """AdamW's directions (low-rank) and full-space updates come from torch's fused kernel where it can take the
    tensors, else from element-wise kernels (:func:`golore_lab.rules.adamw_direction`, ``foreach`` ones when
    batched): the same arithmetic, grouped differently -- float64 rounding apart."""
    fused, fused_opt, _ = train(foreach, SubspaceAdamW, **group)
    monkeypatch.setattr(batched, "fusable", lambda *tensors: False)
    plain, plain_opt, _ = train(foreach, SubspaceAdamW, **group)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for p, q in zip(plain_opt.state, fused_opt.state):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused_opt.state[q][key], plain_opt.state[p][key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("opt_cls", [SubspaceAdamW, SubspaceSGD])
def test_tensor_learning_rate_matches_float(foreach, opt_cls):
    number, _, _ = train(foreach, opt_cls, projection="random")
    tensor, _, _ = train(foreach, opt_cls, projection="random", tensor_lr=True)
    for a, b in zip(number, tensor):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_deferred_check_records_on_device_and_raises_later():
    w = torch.nn.Parameter(torch.ones(6, 4))
    v = torch.nn.Parameter(torch.ones(6, 4))
    opt = SubspaceAdamW([{"params": [w, v], "rank": 2, "param_names": ["w", "v"], "projection": "random"}])
    opt.finite_check = "deferred"
    w.grad, v.grad = torch.ones(6, 4), torch.ones(6, 4)
    opt.step()  # refresh step
    opt.raise_if_nonfinite()  # nothing recorded
    v.grad = torch.ones(6, 4)
    v.grad[2, 1] = float("inf")
    opt.step()  # a regular step: no host read, the step is applied
    assert not torch.isfinite(v).all() and opt.state[v]["step"] == 2
    with pytest.raises(FloatingPointError, match=r"parameter\(s\) 'v' since the last check"):
        opt.raise_if_nonfinite()
    opt.raise_if_nonfinite()  # cleared
