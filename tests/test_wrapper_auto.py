"""GoLore@auto on the model wrapper: the optimizer path's tests, switches and trajectory; resume; DDP; the LM program.

The problem is the counterexample (``golore_lab.counterexample``) through an ``nn.Linear``: the linear's output on
the identity is its weight transposed, so a loss f(X) + ⟨noise, X⟩ of that output gives the wrapped layer the
counterexample's stochastic gradient as its full gradient G. The wrapper never forms G between refreshes; its
statistic reads R_t from the factor's gradient and ΠᵀG from the probe factor's.

Tolerances. Weights: ``TOL`` = 1e-12, as in test_wrapper.py (float64; the two paths multiply the same numbers in
another order). The statistic's numbers are smooth functions of gradients that agree to that round-off, and on
this instance every test's t is taken from ≥ 4 pair products whose spread is far from 0 (|t| < 200), so they agree
to a relative ``STAT_REL`` = 1e-9 (a round-off of 1e-13 relative to the weights' size, amplified 1e4 times); the
decisions themselves must be equal.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from golore_lab import SubspaceAdamW, SubspaceSGD, switching
from golore_lab import counterexample as ce
from golore_lab import projection as proj
from golore_lab.wrapper import SubspaceModel
from test_wrapper import save_load

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12
STAT_REL = 1e-9


class Quadratic(nn.Module):
    """f(X) + ⟨noise, X⟩ of the counterexample, X the weight of ``lin`` (``side="left"``) or its transpose."""

    def __init__(self, problem: ce.Counterexample, side: str) -> None:
        super().__init__()
        self.problem, self.side = problem, side
        self.lin = nn.Linear(problem.n, problem.n, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(problem.x0 if side == "left" else problem.x0.T)
        self.register_buffer("eye", torch.eye(problem.n, dtype=torch.float64))

    def forward(self, sign: torch.Tensor) -> torch.Tensor:
        out = self.lin(self.eye)                                     # the weight, transposed
        X = out.T if self.side == "left" else out
        return self.problem.f(X) + (self.problem.noise_matrix(sign) * X).sum()


def make_pair(optimizer: str, side: str, lr: float, gap: int, seed: int = 0):
    """The wrapped Quadratic with a torch optimizer over all its parameters, and the plain one with the subspace
    optimizer, both GoLore@auto."""
    problem = ce.Counterexample()
    plain = Quadratic(problem, side)
    reference = copy.deepcopy(plain)
    subspace = dict(rank=problem.r, update_proj_gap=gap, proj_type=side, switch_step="auto", seed=seed)
    wrapped = SubspaceModel(plain, target_modules=["lin"], **subspace)
    if optimizer == "adamw":
        ref_opt = SubspaceAdamW([reference.lin.weight], lr=lr, eps=1e-6, **subspace)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=lr, eps=1e-6, weight_decay=0.0)
    else:
        ref_opt = SubspaceSGD([reference.lin.weight], lr=lr, **subspace)
        opt = torch.optim.SGD(wrapped.parameters(), lr=lr)
    wrapped.attach(opt)
    return wrapped, opt, reference, ref_opt


def step(wrapped, opt, signs, early=False):
    """One step of the training loop of the wrapper's docstring on ``signs`` (one micro-batch each)."""
    if early and wrapped.refresh_due() and not wrapped.refresh_needs_gradient():
        wrapped.refresh(opt)
    for sign in signs:
        (wrapped(sign) / len(signs)).backward()
    if wrapped.refresh_due():
        wrapped.refresh(opt)
    opt.step()
    opt.zero_grad()


def signs(g: torch.Generator, micro: int) -> torch.Tensor:
    return torch.randint(0, 2, (micro,), generator=g, dtype=torch.float64) * 2 - 1


def same_test(a: switching.SwitchTest | None, b: switching.SwitchTest | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.pairs == b.pairs and a.switch == b.switch and a.threshold == b.threshold
            and all(x == pytest.approx(y, rel=STAT_REL) for x, y in ((a.signal, b.signal),
                                                                       (a.random_signal, b.random_signal), (a.t, b.t))))


