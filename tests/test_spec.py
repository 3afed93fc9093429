"""golore_lab.spec: one check of every setting (named in each message), the switch given two ways, and the
param-group helper that decides which matrices train in a subspace."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from golore_lab import SubspaceAdamW, SubspaceModel, describe_param_groups, subspace_param_groups
from golore_lab.methods import parse
from golore_lab.spec import (SUBSPACE_DEFAULTS, check_adamw, check_lr, check_sgd, check_subspace,
                             param_group_choices, resolve_switch, select_linears)


# ---------------------------------------------------------------------------------------------- the settings
@pytest.mark.parametrize("key, value, message", [
    ("rank", 0, r"Invalid rank: 0 \(must be an integer >= 1\)"),
    ("rank", True, r"Invalid rank: True"),
    ("rank", 2.0, r"Invalid rank: 2.0"),
    ("update_proj_gap", True, r"Invalid update_proj_gap: True \(must be an integer >= 1\)"),
    ("update_proj_gap", np.float64(5), r"Invalid update_proj_gap: (np.float64\()?5.0"),
    ("scale", 0, r"Invalid scale: 0 \(must be a finite number > 0\)"),
    ("scale", float("inf"), r"Invalid scale: inf"),
    ("scale", "1", r"Invalid scale: '1'"),
    ("proj_type", "up", r"Invalid proj_type: 'up' \(must be one of 'std', 'reverse_std', 'left', 'right'\)"),
    ("projection", "pca", r"Invalid projection: 'pca'"),
    ("switch_step", -1, r"Invalid switch_step: -1 \(must be None or an integer >= 0\)"),
    ("switch_step", False, r"Invalid switch_step: False"),
    ("state_on_refresh", "drop", r"Invalid state_on_refresh: 'drop'"),
    ("seed", 1.5, r"Invalid seed: 1.5 \(must be an integer\)"),
    ("seed", None, r"Invalid seed: None"),
    ("seed", True, r"Invalid seed: True"),
    ("total_steps", 0, r"Invalid total_steps: 0 \(must be None or an integer >= 1\)"),
    ("switch_fraction", 1.5, r"Invalid switch_fraction: 1.5 \(must be a number 0 < x <= 1"),
])
def test_each_bad_setting_is_named(key, value, message):
    settings = {"rank": 2, key: value}
    if key == "switch_fraction":
        settings["total_steps"] = 10
    with pytest.raises(ValueError, match=message):
        check_subspace(settings)


def test_numpy_scalars_become_python_numbers():
    out = check_subspace({"rank": np.int64(4), "update_proj_gap": np.int32(10), "scale": np.float32(0.25),
                          "seed": np.uint16(3), "switch_fraction": np.float64(0.5), "total_steps": np.int64(9)})
    assert out == {**SUBSPACE_DEFAULTS, "rank": 4, "update_proj_gap": 10, "scale": 0.25, "seed": 3,
                   "switch_fraction": 0.5, "total_steps": 9, "switch_step": parse("golore@50").switch_step(9)}
    assert all(type(out[k]) in (int, float) for k in ("rank", "update_proj_gap", "scale", "seed", "switch_step"))


def test_switch_resolution_is_the_method_names():
    """Every golore@X of the method names, over several run lengths (rounding halves to even, as round())."""
    for percent in (1, 20, 25, 50, 75, 100, 12.5):
        for total in (1, 7, 10, 999, 1000):
            got = resolve_switch(None, percent / 100, total)["switch_step"]
            assert got == parse(f"golore@{percent:g}").switch_step(total), (percent, total)
    assert resolve_switch(None, 0.2, 1000)["switch_step"] == 800
    assert resolve_switch(800, 0.2, 1000)["switch_step"] == 800
    assert resolve_switch(7, None, None) == {"switch_step": 7, "switch_fraction": None, "total_steps": None}


# ---------------------------------------------------------------------------------------------- rule hyper-parameters
def test_learning_rate():
    lr = torch.tensor(0.01)
    assert check_lr(lr) is lr and check_lr(np.float32(0.5)) == 0.5 and type(check_lr(np.float32(0.5))) is float
    for shape in ((1,), (1, 1)):  # one element, any shape, as torch.optim takes it
        one = torch.full(shape, 0.01)
        assert check_lr(one) is one
    for bad, shown in [(-1.0, r"-1.0"), (float("nan"), r"nan"), (True, r"True"), ("0.1", r"'0.1'"),
                       (torch.tensor([0.1, 0.2]), r"tensor\(\[0.1000, 0.2000\]\)"), (torch.tensor(2), r"tensor\(2\)")]:
        with pytest.raises(ValueError, match=r"Invalid learning rate: " + shown):
            check_lr(bad)


def test_rule_checks_name_the_value():
    base = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    assert check_adamw({**base, "betas": [np.float64(0.8), 0.9]})["betas"] == (0.8, 0.9)
    for change, message in [({"betas": (0.9,)}, r"Invalid betas: \(0.9,\) \(must be a pair\)"),
                            ({"betas": (0.9, 1.0)}, r"Invalid beta parameter at index 1: 1.0"),
                            ({"eps": -1.0}, r"Invalid epsilon value: -1.0"),
                            ({"weight_decay": float("inf")}, r"Invalid weight_decay: inf")]:
        with pytest.raises(ValueError, match=message):
            check_adamw({**base, **change})
    sgd = {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    assert check_sgd({**sgd, "nesterov": np.bool_(True)})["nesterov"] is True
    for change, message in [({"momentum": -0.1}, r"Invalid momentum value: -0.1"),
                            ({"dampening": None}, r"Invalid dampening value: None"),
                            ({"nesterov": 1}, r"Invalid nesterov: 1 \(must be True or False\)"),
                            ({"nesterov": True, "dampening": 0.1}, r"Nesterov momentum requires")]:
        with pytest.raises(ValueError, match=message):
            check_sgd({**sgd, **change})


# ---------------------------------------------------------------------------------------------- what gets a rank
class Tiny(nn.Module):
    """An LM in miniature: embedding, two blocks (attention q and o, an MLP), a norm, a head smaller than the rank."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(16, 16), "o": nn.Linear(16, 16, bias=False),
                                                   "mlp": nn.Linear(16, 32)}) for _ in range(2))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)


