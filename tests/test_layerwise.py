"""Layer-wise (in-backward) steps against the ordinary step() on a small LLaMA: the same trajectory (bit for bit
with one micro-batch, to rounding with accumulation), the accumulator's size, the non-finite promise, errors,
the one LR scheduler, checkpoints and resume."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from golore_lab import SubspaceAdamW, SubspaceSGD
from golore_lab.lm.model import LlamaConfig, build_model, llama_param_groups
from golore_lab.optim import layerwise

CFG = LlamaConfig.preset("tiny", vocab_size=64)
RULES = {"adamw": (SubspaceAdamW, dict(lr=1e-2, weight_decay=0.1)),
         "sgd": (SubspaceSGD, dict(lr=1e-1, momentum=0.9, weight_decay=0.1))}
PROJECTIONS = {"svd": {}, "random": dict(projection="random"), "switch": dict(switch_step=5),
               "auto": dict(switch_step="auto")}


def make(rule: str, projection: str, dtype=torch.float32, rank: int = 4, gap: int = 5):
    model = build_model(CFG, 0).to(dtype)
    cls, hyper = RULES[rule]
    opt = cls(llama_param_groups(model, rank=rank, update_proj_gap=gap, **PROJECTIONS[projection]), **hyper)
    return model, opt


def loss_of(model, generator):
    x = torch.randint(0, CFG.vocab_size, (2, 17), generator=generator)
    return F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())


def train(model, opt, steps: int, k: int, steps_lw=None, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if steps_lw is not None:
            steps_lw.expect(k)
        for _ in range(k):
            (loss_of(model, generator) / k).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("rule", list(RULES))
def test_one_micro_batch_is_the_ordinary_step_bit_for_bit(rule, projection):
    """k = 1: the same operations per parameter, and no parameter is read by the backward after its gradient is
    formed -- so the trajectories are equal, not close (12 steps, refreshes at 0, 5, 10)."""
    ordinary = train(*make(rule, projection), steps=12, k=1)
    model, opt = make(rule, projection)
    steps = layerwise(opt)
    in_backward = train(model, opt, steps=12, k=1, steps_lw=steps)
    assert all(torch.equal(a, b) for a, b in zip(ordinary, in_backward))
    assert not any(p.grad is not None for p in model.parameters())   # every gradient freed by its own hook


@pytest.mark.parametrize("projection", list(PROJECTIONS))
@pytest.mark.parametrize("rule", list(RULES))
def test_accumulated_step_equals_the_ordinary_one(rule, projection):
    """k = 2 micro-batches: Σ_i PᵀG_i instead of Pᵀ Σ_i G_i, equal up to the order of the sums. In float64
    the rounding is ~1e-16 of the entries; over 12 steps (Adam's normalisation amplifying it where the second
    moment is small) it stays far below 1e-9, while any step taken differently moves weights by ~lr = 1e-2."""
    ordinary = train(*make(rule, projection, torch.float64), steps=12, k=2)
    model, opt = make(rule, projection, torch.float64)
    in_backward = train(model, opt, steps=12, k=2, steps_lw=layerwise(opt))
    start = [p.detach() for p in build_model(CFG, 0).double().parameters()]
    assert max(float((a - s).abs().max()) for a, s in zip(ordinary, start)) > 1e-2   # the runs did move
    assert max(float((a - b).abs().max()) for a, b in zip(ordinary, in_backward)) < 1e-9


def pending_shapes(steps):
    return {tuple(p.shape): (pending.mode, None if pending.acc is None else tuple(pending.acc.shape))
            for p, pending in steps.pending.items()}


def test_golore_keeps_an_r_sized_accumulator_and_galore_the_gradient_only_at_a_refresh():
    """Between two micro-batches of one step: a GoLore matrix holds R (r × n) or (m × r) and no gradient, at a
    refresh step too; GaLore's matrices hold their (m, n) gradient at a refresh step only; full-space parameters
    (embedding, head, norms) hold their gradient."""
    model, opt = make("adamw", "random", rank=4, gap=2)
    steps = layerwise(opt)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):   # refreshes at steps 0 and 2
        steps.expect(2)
        loss_of(model, generator).backward()
        shapes = pending_shapes(steps)
        assert shapes[(CFG.dim, CFG.dim)] == ("subspace", (CFG.dim, 4))                 # m >= n: G Q (m, r)
        assert shapes[(CFG.hidden_dim, CFG.dim)] == ("subspace", (CFG.hidden_dim, 4))
        assert shapes[(CFG.dim, CFG.hidden_dim)] == ("subspace", (4, CFG.hidden_dim))   # m < n: Pᵀ G (r, n)
        assert all(p.grad is None for group in opt.param_groups[:1] for p in group["params"])
        assert all(p.grad is not None for p in opt.param_groups[1]["params"])
        loss_of(model, generator).backward()
        opt.step()
    model, opt = make("adamw", "svd", rank=4, gap=2)
    steps = layerwise(opt)
    for step in range(3):
        steps.expect(2)
        loss_of(model, generator).backward()
        mode = "full" if step % 2 == 0 else "subspace"
        assert pending_shapes(steps)[(CFG.dim, CFG.dim)][0] == mode
        assert all((p.grad is not None) == (mode == "full") for p in opt.param_groups[0]["params"])
        loss_of(model, generator).backward()
        opt.step()


@pytest.mark.parametrize("rule", list(RULES))
def test_a_step_closed_early_is_the_ordinary_step_of_what_arrived(rule):
    """expect(2) but one backward: step() applies the accumulated micro-batch (with SGD's coupled weight decay,
    which joins at the last micro-batch, added there) -- the ordinary step of that one gradient."""
    def run(lw: bool):
        model, opt = make(rule, "random", torch.float64)
        steps = layerwise(opt) if lw else None
        generator = torch.Generator().manual_seed(1)
        for t in range(4):
            if steps is not None:
                steps.expect(2)
            (loss_of(model, generator) / 2).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    assert max(float((a - b).abs().max()) for a, b in zip(run(False), run(True))) < 1e-12


def test_nonfinite_gradient_raises_from_backward_and_leaves_that_parameter_untouched():
    """The promise in-backward can keep: the parameter with a NaN gradient and its state are unchanged and named;
    the head, whose gradient came first, has already taken its step; the next step may begin."""
    model, opt = make("adamw", "random")
    steps = layerwise(opt)
    generator = torch.Generator().manual_seed(1)
    train(model, opt, 1, 1, steps)
    target = model.layers[0].attn.q_proj.weight
    handle = target.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[target].items() if torch.is_tensor(v)}
    position = [p for g in opt.param_groups for p in g["params"]].index(target)
    with pytest.raises(FloatingPointError, match=rf"Non-finite gradient in parameter param_groups\[0\]\['params'\]"
                                                 rf"\[{position}\]; step skipped"):
        loss_of(model, generator).backward()
    assert torch.equal(target, before["layers.0.attn.q_proj.weight"])
    assert all(torch.equal(v, opt.state[target][k]) for k, v in state.items())
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    handle.remove()
    opt.zero_grad()
    assert not steps.open
    train(model, opt, 1, 1, steps)   # the loop can go on (a training run stops and reloads instead)


def test_errors_are_named():
    model, opt = make("adamw", "random")
    with pytest.raises(TypeError, match="layerwise\\(\\) takes a SubspaceAdamW or SubspaceSGD, not AdamW"):
        layerwise(torch.optim.AdamW(model.parameters()))
    steps = layerwise(opt)
    with pytest.raises(ValueError, match="already takes layer-wise steps"):
        layerwise(opt)
    with pytest.raises(ValueError, match="Invalid micro_batches: 0"):
        steps.expect(0)
    generator = torch.Generator().manual_seed(1)
    loss_of(model, generator).backward()
    with pytest.raises(RuntimeError, match="state_dict\\(\\) while a layer-wise step is open"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="expect\\(\\) while a layer-wise step is open"):
        steps.expect(2)
    with pytest.raises(RuntimeError, match="received a gradient after its step \\(expect\\(1\\) announced 1"):
        loss_of(model, generator).backward()
    opt.step()
    steps.remove()
    loss_of(model, generator).backward()       # hooks detached: the ordinary step again
    assert all(p.grad is not None for p in model.parameters())


def test_one_scheduler_drives_every_in_backward_update():
    """One optimizer, one LambdaLR: no "scheduler before optimizer" warning, and the lr each hook reads is the
    scheduler's (the run equals the ordinary one with the same scheduler, bit for bit)."""
    def run(lw: bool):
        model, opt = make("adamw", "random")
        steps = layerwise(opt) if lw else None
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            loss_of(model, generator).backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
        return [p.detach().clone() for p in model.parameters()], opt.param_groups[0]["lr"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (ordinary, lr0), (in_backward, lr1) = run(False), run(True)
    assert lr0 == lr1 == pytest.approx(1e-2 / 5)
    assert all(torch.equal(a, b) for a, b in zip(ordinary, in_backward))


@pytest.mark.parametrize("projection", ["svd", "auto"])
def test_checkpoint_and_resume_as_without_layerwise(projection):
    """The state dict of a layer-wise run is the ordinary run's (equal tensors); a fresh optimizer loading it
    mid-run continues exactly as the uninterrupted run."""
    model, opt = make("adamw", projection)
    train(model, opt, 12, 1, layerwise(opt))
    ref_model, ref_opt = make("adamw", projection)
    train(ref_model, ref_opt, 12, 1)
    saved, ref = opt.state_dict(), ref_opt.state_dict()
    for index, state in ref["state"].items():
        assert state.keys() == saved["state"][index].keys()
        assert all(torch.equal(v, saved["state"][index][k]) if torch.is_tensor(v) else v == saved["state"][index][k]
                   for k, v in state.items())
    model, opt = make("adamw", projection)
    train(model, opt, 6, 1, layerwise(opt))
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    resumed_model, resumed = make("adamw", projection)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):   # the data stream continues at step 6
        loss_of(resumed_model, generator)
    steps = layerwise(resumed)
    for _ in range(6):
        steps.expect(1)
        loss_of(resumed_model, generator).backward()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), resumed_model.parameters()))
