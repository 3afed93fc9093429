"""PyTorch's own optimizer inputs and error inputs (``torch.testing._internal.common_optimizers``, the
``OptimizerInfo`` database of torch's test/test_optim.py) run against SubspaceAdamW and SubspaceSGD, in the full
space (where they must be torch.optim.AdamW / SGD) and in a subspace (rank 1).

torch's generic tests themselves (test/test_optim.py) are not installed with torch; the database is. Where the
optimizers differ from torch on purpose the difference is listed here, so that a new difference fails:
:data:`UNSUPPORTED` (inputs refused), :data:`OWN_MESSAGES` (the same error, in this package's words) and
:data:`ACCEPTED` (inputs torch refuses and these optimizers take).
"""
from __future__ import annotations

import copy
import re
import sys
import types
import unittest
import warnings

import pytest
import torch

from golore_lab import SubspaceAdamW, SubspaceSGD

# common_utils imports expecttest (a test-only package of torch's) for its TestCase; only the database is used here
sys.modules.setdefault("expecttest", types.SimpleNamespace(TestCase=unittest.TestCase))
co = pytest.importorskip("torch.testing._internal.common_optimizers")

OPTIMS = {"adamw": (SubspaceAdamW, torch.optim.AdamW, co.optim_inputs_func_adamw, co.optim_error_inputs_func_adamw),
          "sgd": (SubspaceSGD, torch.optim.SGD, co.optim_inputs_func_sgd, co.optim_error_inputs_func_sgd)}
MODES = {"full": {}, "subspace": {"rank": 1}}
UNSUPPORTED = {("adamw", "amsgrad")}
OWN_MESSAGES = {  # torch's error, raised with this package's message (same exception type)
    "Tensor lr must be 1-element": r"Invalid learning rate: tensor\(\[0.0010, 0.0010\]\) \(must be a finite number",
    "weight_decay should > 0": r"Invalid weight_decay: -1 \(must be a finite number >= 0\)",
    "betas must be either both floats or both Tensors": r"Invalid beta parameter at index [01]: tensor",
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True":
        r"Invalid beta parameter at index 0: tensor",  # tensor betas are not supported at all (a gap)
}
ACCEPTED = {"lr as Tensor doesn't work with foreach & not capturable"}  # a tensor lr works on the foreach path


def inputs(rule):
    return [(rule, inp.desc, inp.kwargs) for inp in OPTIMS[rule][2]("cpu", torch.float64)]


def error_inputs(rule):
    return [(rule, err.optimizer_error_input.desc, err) for err in OPTIMS[rule][3]("cpu", torch.float64)]


def with_mode(params, mode):
    """Add the mode's keys to each param group (torch's inputs give params as tensors, pairs or groups)."""
    if isinstance(params, list) and params and isinstance(params[0], dict):
        return [{**group, **MODES[mode]} for group in params], {}
    return params, MODES[mode]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule, desc, err", [case for rule in OPTIMS for case in error_inputs(rule)])
def test_torch_error_inputs(rule, desc, err, mode):
    ours = OPTIMS[rule][0]
    params = err.optimizer_error_input.params
    if params is None:
        params = [torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))]
    params, keys = with_mode(params, mode)
    kwargs = {**err.optimizer_error_input.kwargs, **keys}
    if desc in ACCEPTED:
        ours(params, **kwargs)
        return
    regex = OWN_MESSAGES.get(desc, err.error_regex)
    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=regex):
            ours(params, **kwargs)
        return
    with pytest.raises(err.error_type, match=regex):
        opt = ours(params, **kwargs)
        if err.error_on == co.OptimizerErrorEnum.STEP_ERROR:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = torch.randn_like(p)
            opt.step()


def quadratic(W):
    target = torch.arange(W.numel(), dtype=W.dtype).reshape(W.shape) / W.numel()
    return ((W - target) ** 2).sum()


@pytest.mark.parametrize("rule, desc, kwargs", [case for rule in OPTIMS for case in inputs(rule)])
def test_torch_inputs_full_space_is_torch(rule, desc, kwargs):
    """Each of torch's constructor inputs: the full-space optimizer follows torch's own, step by step (float64;
    the fused AdamW kernel and torch's per-tensor loop round differently, ~1e-16 per step)."""
    ours_cls, torch_cls = OPTIMS[rule][:2]
    if any((rule, key) in UNSUPPORTED for key, value in kwargs.items() if value):
        with pytest.raises(TypeError, match=r"Unknown keyword argument"):
            ours_cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
        return
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = ours_cls([ours], **kwargs)
    ref = torch_cls([theirs], foreach=False, **({"weight_decay": 0.0} | kwargs if rule == "adamw" else kwargs))
    for _ in range(10):
        for W, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            quadratic(W).backward()
            o.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule, desc, kwargs", [case for rule in OPTIMS for case in inputs(rule)])
def test_torch_inputs_go_the_right_direction(rule, desc, kwargs, mode):
    """torch's "goes right direction" check: 20 steps on a convex quadratic q lower it (with maximize,
    ascending −q), in the full space and in a rank-1 subspace; then a state-dict round trip into a fresh
    optimizer continues bit for bit."""
    ours_cls = OPTIMS[rule][0]
    if any((rule, key) in UNSUPPORTED for key, value in kwargs.items() if value):
        pytest.skip(f"{kwargs} is not supported")
    sign = -1.0 if kwargs.get("maximize") else 1.0
    W = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = ours_cls([{"params": [W], **MODES[mode]}], **{"lr": 0.05, **kwargs})
    start = quadratic(W).item()
    for _ in range(20):
        opt.zero_grad()
        (sign * quadratic(W)).backward()
        opt.step()
    moved = quadratic(W).item()
    assert moved < start, (start, moved)
    twin = torch.nn.Parameter(W.detach().clone())
    other = ours_cls([{"params": [twin], **MODES[mode]}], **{"lr": 0.05, **kwargs})
    other.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's load shares tensors of the same dtype/device
    for P, o in ((W, opt), (twin, other)):
        for _ in range(3):
            o.zero_grad()
            (sign * quadratic(P)).backward()
            o.step()
    assert torch.equal(W, twin)


def test_the_lists_of_differences_are_current():
    """Each listed difference still names one of torch's inputs (so that the lists cannot go stale)."""
    descs = {desc for rule in OPTIMS for _, desc, _ in error_inputs(rule)}
    assert set(OWN_MESSAGES) | ACCEPTED <= descs
    assert {(rule, key) for rule in OPTIMS for _, _, kwargs in inputs(rule) for key in kwargs} >= UNSUPPORTED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert re.compile(OWN_MESSAGES["weight_decay should > 0"])
