"""Worker for tests/test_fsdp.py: ``torchrun --standalone --nproc-per-node W fsdp_worker.py MODE OUT [CKPT]``.

Trains the tiny LLaMA sharded with FSDP2 (gloo, CPU), each rank on its rows of every global batch, and saves
per rank to ``OUT``: the full parameters, every refresh (parameter, step, kind, basis), GoLore@auto's tests and
switch log, and the collectives issued inside ``optimizer.step()`` at each step. :func:`run` without a process
group is the one-process reference (plain tensors, ``proj_type="right"``: the side ``"std"`` picks for a
row-sharded matrix).

Modes: ``train`` (every method × rule, GoLore@auto on either side, DCP checkpoints of RESUME_RUN at step
CKPT_STEP and of GoLore@auto at AUTO_CKPTS, each reloaded into a fresh model and optimizer and continued),
``resume OUT CKPTS`` (load the checkpoints written at another world size into folder CKPTS and continue),
``save OUT`` (write the checkpoints of RESUME_RUN and of GoLore@auto on the right side at this world size).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from golore_lab import SubspaceAdamW, SubspaceSGD
from golore_lab.distributed import shard_model
from golore_lab.lm.model import LlamaConfig, build_model, llama_param_groups
from golore_lab.methods import parse
from golore_lab.optim import microbatches
from golore_lab.projection import svd_projection

RUNS = [(method, rule) for method in ("galore", "golore@100", "golore@50", "lb-galore") for rule in ("adamw", "sgd")]
RESUME_RUN = ("golore@50", "adamw")
LEFT_RUN = ("golore@50", "sgd")  # proj_type="left": the sharded side projected, R all-reduced at every step  # SVD refreshes before the checkpoint, a random one after
STEPS, CKPT_STEP, GAP, RANK, BATCH, SEQ, VOCAB = 6, 3, 2, 4, 4, 16, 64
# GoLore@auto: its test needs periods of >= 5 steps; with these the tiny LLaMA switches one matrix at step 10 on
# either side (SGD right, AdamW left), and every other test is > 0.1 away from its threshold. Checkpoints mid-period
# before the switch and after it.
AUTO_RUNS = {"right": ("golore@auto", "sgd", "std"), "left": ("golore@auto", "adamw", "left")}
AUTO_GAP, AUTO_STEPS, AUTO_CKPTS = 10, 31, (5, 15)
COLLECTIVES = {(mod, name) for mod in (dist, funcol) for name in dir(mod)  # every collective of either API
               if name.startswith(("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"))
               and callable(getattr(mod, name))}


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (BATCH, SEQ) of inputs and targets for (step, micro-batch); a pure function of both."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 * step + micro))
    return tokens[:, :-1], tokens[:, 1:]


def svd64(grad, rank, side, generator):
    """GaLore's basis from a float64 SVD: the reference's perturbation of the basis's rounding."""
    return svd_projection(grad.double(), rank, side)


def build(method: str, rule: str, sharded: bool, projection="svd", proj_type: str | None = None, gap: int = GAP):
    model = build_model(LlamaConfig.preset("tiny", vocab_size=VOCAB), seed=0)
    if sharded:
        shard_model(model)
    if proj_type == "std" and not sharded:
        proj_type = "right"  # what "std" picks for a row-sharded matrix
    groups = llama_param_groups(model, rank=RANK, update_proj_gap=gap, scale=0.5,
                                proj_type=proj_type or ("std" if sharded else "right"))
    spec = parse(method)
    subspace = dict(projection=projection, switch_step=spec.switch_step(STEPS), seed=3)
    if rule == "adamw":
        opt = SubspaceAdamW(groups, lr=1e-2, weight_decay=0.1, **subspace)
    else:
        opt = SubspaceSGD(groups, lr=0.2, momentum=0.9, weight_decay=0.01, **subspace)
    return model, opt, spec


@contextmanager
def counting(counter: Counter):
    """Count the calls of every torch.distributed collective (and DTensor's functional ones) in the block."""
    originals = {(mod, name): getattr(mod, name) for mod, name in COLLECTIVES}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counter[name] += 1
            return fn(*args, **kwargs)
        return counted

    for (mod, name), fn in originals.items():
        setattr(mod, name, wrap(name, fn))
    try:
        yield
    finally:
        for (mod, name), fn in originals.items():
            setattr(mod, name, fn)


