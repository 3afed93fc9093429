"""The model wrapper: the optimizer path's trajectory, scale once, resume, merged checkpoints, errors, DDP."""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from golore_lab import SubspaceAdamW, SubspaceSGD, microbatches
from golore_lab.wrapper import SubspaceModel

TOL = 1e-12


class Net(nn.Module):
    """Linears of both orientations: attn (12, 8) is projected on the right, mlp.0 (6, 12) on the left."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.attn = nn.Linear(8, 12, bias=False)
        self.mlp = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 10))
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mlp(torch.tanh(self.attn(torch.tanh(self.embed(x)))))))


def split_groups(reference: nn.Module, wrapped: SubspaceModel, **subspace) -> list[dict]:
    """The optimizer path's groups on ``reference``: the wrapped layers' weights (in module order) first."""
    mats = [reference.get_submodule(name).weight for name in wrapped.layers]
    others = [p for p in reference.parameters() if all(p is not q for q in mats)]
    return [{"params": mats, **subspace}, {"params": others}]


def batch(g: torch.Generator, n: int = 16):
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def make_pair(rule: str, subspace: dict, hyper: dict, seed: int = 0):
    """The same network twice: wrapped (with a torch optimizer) and plain (with the subspace optimizer)."""
    torch.manual_seed(seed)
    base = Net().double()
    reference = copy.deepcopy(base)
    wrapped = SubspaceModel(base, target_modules=["attn", "mlp"], **subspace)
    groups = split_groups(reference, wrapped, **subspace)
    if rule == "adamw":
        ref_opt = SubspaceAdamW(groups, lr=0.05, **hyper)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=0.05, **{"weight_decay": 0.0, **hyper})
    else:
        ref_opt = SubspaceSGD(groups, lr=0.05, **hyper)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, **hyper)
    wrapped.attach(opt)
    return wrapped, opt, reference, ref_opt


def train_step(wrapped, opt, g, k=1):
    for _ in range(k):
        x, y = batch(g)
        (loss_fn(wrapped, x, y) / k).backward()
    if wrapped.refresh_due():
        wrapped.refresh(opt)
    opt.step()
    opt.zero_grad()


def same_state(a: dict, b: dict) -> bool:
    """Two wrapper state dicts hold equal tensors and equal layer steps (``_extra_state``)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


CASES = {
    "adamw-svd-decay": ("adamw", {}, {"weight_decay": 0.1}),
    "adamw-switch-large-batch": ("adamw", {"switch_step": 12, "large_batch": 3}, {"betas": (0.8, 0.95)}),
    "adamw-random-reset": ("adamw", {"projection": "random", "state_on_refresh": "reset"}, {}),
    "adamw-switch-golore-before-forward": ("adamw", {"switch_step": 8, "before_forward": True}, {"weight_decay": 0.1}),
    "adamw-keep-left": ("adamw", {"state_on_refresh": "keep", "proj_type": "left"}, {}),
    "sgd-momentum": ("sgd", {}, {"momentum": 0.9}),
    "sgd-nesterov-random-reverse": ("sgd", {"projection": "random", "proj_type": "reverse_std"},
                                    {"momentum": 0.9, "nesterov": True}),
    "sgd-paper-msgd-switch-reset": ("sgd", {"switch_step": 8, "state_on_refresh": "reset"},
                                    {"momentum": 0.5, "dampening": 0.5}),
}


@pytest.mark.parametrize("case", CASES)
def test_follows_optimizer_path(case):
    """Same data and seed: the merged weights equal the optimizer path's after every step (6 refreshes)."""
    rule, extra, hyper = CASES[case]
    extra = dict(extra)
    large = extra.pop("large_batch", 1)
    early = extra.pop("before_forward", False)
    subspace = {"rank": 3, "update_proj_gap": 4, "scale": 0.5, **extra}
    wrapped, opt, reference, ref_opt = make_pair(rule, subspace, hyper)
    initial = copy.deepcopy(reference.state_dict())
    g = torch.Generator().manual_seed(1)
    for _ in range(22):
        k = microbatches(ref_opt, base=1, refresh=large)
        assert wrapped.refresh_due() == ref_opt.refresh_due()
        if early and wrapped.refresh_due() and not wrapped.refresh_needs_gradient():
            assert wrapped.refresh(opt) == 0 and not wrapped.refresh_due()   # GoLore: refresh before the forward
        for _ in range(k):
            x, y = batch(g)
            (loss_fn(reference, x, y) / k).backward()
            (loss_fn(wrapped, x, y) / k).backward()
        if wrapped.refresh_due():
            wrapped.refresh(opt)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
        assert max_diff(wrapped.merged_state_dict(), reference.state_dict()) < TOL
    assert max_diff(wrapped.merged_state_dict(), initial) > 0.05         # it did train


