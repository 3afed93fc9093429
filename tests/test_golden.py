"""The optimizers reproduce, bit for bit, the runs recorded in tests/data/golden/ (see tests/golden.py).

The golden files were written by the code before its restructuring into the package ``golore_lab.optim``; a
restructuring changes no arithmetic, so the parameters and state dicts must be equal exactly (``torch.equal``,
same dtype), not within a tolerance. They hold only on the torch build and CPU that wrote them (BLAS and LAPACK
round by machine); rewrite them with ``python tests/golden.py`` after a deliberate change of the arithmetic.
"""
from __future__ import annotations

import math

import pytest
import torch

import golden

#: param-group keys added since the golden files were written, with the value an old state dict stands for
ADDED_GROUP_KEYS = {"maximize": False}


def load(case):
    return torch.load(golden.GOLDEN / f"{case}.pt", weights_only=True)


def assert_same(new, old, where="state_dict"):
    """``new`` equals ``old`` exactly: tensors by value and dtype, numbers (NaN included) and containers alike."""
    if isinstance(old, torch.Tensor):
        assert isinstance(new, torch.Tensor) and new.dtype == old.dtype and new.shape == old.shape, where
        assert torch.equal(new, old), where
    elif isinstance(old, dict):
        assert isinstance(new, dict) and set(new) == set(old), (where, sorted(new), sorted(old))
        for key in old:
            assert_same(new[key], old[key], f"{where}[{key!r}]")
    elif isinstance(old, (list, tuple)):
        assert isinstance(new, (list, tuple)) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(old, float) and math.isnan(old):
        assert isinstance(new, float) and math.isnan(new), where
    else:
        assert new == old and type(new) is type(old), (where, new, old)


def without_added_keys(state_dict):
    """``state_dict`` without :data:`ADDED_GROUP_KEYS`, each checked to hold the value an old dict stands for."""
    groups = []
    for group in state_dict["param_groups"]:
        for key, value in ADDED_GROUP_KEYS.items():
            assert group.get(key, value) == value, (key, group.get(key))
        groups.append({k: v for k, v in group.items() if k not in ADDED_GROUP_KEYS})
    return {**state_dict, "param_groups": groups}


@pytest.mark.parametrize("case", golden.CASES)
def test_run_reproduces_the_golden_file(case):
    old = load(case)
    new = golden.run(case)
    assert_same(new["half"], old["half"], "half")
    assert_same(without_added_keys(new["state_dict"]), old["state_dict"])
    assert_same(new["final"], old["final"], "final")
    assert new["switch_log"] == old["switch_log"]


@pytest.mark.parametrize("case", golden.CASES)
def test_old_state_dict_resumes_bit_identically(case):
    old = load(case)
    params = [torch.nn.Parameter(p.clone()) for p in old["half"]]
    params, opt = golden.make(case, params)
    opt.load_state_dict(old["state_dict"])
    golden.advance(params, opt, golden.HALF, golden.STEPS, golden.signal_of(case))
    assert_same([p.detach() for p in params], old["final"], "final")
    assert [(r["position"], r["step"]) for r in opt.switch_log()] == old["switch_log"]


def test_golden_runs_exercise_what_they_guard():
    """The SGD auto cases switch within the run (so the switch is under test) and the methods differ."""
    assert load("sgd-auto-per-tensor")["switch_log"] and load("sgd-auto-foreach")["switch_log"]
    finals = {case: load(case)["final"][0] for case in golden.CASES if case.endswith("per-tensor")}
    assert not torch.equal(finals["adamw-svd-per-tensor"], finals["adamw-random-per-tensor"])
    assert not torch.equal(finals["adamw-svd-per-tensor"], finals["adamw-switch-per-tensor"])
