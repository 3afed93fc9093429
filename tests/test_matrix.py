"""One test matrix over every path, in the manner of torch's ``OptimizerInfo`` database
(``torch/testing/_internal/common_optimizers.py``): each path is a :class:`PathInfo` record, and the same error,
state-dict round-trip, deepcopy / pickle, hook and cross-path equality tests run on each one (with each rule).

Paths: ``per-tensor`` and ``foreach`` (the two phase-1/phase-2 routes of a rank group), ``fused`` (full-space AdamW
in torch's fused kernel), ``fsdp`` (FSDP2 ``fully_shard`` over a one-rank gloo group in this process: the
parameters are row-sharded DTensors and every step takes the sharded operations), ``auto`` (GoLore@auto) and
``auto-fsdp``, the same on the left (sharded) side (``*-left``), and ``wrapper`` / ``auto-wrapper``
(:class:`golore_lab.SubspaceModel` trained by a torch optimizer). A test that does
not apply to a path says why in :data:`NOT_APPLICABLE`. The two-rank FSDP runs are ``tests/test_fsdp.py``'s.

Cross-path tolerances: float64 throughout; paths that group the same BLAS/LAPACK work differently (a stacked
``bmm``, the Gram matrix's eigenvectors instead of an SVD) agree to float64 rounding, ~1e-16 per operation; 1e-10
over 12 steps leaves room for Adam's division by √v while any algorithmic slip (a wrong basis, transport or bias
correction) changes the parameters by O(lr) = O(1e-2).
"""
from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from golore_lab import SubspaceAdamW, SubspaceModel, SubspaceSGD

RULES = {"adamw": (SubspaceAdamW, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1)),
         "sgd": (SubspaceSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01))}
GAP, STEPS = 5, 12
TOL = 1e-10


@dataclass(frozen=True)
class PathInfo:
    """One path: the matrices' group keys, whether they are sharded, whether the matrices are full-space (the
    fused kernel) or wrapped, which rules apply, and the path (or torch optimizer) whose trajectory it follows."""

    name: str
    group: dict = field(default_factory=dict)
    sharded: bool = False
    wrapper: bool = False
    rules: tuple = ("adamw", "sgd")
    reference: str | None = None
    tolerance: float = 0.0
    hyper: dict = field(default_factory=dict)  # rule hyper-parameters this path needs (also given to its reference)

    @property
    def full_space(self) -> bool:
        return "rank" not in self.group and not self.wrapper


SUBSPACE = {"rank": 2, "update_proj_gap": GAP, "proj_type": "right"}  # "right": what FSDP2's "std" picks
AUTO = {**SUBSPACE, "switch_step": "auto"}
PATHS = {info.name: info for info in [
    PathInfo("per-tensor", {**SUBSPACE, "foreach": False}),
    PathInfo("foreach", {**SUBSPACE, "foreach": True}, reference="per-tensor", tolerance=TOL),
    PathInfo("fused", {"foreach": False}, rules=("adamw",), reference="torch-fused"),
    PathInfo("fsdp", dict(SUBSPACE), sharded=True, reference="per-tensor", tolerance=TOL),
    PathInfo("auto", dict(AUTO)),
    PathInfo("auto-fsdp", dict(AUTO), sharded=True, reference="auto", tolerance=TOL),
    # the sharded side projected: R (and GoLore@auto's probe view) all-reduced at every step, the basis's local rows
    PathInfo("per-tensor-left", {**SUBSPACE, "proj_type": "left", "foreach": False}),
    PathInfo("fsdp-left", {**SUBSPACE, "proj_type": "left"}, sharded=True, reference="per-tensor-left",
             tolerance=TOL),
    PathInfo("auto-left", {**AUTO, "proj_type": "left"}),
    PathInfo("auto-fsdp-left", {**AUTO, "proj_type": "left"}, sharded=True, reference="auto-left", tolerance=TOL),
    # torch.optim.SGD's coupled decay would decay the wrapper's factors, not the weights: the wrapper refuses it
    PathInfo("wrapper", dict(SUBSPACE), wrapper=True, reference="per-tensor", tolerance=TOL,
             hyper={"weight_decay": 0.0}),
    PathInfo("auto-wrapper", dict(AUTO), wrapper=True, reference="auto", tolerance=TOL, hyper={"weight_decay": 0.0}),
]}
NOT_APPLICABLE = {
    ("round_trip", "wrapper"): "the wrapper's checkpoints are the model's and torch's optimizer's (test_wrapper.py)",
    ("round_trip", "auto-wrapper"): "as for wrapper",
    ("copies", "fsdp"): "an FSDP2 module holds communication state; deepcopy of a sharded model is not supported",
    ("copies", "auto-fsdp"): "as for fsdp",
    ("copies", "fsdp-left"): "as for fsdp",
    ("copies", "auto-fsdp-left"): "as for fsdp",
    ("copies", "wrapper"): "the optimizer is torch's own",
    ("copies", "auto-wrapper"): "as for wrapper",
    ("hooks", "wrapper"): "the optimizer is torch's own",
    ("hooks", "auto-wrapper"): "as for wrapper",
}
CASES = [(path, rule) for path, info in PATHS.items() for rule in info.rules]