def test_scale_applied_once_and_factor_gradient_is_projected():
    """One SGD step of a refresh moves W by −lr·scale·P Pᵀ G; between refreshes factor.grad == Pᵀ G (no scale)."""
    torch.manual_seed(0)
    net = Net().double()
    wrapped = SubspaceModel(net, rank=2, target_modules=["mlp.0"], scale=4.0, update_proj_gap=10, proj_type="left")
    layer = wrapped.layers["mlp.0"]
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped.attach(opt)
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x, y = batch(g)
        plain = copy.deepcopy(net)
        plain.mlp[0] = nn.Linear(12, 6).double()
        plain.mlp[0].load_state_dict({"weight": layer.merged_weight(), "bias": layer.bias.detach()})
        loss_fn(plain, x, y).backward()
        G = plain.mlp[0].weight.grad                                        # (6, 12)
        before = layer.merged_weight()
        loss_fn(wrapped, x, y).backward()
        if wrapped.refresh_due():
            wrapped.refresh(opt)
        P = layer.proj                                                      # (6, 2)
        assert torch.allclose(layer.factor.grad, P.T @ G, atol=TOL)
        opt.step()
        opt.zero_grad()
        assert torch.allclose(layer.merged_weight() - before, -0.1 * 4.0 * P @ P.T @ G, atol=TOL)


def test_momentum_is_projected_and_stored():
    """After a refresh the optimizer's momentum_buffer is P_newᵀ P_old M, in the optimizer's own state."""
    torch.manual_seed(0)
    wrapped = SubspaceModel(Net().double(), rank=2, target_modules=["mlp.0"], update_proj_gap=2, proj_type="left")
    layer = wrapped.layers["mlp.0"]
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    wrapped.attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        train_step(wrapped, opt, g)
    old_p, old_m = layer.proj.clone(), opt.state[layer.factor]["momentum_buffer"].clone()
    x, y = batch(g)
    loss_fn(wrapped, x, y).backward()
    wrapped.refresh(opt)
    assert not torch.allclose(layer.proj, old_p)
    assert torch.allclose(opt.state[layer.factor]["momentum_buffer"], layer.proj.T @ old_p @ old_m, atol=TOL)


def save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("rule", ["adamw", "sgd"])
def test_resume_is_bit_identical(rule):
    """Save wrapper + optimizer mid-run (between refreshes), load into fresh objects: the same bits after."""
    subspace = {"rank": 3, "update_proj_gap": 4, "scale": 0.5, "switch_step": 8}
    hyper = {"weight_decay": 0.1} if rule == "adamw" else {"momentum": 0.9}
    straight, opt, _, _ = make_pair(rule, subspace, hyper)
    g = torch.Generator().manual_seed(1)
    for _ in range(14):
        train_step(straight, opt, g)

    first, opt1, _, _ = make_pair(rule, subspace, hyper)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        train_step(first, opt1, g)
    checkpoint = save_load({"model": first.state_dict(), "optimizer": opt1.state_dict(), "rng": g.get_state()})
    resumed, opt2, _, _ = make_pair(rule, subspace, hyper, seed=123)   # different initial weights, overwritten
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["optimizer"])
    g = torch.Generator()
    g.set_state(checkpoint["rng"])
    for _ in range(8):
        train_step(resumed, opt2, g)
    a, b = straight.state_dict(), resumed.state_dict()
    for key in a:
        if key.endswith("_extra_state"):
            assert a[key] == b[key] == {"step": 14}
        else:
            assert torch.equal(a[key], b[key]), key