def test_subspace_param_groups_splits_by_name_shape_and_target():
    model = Tiny()
    groups = subspace_param_groups(model, rank=4, target_modules=["blocks"], update_proj_gap=50)
    sub, full = groups
    assert sub["param_names"] == ["blocks.0.q.weight", "blocks.0.o.weight", "blocks.0.mlp.weight",
                                  "blocks.1.q.weight", "blocks.1.o.weight", "blocks.1.mlp.weight"]
    assert (sub["rank"], sub["update_proj_gap"]) == (4, 50)
    assert set(full) == {"params", "param_names"}
    assert full["param_names"] == ["embed.weight", "blocks.0.q.bias", "blocks.0.mlp.bias", "blocks.1.q.bias",
                                   "blocks.1.mlp.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    named = dict(model.named_parameters())
    assert all(p is named[n] for g in groups for n, p in zip(g["param_names"], g["params"]))
    # every Linear by default; the head (3 × 16) is smaller than the rank and stays in the full space
    sub, full = subspace_param_groups(model, rank=4)
    assert "head.weight" in full["param_names"] and len(sub["params"]) == 6
    # a predicate; min_dim: every block matrix has min(m, n) = 16, so 16 keeps them all and 17 none
    sub, _ = subspace_param_groups(model, rank=2, target_modules=lambda name, m: name.endswith("mlp"))
    assert sub["param_names"] == ["blocks.0.mlp.weight", "blocks.1.mlp.weight"]
    sub, full = subspace_param_groups(model, rank=2, min_dim=16)
    assert len(sub["params"]) == 6 and "head.weight" in full["param_names"]
    with pytest.raises(ValueError, match=r"No matrix qualifies for rank 2: .* max\(rank, min_dim\) = 17"):
        subspace_param_groups(model, rank=2, min_dim=17)
    with pytest.raises(ValueError, match=r"Target module pattern 'attn' matches no nn.Linear of Tiny"):
        subspace_param_groups(model, rank=2, target_modules=["attn"])
    with pytest.raises(ValueError, match=r"Invalid update_proj_gap: 0"):
        subspace_param_groups(model, rank=2, update_proj_gap=0)


def test_describe_lists_every_parameter_and_why():
    groups = subspace_param_groups(Tiny(), rank=4, target_modules=["blocks.0"])
    text = describe_param_groups(groups)
    reasons = {c.name: c.reason for c in param_group_choices(groups)}
    assert reasons["blocks.0.q.weight"] == "subspace, rank 4"
    assert reasons["head.weight"] == "full space (min(m, n) = 3 < rank 4)"
    assert reasons["blocks.1.q.weight"] == "full space (not a targeted nn.Linear weight, or below min_dim)"
    assert reasons["norm.weight"] == "full space (1-d)"
    assert all(name in text for name in reasons) and "3 of 15 parameters" in text
    assert text.splitlines()[-1] == f"3 of 15 parameters ({16 * 16 * 2 + 32 * 16} of "\
        f"{sum(p.numel() for p in Tiny().parameters())} numbers) in a subspace"


def test_groups_train_and_agree_with_the_wrapper_positions():
    """The optimizer over the helper's groups and SubspaceModel over the same targets draw the same random bases
    (the rank group's order is the wrapper's default positions) and take the same steps."""
    torch.manual_seed(0)
    reference, wrapped_net = Tiny().double(), Tiny().double()
    wrapped_net.load_state_dict(reference.state_dict())
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    groups = subspace_param_groups(reference, rank=3, target_modules=["blocks"], update_proj_gap=2,
                                   projection="random", scale=0.5)
    opt = SubspaceAdamW(groups, lr=0.05)
    wrapped = SubspaceModel(wrapped_net, rank=3, target_modules=["blocks"], update_proj_gap=2,
                            projection="random", scale=0.5)
    torch_opt = torch.optim.AdamW(wrapped.parameters(), lr=0.05, weight_decay=0.0)
    wrapped.attach(torch_opt)
    assert list(wrapped.layers) == [n.removesuffix(".weight") for n in groups[0]["param_names"]]
    g = torch.Generator().manual_seed(1)

    def loss(model, x):
        h = model.embed(x).sum(1)
        for block in model.blocks:
            h = torch.tanh(block["o"](torch.tanh(block["q"](h)))) + block["mlp"](h)[:, :16]
        return model.head(model.norm(h)).square().mean()

    for _ in range(5):
        x = torch.randint(0, 50, (4, 3), generator=g)
        loss(reference, x).backward()
        if wrapped.refresh_due():
            wrapped.refresh(torch_opt)
        loss(wrapped.model, x).backward()
        for o in (opt, torch_opt):
            o.step()
            o.zero_grad()
    merged = wrapped.merged_state_dict()
    diff = max(float((merged[k] - v).abs().max()) for k, v in reference.state_dict().items())
    moved = max(float((v - initial[k]).abs().max()) for k, v in reference.state_dict().items())
    assert diff < 1e-12 and moved > 0.01


def test_select_linears_keeps_module_order_and_names_what_is_wrong():
    model = Tiny()
    assert [n for n, _ in select_linears(model, [model.head, model.blocks[0]["q"]])] == ["blocks.0.q", "head"]
    assert [n for n, _ in select_linears(model, "head")] == ["head"]
    with pytest.raises(ValueError, match=r"Target module Embedding Embedding\(50, 16\) is not an nn.Linear of Tiny"):
        select_linears(model, [model.embed])