def applies(test, path):
    if (test, path) in NOT_APPLICABLE:
        pytest.skip(NOT_APPLICABLE[test, path])


class Net(nn.Module):
    """Matrices (8, 6), (8, 8), (8, 8), (6, 8) in ``layers`` (the blocks FSDP2 shards; the two (8, 8) share a
    ``foreach`` stack) and their biases."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-rank gloo process group for the FSDP2 paths (file store; loopback only)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def world(request):
    """Request the process group only for the sharded paths."""
    if PATHS[request.node.callspec.params["path"]].sharded:
        request.getfixturevalue("process_group")


class Run:
    """One path's model and optimizer; :meth:`step` takes one training step on the data of step ``t``."""

    def __init__(self, path: str, rule: str, seed: int = 0, hyper: dict | None = None, **overrides):
        info = self.info = PATHS[path]
        cls, _, hyper = RULES[rule][0], None, {**RULES[rule][2], **info.hyper, **(hyper or {})}
        torch.manual_seed(seed)
        self.model = Net().double()
        if info.sharded:
            from golore_lab.distributed import shard_model
            shard_model(self.model)
        mats = [layer.weight for layer in self.model.layers]
        biases = [layer.bias for layer in self.model.layers]
        settings = {**info.group, **overrides}
        if info.wrapper:
            subspace = {k: v for k, v in settings.items() if k != "foreach"}
            self.model = SubspaceModel(self.model, target_modules=["layers"], seed=3, **subspace)
            self.opt = RULES[rule][1](self.model.parameters(), **hyper)
            self.model.attach(self.opt)
            return
        self.opt = cls([{"params": mats, **settings}, {"params": biases}], seed=3, **hyper)

    @staticmethod
    def data(t: int):
        g = torch.Generator().manual_seed(100 + t)
        return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 6, generator=g, dtype=torch.float64)

    def step(self, t: int) -> None:
        x, y = self.data(t)
        ((self.model(x) - y) ** 2).mean().backward()
        if self.info.wrapper and self.model.refresh_due():
            self.model.refresh(self.opt)
        self.opt.step()
        self.opt.zero_grad()

    def steps(self, start: int, stop: int) -> "Run":
        for t in range(start, stop):
            self.step(t)
        return self

    def weights(self) -> list[torch.Tensor]:
        """The full parameters (matrices merged for the wrapper, gathered for FSDP2), in the plain model's order."""
        model = self.model
        if self.info.wrapper:
            merged = model.merged_state_dict()
            return [merged[f"layers.{i}.{kind}"].clone() for i in range(len(model.model.layers))
                    for kind in ("weight", "bias")]
        return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
                for p in model.parameters()]


def reference_weights(reference: str, rule: str, hyper: dict) -> list[torch.Tensor]:
    if reference != "torch-fused":
        return Run(reference, rule, hyper=hyper).steps(0, STEPS).weights()
    torch.manual_seed(0)
    model = Net().double()
    opt = RULES[rule][1](model.parameters(), fused=True, **RULES[rule][2])
    for t in range(STEPS):
        x, y = Run.data(t)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("path, rule", CASES)
def test_cross_path_equality(path, rule, world):
    info = PATHS[path]
    if info.reference is None:
        pytest.skip("a reference path: the others are compared with it")
    mine, theirs = Run(path, rule).steps(0, STEPS).weights(), reference_weights(info.reference, rule, info.hyper)
    for a, b in zip(mine, theirs):
        if info.tolerance:
            torch.testing.assert_close(a, b, rtol=info.tolerance, atol=info.tolerance)
        else:
            assert torch.equal(a, b)
    assert not torch.equal(mine[0], Run(path, rule).weights()[0])  # it trained