def test_merged_checkpoint_loads_into_the_unwrapped_model():
    subspace = {"rank": 3, "update_proj_gap": 4, "scale": 2.0}
    wrapped, opt, _, _ = make_pair("adamw", subspace, {})
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        train_step(wrapped, opt, g)
    state = save_load(wrapped.merged_state_dict())
    plain = Net().double()
    plain.load_state_dict(state)                                     # strict: exactly nn.Linear's keys
    x, _ = batch(g)
    with torch.no_grad():
        assert torch.allclose(plain(x), wrapped(x), atol=TOL)
    assert all(isinstance(m, nn.Linear) for m in (plain.attn, plain.mlp[0], plain.mlp[2]))


def test_ddp_ignores_frozen_weights_and_bases():
    torch.manual_seed(0)
    wrapped = SubspaceModel(Net().double(), rank=2, target_modules=["attn"])
    assert set(wrapped._ddp_params_and_buffers_to_ignore) == {"model.attn.weight", "model.attn.proj"}
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert "model.attn.factor" in trainable and not any(n.endswith("attn.weight") for n in trainable)


# ---------------------------------------------------------------- errors, each naming the layer or value


def test_pattern_matching_nothing():
    with pytest.raises(ValueError, match=r"pattern 'attention' matches no nn.Linear of Net"):
        SubspaceModel(Net(), rank=2, target_modules=["attn", "attention"])


def test_rank_above_layer_size():
    with pytest.raises(ValueError,
                       match=r"rank: 7 exceeds min\(m, n\) = 6 of parameter 'mlp.0.weight' with shape \(6, 12\)"):
        SubspaceModel(Net(), rank=7, target_modules=["mlp"])


@pytest.mark.parametrize("bad, message", [
    ({"rank": 0}, "Invalid rank: 0"), ({"update_proj_gap": 0}, "Invalid update_proj_gap: 0"),
    ({"scale": 0}, "Invalid scale: 0"), ({"proj_type": "up"}, "Invalid proj_type: 'up'"),
    ({"projection": "pca"}, "Invalid projection: 'pca'"), ({"state_on_refresh": "drop"}, "Invalid state_on_refresh"),
    ({"update_proj_gap": True}, "Invalid update_proj_gap: True"), ({"seed": 1.5}, "Invalid seed: 1.5"),
    ({"seed": "a"}, "Invalid seed: 'a'"), ({"rank": None}, "Invalid rank: None"),
    ({"switch_step": 3, "switch_fraction": 0.5, "total_steps": 10}, "Conflicting switch: switch_step=3 but"),
    ({"positions": {"attn": -1}}, "Invalid position of layer 'attn': -1"),
])
def test_invalid_arguments(bad, message):
    """The optimizer path's checks and messages (golore_lab.spec), including what the wrapper used to let through."""
    with pytest.raises(ValueError, match=message):
        SubspaceModel(Net(), **{"rank": 2, "target_modules": ["attn"], **bad})


def test_numpy_numbers_and_switch_fraction():
    np = pytest.importorskip("numpy")
    wrapped = SubspaceModel(Net(), rank=np.int64(2), target_modules=["attn"], scale=np.float32(0.5),
                            update_proj_gap=np.int64(4), switch_fraction=0.25, total_steps=40)
    layer = wrapped.layers["attn"]
    assert (type(layer.rank), type(layer.scale), type(wrapped.update_proj_gap)) == (int, float, int)
    assert wrapped.switch_step == 30 and layer.scale == 0.5


@pytest.mark.parametrize("targets", [
    ["attn", "mlp.0"],
    lambda name, module: name in ("attn", "mlp.0"),
    "targets_as_modules",
])
def test_target_modules_as_substrings_predicate_or_modules(targets):
    net = Net()
    if targets == "targets_as_modules":
        targets = [net.mlp[0], net.attn]                     # any order: layers follow the model's module order
    wrapped = SubspaceModel(net, rank=2, target_modules=targets)
    assert list(wrapped.layers) == ["attn", "mlp.0"]
    assert [layer.position for layer in wrapped.layers.values()] == [0, 1]


def test_default_targets_are_every_linear():
    assert list(SubspaceModel(Net(), rank=2).layers) == ["embed", "attn", "mlp.0", "mlp.2", "head"]