# SGD: the paths agree to round-off for as long as one runs them. AdamW near the optimum normalizes gradient
# entries that are pure noise, which amplifies round-off: on this instance the two paths separate (> 1e-13)
# about 170 steps after the switch, so its run stops 80 steps after it (steps 0-449, switch at 370).
CASES = {
    "sgd-left": ("sgd", "left", 3e-3, 600, 1, False),
    "sgd-right-before-forward": ("sgd", "right", 3e-3, 600, 1, True),
    "adamw-left-microbatches": ("adamw", "left", 1e-2, 450, 3, False),
    "adamw-right-before-forward": ("adamw", "right", 1e-2, 450, 1, True),
}


@pytest.mark.parametrize("case", CASES)
def test_same_tests_switch_and_trajectory_as_the_optimizer_path(case):
    """Every refresh's test (signal, random signal, t, decision), the switch log and the weights at every step."""
    optimizer, side, lr, steps, micro, early = CASES[case]
    wrapped, opt, reference, ref_opt = make_pair(optimizer, side, lr, gap=10)
    layer = wrapped.layers["lin"]
    events = []
    ref_opt.register_refresh_hook(lambda _, refresh: events.append((refresh.step, refresh.kind, refresh.test)))
    mine = []
    g = torch.Generator().manual_seed(100)
    for t in range(steps):
        if wrapped.refresh_due():
            switched = switching.switched(layer.auto_state)
            test = None if switched else switching.decide(layer.auto_state, layer.rank)
            random = switched or (test is not None and test.switch)
            mine.append((t, "random" if random else "svd", test))
        batch = signs(g, micro)
        for sign in batch:
            (reference(sign) / micro).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        step(wrapped, opt, batch, early)
        diff = (wrapped.merged_state_dict()["lin.weight"] - reference.lin.weight.detach()).abs().max()
        assert diff < TOL, (t, float(diff))
    assert len(mine) == len(events) == steps // 10
    for (t, kind, test), (ref_t, ref_kind, ref_test) in zip(mine, events):
        assert t == ref_t and kind == ref_kind and same_test(test, ref_test), (t, test, ref_test)
    (entry,) = wrapped.switch_log()
    (ref_entry,) = ref_opt.switch_log()
    assert entry.keys() == ref_entry.keys() == {"name", "position", "step", "signal", "random_signal", "t"}
    assert entry["name"] == "lin.weight" and entry["position"] == ref_entry["position"] == 0
    assert entry["step"] == ref_entry["step"] and 10 < entry["step"] < steps - 10
    for key in ("signal", "random_signal", "t"):
        assert entry[key] == pytest.approx(ref_entry[key], rel=STAT_REL), key
    assert "auto_probe" not in layer.auto_state and layer.probe_factor is not None   # the period's data dropped
    assert layer.probe_factor not in opt.state and not layer.probe_factor.any()   # held, never stepped, zero


def test_probe_factor_gradient_is_the_probes_view_and_is_cleared_before_the_step():
    """Between refreshes C.grad = Π_jᵀG (the full gradient of a plain twin), summed over micro-batches, with the
    pair's probe: a fresh one at the pair's first step (kept with the step's views), the same one at its second
    (which appends the pair's products); the pre-step hook puts the views into the period and clears C.grad."""
    wrapped, opt, _, _ = make_pair("sgd", "left", 3e-3, gap=10)
    layer = wrapped.layers["lin"]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        step(wrapped, opt, signs(g, 1))
    assert layer.auto_state["auto_steps"] == 2 and layer.auto_state["auto_pairs"].shape[0] == 1
    twin = Quadratic(ce.Counterexample(), "left")
    views = []
    for opens in (True, False):
        with torch.no_grad():
            twin.lin.weight.copy_(layer.merged_weight())
        twin.zero_grad()
        batch = signs(g, 2)
        for sign in batch:
            (twin(sign) / 2).backward()
            (wrapped(sign) / 2).backward()
        G, probe = twin.lin.weight.grad, layer._active_probe()
        expected = switching.complement_probe(layer.proj, torch.Generator().manual_seed(
            proj.derive_seed(0, -1 - layer.position, layer.step)))
        assert (probe is layer.auto_state["auto_probe"]) != opens
        assert torch.allclose(probe, expected if opens else layer.auto_state["auto_probe"], atol=TOL)
        assert torch.allclose(layer.probe_factor.grad, probe.T @ G, atol=TOL)
        assert torch.allclose(layer.factor.grad, layer.proj.T @ G, atol=TOL)
        pairs = layer.auto_state["auto_pairs"].shape[0]
        views.append((layer.proj.T @ G, probe.T @ G))
        opt.step()
        assert layer.probe_factor.grad is None and layer.auto_state["auto_pairs"].shape[0] == pairs + (not opens)
        assert layer.auto_state["auto_probe"] is probe
        opt.zero_grad()
    (Ra, Va), (Rb, Vb) = views
    last = layer.auto_state["auto_pairs"][-1]
    assert torch.allclose(last, torch.stack([(Ra * Rb).sum(), (Va * Vb).sum()]), rtol=1e-10)