ERRORS = [  # (group override, message): the same settings are refused the same way on every path
    ({"rank": 0}, r"Invalid rank: 0 \(must be an integer >= 1\)"),
    ({"update_proj_gap": 0}, r"Invalid update_proj_gap: 0"),
    ({"scale": -1.0}, r"Invalid scale: -1.0"),
    ({"proj_type": "diagonal"}, r"Invalid proj_type: 'diagonal'"),
    ({"rank": 7}, r"Invalid rank: 7 exceeds min\(m, n\) = 6"),
    ({"switch_step": -2}, r"Invalid switch_step: -2"),
]
OPTIMIZER_ERRORS = [  # the optimizer's own keys (the wrapper's optimizer is torch's)
    ({"rnak": 2}, r"Unknown param-group key 'rnak': did you mean 'rank'\?"),
    ({"lr": -1.0}, r"Invalid learning rate: -1.0"),
    ({"lr": torch.tensor([0.1, 0.2])}, r"Invalid learning rate: tensor"),
    ({"amsgrad": True}, r"Invalid amsgrad: True"),
]


@pytest.mark.parametrize("path, rule", CASES)
def test_errors(path, rule, world):
    info = PATHS[path]
    errors = ([] if info.full_space else ERRORS) + ([] if info.wrapper else OPTIMIZER_ERRORS)
    for override, message in errors:
        with pytest.raises(ValueError, match=message):
            Run(path, rule, **override)
    if info.full_space:
        return

    def doubled(grad, rank, side, generator):  # a projector whose basis is 2·I: refused at its first refresh
        return 2 * torch.eye(grad.shape[1] if side == "right" else grad.shape[0], dtype=grad.dtype)[:, :rank]

    run = Run(path, rule, projection=doubled, switch_step=None)
    with pytest.raises(ValueError, match=r"returned a basis without orthonormal columns: max \|PᵀP − I\| = 3"):
        run.step(0)


def saved(run: Run):
    """The optimizer's state dict as a checkpoint file holds it (``weights_only=True``; in memory for DTensors)."""
    state = run.opt.state_dict()
    if run.info.sharded:
        return copy.deepcopy(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("path, rule", CASES)
def test_round_trip(path, rule, world):
    """STEPS steps == STEPS/2 + state_dict + a fresh optimizer (twice loaded) + STEPS/2, bit for bit."""
    applies("round_trip", path)
    straight = Run(path, rule).steps(0, STEPS).weights()
    first = Run(path, rule).steps(0, STEPS // 2 + 1)  # mid-period
    resumed = Run(path, rule)
    with torch.no_grad():
        for p, q in zip(resumed.model.parameters(), first.model.parameters()):
            p.copy_(q)
    checkpoint = saved(first)
    resumed.opt.load_state_dict(checkpoint)
    resumed.opt.load_state_dict(checkpoint)  # a second load into the same optimizer (rolling back again)
    resumed.steps(STEPS // 2 + 1, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(resumed.weights(), straight))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("path, rule", CASES)
def test_copies(path, rule, how, world):
    """A copy of (model, optimizer) -- deepcopy, or a pickle round trip -- trains exactly like the original."""
    applies("copies", path)
    run = Run(path, rule).steps(0, 3)
    twin = copy.copy(run)
    twin.model, twin.opt = (copy.deepcopy((run.model, run.opt)) if how == "deepcopy"
                            else pickle.loads(pickle.dumps((run.model, run.opt))))
    run.steps(3, STEPS)
    twin.steps(3, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(twin.weights(), run.weights()))


@pytest.mark.parametrize("path, rule", CASES)
def test_hooks(path, rule, world):
    """torch's step, state-dict and load hooks and the refresh hook, on every path."""
    applies("hooks", path)
    run = Run(path, rule)
    calls = {"pre": 0, "post": 0, "refresh": []}
    run.opt.register_step_pre_hook(lambda opt, args, kwargs: calls.__setitem__("pre", calls["pre"] + 1))
    run.opt.register_step_post_hook(lambda opt, args, kwargs: calls.__setitem__("post", calls["post"] + 1))
    run.opt.register_refresh_hook(lambda opt, refresh: calls["refresh"].append((refresh.step, refresh.kind)))
    run.steps(0, GAP + 1)
    assert calls["pre"] == calls["post"] == GAP + 1
    if PATHS[path].full_space:
        assert calls["refresh"] == []
    else:
        assert sorted({step for step, _ in calls["refresh"]}) == [0, GAP]
        assert {kind for step, kind in calls["refresh"] if step == 0} == {"svd"}
    seen = []
    run.opt.register_state_dict_post_hook(lambda opt, sd: seen.append(len(sd["param_groups"])))
    checkpoint = run.opt.state_dict()
    run.opt.register_load_state_dict_pre_hook(lambda opt, sd: [g.__setitem__("lr", 0.002) for g in
                                                               sd["param_groups"]] and None)
    run.opt.register_load_state_dict_post_hook(lambda opt: seen.append([g["lr"] for g in opt.param_groups]))
    run.opt.load_state_dict(checkpoint)
    assert seen == [2, [0.002, 0.002]]
    run.steps(GAP + 1, GAP + 2)