def test_target_modules_errors():
    net = Net()
    with pytest.raises(ValueError, match=r"Target module Tanh Tanh\(\) is not an nn.Linear of Net"):
        SubspaceModel(net, rank=2, target_modules=[net.mlp[1]])
    with pytest.raises(ValueError, match=r"Target module Linear .* is not an nn.Linear of Net"):
        SubspaceModel(net, rank=2, target_modules=nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"selects no nn.Linear of Net"):
        SubspaceModel(net, rank=2, target_modules=lambda name, module: False)
    with pytest.raises(ValueError, match=r"Invalid target_modules: \[1\]"):
        SubspaceModel(net, rank=2, target_modules=[1])


def test_unknown_optimizer_state_is_refused_not_skipped():
    """The carry knows torch.optim's state entries by name (rules.FIRST_MOMENTS / SECOND_MOMENTS); an entry it
    does not know is an error at the refresh, not a state silently left in the old basis."""
    wrapped = SubspaceModel(Net().double(), rank=2, target_modules=["attn"], update_proj_gap=1)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    wrapped.attach(opt)
    g = torch.Generator().manual_seed(1)
    train_step(wrapped, opt, g)
    opt.state[wrapped.layers["attn"].factor]["velocity"] = torch.zeros(1)
    x, y = batch(g)
    loss_fn(wrapped, x, y).backward()
    before = copy.deepcopy(wrapped.state_dict())  # tensors and each layer's step
    with pytest.raises(RuntimeError, match=r"layer 'attn'.s factor has entries \['velocity'\] that the wrapper "
                                           r"cannot carry .* nothing was changed"):
        wrapped.refresh(opt)
    assert same_state(before, wrapped.state_dict())


def test_bad_projector_result_is_refused_before_any_layer_changes():
    """A user projector returning r + 1 columns: refused naming the layer, no layer merged or re-based."""
    def too_wide(grad, rank, side, generator):
        dim = grad.shape[0] if side == "left" else grad.shape[1]
        return torch.eye(dim, dtype=torch.float64)[:, :rank + 1]

    def narrow_on_mlp(grad, rank, side, generator):   # fine for attn (8 columns), too wide for mlp.0
        return too_wide(grad, rank if grad.shape == (6, 12) else rank - 1, side, generator)

    wrapped = SubspaceModel(Net().double(), rank=2, target_modules=["attn", "mlp.0"], update_proj_gap=2,
                            projection=narrow_on_mlp)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped.attach(opt)
    x, y = batch(torch.Generator().manual_seed(1))
    before = copy.deepcopy(wrapped.state_dict())  # tensors and each layer's step
    loss_fn(wrapped, x, y).backward()
    with pytest.raises(ValueError, match=r"The projector <callable .*narrow_on_mlp> for layer 'mlp.0' \(left side, "
                                         r"rank 2\) returned shape \(6, 3\), torch.float64; a basis must be a floating "
                                         r"\(6, 2\) tensor; nothing was changed"):
        wrapped.refresh(opt)
    assert same_state(before, wrapped.state_dict()) and wrapped.refresh_due()


def test_refresh_without_full_gradient():
    wrapped = SubspaceModel(Net(), rank=2, target_modules=["attn"])
    opt = torch.optim.AdamW(wrapped.parameters())
    wrapped.attach(opt)
    with torch.no_grad():
        wrapped(torch.randn(4, 5))
    with pytest.raises(RuntimeError, match=r"Layer 'attn' has no full gradient for its svd refresh at step 0"):
        wrapped.refresh(opt)


def test_step_without_due_refresh_and_refresh_when_not_due():
    wrapped = SubspaceModel(Net(), rank=2, target_modules=["attn"], update_proj_gap=5)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped.attach(opt)
    wrapped(torch.randn(4, 5)).sum().backward()
    with pytest.raises(RuntimeError, match=r"Layer 'attn' is due for a refresh at step 0: call model.refresh"):
        opt.step()
    wrapped.refresh(opt)
    opt.step()
    with pytest.raises(RuntimeError, match=r"refresh\(\) called at step 1, when no layer is due"):
        wrapped.refresh(opt)
    for _ in range(4):
        opt.step()                                          # steps 1..4 with the old gradient
    wrapped(torch.randn(4, 5)).sum().backward()
    wrapped.refresh(opt)                                    # step 5, after backward
    with pytest.raises(RuntimeError, match=r"called at step 5, when no layer is due .* or refreshed already"):
        wrapped.refresh(opt)