def same_state(a: dict, b: dict) -> bool:
    """Two wrapper state dicts hold equal tensors, including those of the layers' ``_extra_state``."""
    def equal(x, y):
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        return torch.equal(x, y) if torch.is_tensor(x) else x == y
    return equal(a, b)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_mid_period_is_bit_identical_through_the_switch(optimizer):
    """Saved 4 steps into the period whose test switches (the open pair, the probe, the pairs in
    ``_extra_state``), loaded with weights_only=True into a fresh wrapper: the same bits after, the same switch."""
    lr, steps = (3e-3, 600) if optimizer == "sgd" else (1e-2, 450)
    straight, opt, _, _ = make_pair(optimizer, "left", lr, gap=10)
    g = torch.Generator().manual_seed(100)
    for _ in range(steps):
        step(straight, opt, signs(g, 1))
    (entry,) = straight.switch_log()
    stop = entry["step"] - 6

    first, opt1, _, _ = make_pair(optimizer, "left", lr, gap=10)
    g = torch.Generator().manual_seed(100)
    for _ in range(stop):
        step(first, opt1, signs(g, 1))
    assert not first.switch_log() and first.layers["lin"].auto_state["auto_steps"] == 3
    saved = save_load({"model": first.state_dict(), "optimizer": opt1.state_dict(), "rng": g.get_state()})
    assert set(saved["model"]["model.lin._extra_state"]) == {"step", *switching.STATE_KEYS} - {
        "auto_switched_at", "auto_signal", "auto_random_signal", "auto_t"}
    resumed, opt2, _, _ = make_pair(optimizer, "left", lr, gap=10, seed=0)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    g = torch.Generator()
    g.set_state(saved["rng"])
    for _ in range(steps - stop):
        step(resumed, opt2, signs(g, 1))
    assert straight.switch_log() and straight.switch_log() == resumed.switch_log()
    assert same_state(straight.state_dict(), resumed.state_dict())