def run(method: str, rule: str, start: int = 0, stop: int = STEPS, sharded: bool = True, split: int = 1,
        projection="svd", proj_type: str | None = None, checkpoint: str | None = None, save_at: tuple = (),
        gap: int = GAP, tag: str = ""):
    """Train steps [start, stop); returns (model, optimizer, refreshes, collectives per step, tests).

    Each rank takes its rows of the global batch (``split`` > 1 in one process: the same rows as micro-batches,
    which changes only the rounding -- the perturbation the tests scale their tolerance with). L.B. GaLore takes
    two micro-batches at refresh steps. ``checkpoint``: load a DCP checkpoint first; ``save_at``: write one
    after each of these many steps (:func:`checkpoint_out` with ``tag``). ``tests``: GoLore@auto's test at
    each refresh, (name, step, (signal, random_signal, t, switch) or None).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp

    model, opt, spec = build(method, rule, sharded, projection, proj_type, gap)
    refreshes, tests = [], []
    opt.register_refresh_hook(lambda o, r: refreshes.append((r.name, r.step, r.kind, r.basis.clone())))
    opt.register_refresh_hook(lambda o, r: tests.append(
        (r.name, r.step, r.test and (r.test.signal, r.test.random_signal, r.test.t, r.test.switch))))
    if checkpoint is not None:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        refreshes.clear()  # the zero-gradient step DCP takes to build the state is not training
        tests.clear()
    world, rank = (dist.get_world_size(), dist.get_rank()) if sharded else (1, 0)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    collectives = []
    for step in range(start, stop):
        micro = microbatches(opt, base=1, refresh=2) if spec.large_batch else 1
        for k in range(micro):
            inputs, targets = batch(step, k)
            inputs, targets = inputs[rows], targets[rows]
            for part_in, part_tg in zip(inputs.chunk(split), targets.chunk(split)):
                logits = model(part_in)
                loss = F.cross_entropy(logits.flatten(0, 1), part_tg.flatten()) / (micro * split)
                loss.backward()
        counter = Counter()
        with counting(counter):
            opt.step()
        collectives.append(dict(counter))
        opt.zero_grad()
        if step + 1 in save_at:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=checkpoint_out(step + 1, tag))
    return model, opt, refreshes, collectives, tests


def run_auto(side: str, **kw):
    """GoLore@auto on ``side`` ("right": the default "std" of a row-sharded matrix; "left") for AUTO_STEPS."""
    method, rule, proj_type = AUTO_RUNS[side]
    return run(method, rule, proj_type=proj_type, gap=AUTO_GAP, tag=f"auto-{side}", **{"stop": AUTO_STEPS, **kw})


def auto_result(model, opt, refreshes, collectives, tests) -> dict:
    return dict(params=full_params(model), refreshes=refreshes, collectives=collectives, tests=tests,
                log=opt.switch_log())


def nonfinite_on_one_rank(method: str) -> tuple[str, bool]:
    """Rank 1 alone gets a NaN in its rows of one gradient: every rank must raise the same error, unchanged."""
    model, opt, _ = build(method, "adamw", sharded=True)
    inputs, targets = batch(0, 0)
    F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    before = full_params(model)
    if dist.get_rank() == 1:
        model.layers[1].mlp.up_proj.weight.grad.to_local()[0, 0] = float("nan")
    try:
        opt.step()
        message = ""
    except FloatingPointError as error:
        message = str(error)
    after = full_params(model)
    return message, all(torch.equal(before[k], after[k]) for k in before) and not any(opt.state.values())


def placement_error() -> str:
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(8, 4), mesh, [Replicate()]))
    weight.grad = distribute_tensor(torch.ones(8, 4), mesh, [Replicate()])
    try:
        SubspaceAdamW([{"params": [weight], "rank": 2}]).step()
    except ValueError as error:
        return str(error)
    return ""


def checkpoint_out(step: int, tag: str = "", folder: str | None = None) -> str:
    return os.path.join(folder or os.environ["FSDP_WORKER_OUT"], f"ckpt-{tag + '-' if tag else ''}step{step}")


def full_params(model) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def main(mode: str, out: str, checkpoints: str | None = None) -> None:
    torch.set_num_threads(1)
    os.environ["FSDP_WORKER_OUT"] = out
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    if mode == "train":
        for method, rule in RUNS:
            model, opt, refreshes, collectives, _ = run(method, rule,
                                                        save_at=(CKPT_STEP,) if (method, rule) == RESUME_RUN else ())
            result[(method, rule)] = dict(params=full_params(model), refreshes=refreshes, collectives=collectives)
        model, opt, refreshes, collectives, _ = run(*LEFT_RUN, proj_type="left")
        result["left"] = dict(params=full_params(model), refreshes=refreshes, collectives=collectives)
        result["auto"] = {side: auto_result(*run_auto(side, save_at=AUTO_CKPTS)) for side in AUTO_RUNS}
        dist.barrier()
        model, *_ = run(*RESUME_RUN, start=CKPT_STEP, checkpoint=checkpoint_out(CKPT_STEP))
        result["resumed"] = full_params(model)
        result["auto_resumed"] = {(side, step): auto_result(*run_auto(side, start=step, checkpoint=checkpoint_out(
            step, f"auto-{side}"))) for side in AUTO_RUNS for step in AUTO_CKPTS}
        result["nonfinite"] = {method: nonfinite_on_one_rank(method) for method in ("galore", "golore@100")}
        result["placement_error"] = placement_error()
    elif mode == "resume":
        model, *_ = run(*RESUME_RUN, start=CKPT_STEP, checkpoint=checkpoint_out(CKPT_STEP, folder=checkpoints))
        result["resumed"] = full_params(model)
        step = AUTO_CKPTS[0]
        result["auto_resumed"] = auto_result(*run_auto("right", start=step, checkpoint=checkpoint_out(
            step, "auto-right", checkpoints)))
    elif mode == "save":
        run(*RESUME_RUN, stop=CKPT_STEP, save_at=(CKPT_STEP,))
        run_auto("right", stop=AUTO_CKPTS[0], save_at=AUTO_CKPTS[:1])
    torch.save(result, os.path.join(out, f"{mode}-world{world}-rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