def test_attach_rejects_what_would_break_equivalence():
    wrapped = SubspaceModel(Net(), rank=2, target_modules=["attn"])
    with pytest.raises(ValueError, match=r"Layer 'attn': SGD with weight_decay=0.1 on a factor"):
        wrapped.attach(torch.optim.SGD(wrapped.parameters(), lr=0.1, weight_decay=0.1))
    with pytest.raises(ValueError, match=r"does not hold the factor of layer 'attn'"):
        wrapped.attach(torch.optim.SGD(wrapped.model.head.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"Unsupported optimizer Adagrad"):
        wrapped.attach(torch.optim.Adagrad(wrapped.parameters()))
    opt = torch.optim.AdamW(wrapped.parameters())
    wrapped(torch.randn(4, 5)).sum().backward()
    with pytest.raises(RuntimeError, match=r"Call model.attach\(optimizer\)"):
        wrapped.refresh(opt)


# ---------------------------------------------------------------- two processes


def test_torchrun_two_ranks_hold_identical_weights(tmp_path):
    """2 gloo ranks, half a batch each, SVD then random refreshes: bitwise-equal ranks, equal to one process."""
    worker = Path(__file__).with_name("wrapper_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["steps"] == r1["steps"] == [10, 10, 10]
    assert r0["ddp_buffers"] == []                                   # W and P are never broadcast by DDP
    for key in r0["merged"]:
        assert torch.equal(r0["merged"][key], r1["merged"][key]), key
    assert max_diff(r0["merged"], r0["reference"]) < 1e-10
    full_sizes = 12 * 8 + 6 * 12 + 10 * 6
    assert r0["sent"] == r1["sent"] == 2 * full_sizes * 8   # SVD refreshes at steps 0 and 3, float64; random: none


def test_llama_follows_optimizer_path_with_default_positions():
    """On the pre-training model, ``llama_param_groups`` order == the wrapper's default positions (GoLore@50%)."""
    from golore_lab.lm.model import LlamaConfig, build_model, llama_param_groups

    cfg = LlamaConfig.preset("tiny", vocab_size=64, max_seq_len=16)
    reference, base = build_model(cfg, seed=0), build_model(cfg, seed=0)
    subspace = {"rank": 4, "update_proj_gap": 2, "scale": 0.25, "switch_step": 4}
    wrapped = SubspaceModel(base, target_modules=["attn", "mlp"], **subspace)
    assert len(wrapped.layers) == 7 * cfg.n_layers
    ref_opt = SubspaceAdamW(llama_param_groups(reference, **subspace), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    wrapped.attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=g)
        for model in (reference, wrapped):
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if wrapped.refresh_due():
            wrapped.refresh(opt)
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    assert max_diff(reference.state_dict(), build_model(cfg, seed=0).state_dict()) > 0.05   # it trained
    assert max_diff(wrapped.merged_state_dict(), reference.state_dict()) < 1e-5         # float32: measured 1.2e-7


def test_module_docstring_example_runs(tmp_path):
    """The loop in golore_lab.wrapper's docstring, as written, at toy size (GaLore then GoLore refreshes)."""
    import re

    import golore_lab.wrapper as module

    code = re.search(r"Example -- .*?::\n\n(.*?)\n\"?\"?\"?$", module.__doc__, re.S).group(1)
    code = "\n".join(line[4:] for line in code.splitlines())
    code = (code.replace("rank=128", "rank=2").replace("update_proj_gap=200", "update_proj_gap=2")
            .replace("switch_step=800", "switch_step=4").replace('"plain.pt"', "path"))
    g = torch.Generator().manual_seed(0)
    namespace = {"torch": torch, "SubspaceModel": SubspaceModel, "net": Net().double(), "path": tmp_path / "plain.pt",
                 "batches": [batch(g) for _ in range(7)], "loss_fn": lambda model, b: loss_fn(model, *b)}
    exec(code, namespace)  # noqa: S102
    assert [layer.step for layer in namespace["model"].layers.values()] == [7, 7, 7]
    Net().double().load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