def test_extra_state_of_the_previous_test_mid_period_is_refused():
    """A layer's ``_extra_state`` saved mid-period by the previous test (steps − 1 overlapping pair products on one
    probe) cannot be continued: the load names the layer; this test's own state (⌊steps/2⌋ pairs) loads."""
    wrapped, opt, _, _ = make_pair("sgd", "left", 3e-3, gap=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        step(wrapped, opt, signs(g, 1))
    saved = save_load({"model": wrapped.state_dict()})["model"]
    extra = saved["model.lin._extra_state"]
    assert extra["auto_steps"] == 4 and extra["auto_pairs"].shape[0] == 2
    fresh, _, _, _ = make_pair("sgd", "left", 3e-3, gap=10)
    fresh.load_state_dict(saved)
    old = {**extra, "auto_pairs": torch.cat([extra["auto_pairs"], extra["auto_pairs"][:1]])}
    with pytest.raises(ValueError, match="layer 'lin' holds 3 pair products after 4 steps"):
        fresh.load_state_dict({**saved, "model.lin._extra_state": old})


def test_layer_whose_basis_spans_its_side_has_no_probe_and_never_switches():
    """rank = d on the projected side: nothing lies outside the basis (q = 0), as on the optimizer path."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    wrapped = SubspaceModel(net, rank=2, update_proj_gap=5, switch_step="auto")
    assert wrapped.layers["0"].probe_factor.shape == (2, 6)          # (4, 6), left: P (4, 2), q = min(2, 4 − 2)
    assert wrapped.layers["2"].probe_factor is None                  # (2, 4), left: P (2, 2) spans the side
    assert [tuple(p.shape) for p in wrapped.probe_parameters()] == [(2, 6)]
    opt = torch.optim.AdamW(wrapped.parameters(), lr=0.1, weight_decay=0.0)
    wrapped.attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
        ((wrapped(x) - y) ** 2).mean().backward()
        if wrapped.refresh_due():
            wrapped.refresh(opt)
        opt.step()
        opt.zero_grad()
    assert wrapped.layers["2"].auto_state == {}
    assert "model.0.probe_factor" not in wrapped.merged_state_dict()


def test_clip_leaves_the_probes_out_of_the_norm_and_scales_them_with_the_rest():
    wrapped, opt, _, _ = make_pair("sgd", "left", 3e-3, gap=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        step(wrapped, opt, signs(g, 1))
    wrapped(signs(g, 1)[0]).backward()
    layer = wrapped.layers["lin"]
    factor, probe = layer.factor.grad.clone(), layer.probe_factor.grad.clone()
    norm = wrapped.clip_grad_norm_(0.5 * float(factor.norm()))
    assert float(norm) == pytest.approx(float(factor.norm()), rel=1e-12)
    assert torch.allclose(layer.factor.grad, 0.5 * factor, rtol=1e-6) and torch.allclose(layer.probe_factor.grad,
                                                                                           0.5 * probe, rtol=1e-6)


# ---------------------------------------------------------------- two processes


def test_ddp_ranks_take_the_same_decisions_as_one_process(tmp_path):
    """2 gloo ranks with their own noise: DDP averages the probe factor's gradient with the factor's, so every
    rank's tests, switch log and weights are bitwise equal, and equal to the optimizer path on the mean noise."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "tests" / "wrapper_auto_ddp_worker.py"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["tests"] == r1["tests"] and r0["log"] == r1["log"] and torch.equal(r0["weight"], r1["weight"])
    (entry,) = r0["log"]
    (ref_entry,) = r0["ref_log"]
    assert entry["step"] == ref_entry["step"] and 0 < entry["step"] < 300
    assert entry["t"] == pytest.approx(ref_entry["t"], rel=STAT_REL)
    assert float((r0["weight"] - r0["reference"]).abs().max()) < TOL


# ---------------------------------------------------------------- the LM training program


def test_lm_wrapper_path_runs_golore_auto_and_writes_switches(task, tmp_path):
    """``--path wrapper --method golore@auto``: the run folder's switches.json is the wrapper's switch log, with
    the optimizer path's switches (same matrices at the same steps: the same statistic on the same gradients; the
    float32 paths differ by round-off, and no test on this run is close enough to its threshold to flip); a run
    stopped in the middle of the period whose test switches (with a clip that bites at every step) and resumed
    ends bit-identical, with the same switches.json."""
    from golore_lab.lm.pretrain import recipe
    from golore_lab.lm.train import SWITCHES, train

    cfg = recipe("tiny", method="golore@auto", steps=200, warmup_steps=2, rank=8, update_proj_gap=10, lr=1e-2,
                 eval_every=100, log_every=20, batch_size=2, progress=False, grad_clip=0.0)
    ref = train(task, cfg)
    out = train(task, replace(cfg, path="wrapper", out_dir=str(tmp_path / "run")))
    saved = json.loads((tmp_path / "run" / SWITCHES).read_text())
    assert saved == out.switch_log == out.wrapped.switch_log() and saved, "no matrix switched in 200 steps"
    assert [(e["position"], e["step"]) for e in saved] == [(e["position"], e["step"]) for e in ref.switch_log]

    clipped = replace(cfg, path="wrapper", grad_clip=0.5)
    straight = train(task, replace(clipped, out_dir=str(tmp_path / "a")))
    train(task, replace(clipped, out_dir=str(tmp_path / "b"), stop_at=straight.switch_log[0]["step"] - 6))
    resumed = train(task, replace(clipped, out_dir=str(tmp_path / "b"), resume=True))
    assert straight.switch_log and straight.switch_log == resumed.switch_log == json.loads(
        (tmp_path / "b" / SWITCHES).read_text())
    assert same_state(straight.wrapped.state_dict(), resumed.wrapped.state_dict())
