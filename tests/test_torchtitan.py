"""torchtitan with SubspaceAdamW / SubspaceSGD: its container (our subclass), FSDP2 over gloo at 1 and 2 ranks,
its DCP checkpointer (save, load, bit-identical continuation), and the zero-gradient step of init_optim_state."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan")

import torchtitan_worker as w  # noqa: E402
from golore_lab.integrations.torchtitan import (FRESH_KEY, LLAMA_MATRICES, SubspaceOptimizersContainer,  # noqa: E402
                                                golore_optimizer_config)

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, out: Path) -> None:
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([launcher, "--standalone", "--nproc-per-node", str(nproc),
                           str(ROOT / "tests" / "torchtitan_worker.py"), str(out)], env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for world in (1, 2):
        folder = tmp_path_factory.mktemp(f"titan{world}")
        torchrun(world, folder)
        out[world] = {run: [torch.load(folder / f"{run}-world{world}-rank{r}.pt", weights_only=True)
                            for r in range(world)] for run in w.RUNS}
        assert sorted(p.name for p in (folder / f"world{world}" / "galore-adamw").iterdir()) == ["step-4", "step-8"]
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("run", list(w.RUNS))
def test_checkpoint_resume_is_bit_identical(runs, world, run):
    for result in runs[world][run]:
        assert same(result["resumed"], result["straight"])
        # The container's state_dict() before the first step (torchtitan's zero-gradient step) changes nothing.
        assert same(result["state_dict_first"], result["straight"])
        # Without the container's handling that step costs the first refresh: the run differs by O(0.1).
        assert max(float((result["unguarded"][k] - result["straight"][k]).abs().max()) for k in result["straight"]) \
            > 1e-2
    if world == 2:
        assert same(runs[2][run][0]["straight"], runs[2][run][1]["straight"])  # full parameters, every rank


# ------------------------------------------------------------------------------------- one process
def container(run="galore-adamw"):
    model = w.build(1)
    method, optimizer, extra = w.RUNS[run]
    return model, golore_optimizer_config(method, total_steps=w.STEPS, lr=3e-2, rank=4, update_proj_gap=3,
                                          optimizer=optimizer, **extra).build(model_parts=[model])


def steps(model, optimizers, first, last):
    for step in range(first, last + 1):
        tokens = torch.randint(0, w.VOCAB, (w.BATCH, w.SEQ + 1), generator=torch.Generator().manual_seed(100 + step))
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizers.step()
        optimizers.zero_grad()


def test_zero_gradient_step_chooses_no_basis():
    from torchtitan.components.optimizer.utils import init_optim_state

    fresh_model, fresh = container()
    steps(fresh_model, fresh, 1, 1)
    model, optimizers = container()
    sd = optimizers.state_dict()  # torchtitan's init_optim_state runs here
    assert int(sd[FRESH_KEY][0]) == 1
    steps(model, optimizers, 1, 1)
    opt, ref = optimizers.optimizers[0], fresh.optimizers[0]
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"]):
        # The basis of the first real step is the one a fresh optimizer takes from the first real gradient.
        assert torch.equal(opt.state[p]["proj"], ref.state[q]["proj"]) and opt.state[p]["step"] == 1
    assert int(optimizers.state_dict()[FRESH_KEY][0]) == 0
    # torchtitan's plain zero-gradient step takes the SVD of 0: the coordinate basis, counted as step 0.
    _, plain = container()
    init_optim_state(plain.optimizers[0])
    state = plain.optimizers[0].state[plain.optimizers[0].param_groups[0]["params"][0]]
    assert state["step"] == 1 and torch.equal(state["proj"].abs(), torch.eye(*state["proj"].shape))


def test_state_dict_loads_weights_only_and_keeps_the_fresh_flag():
    straight_model, straight = container("golore50-sgd")
    steps(straight_model, straight, 1, w.STEPS)
    # A checkpoint of a not-yet-stepped container (what a seed checkpoint holds), read with weights_only=True.
    _, first = container("golore50-sgd")
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    model, second = container("golore50-sgd")
    second.load_state_dict(torch.load(buffer, weights_only=True))
    steps(model, second, 1, w.STEPS)
    assert same(dict(model.named_parameters()), dict(straight_model.named_parameters()))
    # Mid-run: save after 4 steps, load into a fresh container, continue: the same parameters.
    m1, c1 = container("golore50-sgd")
    steps(m1, c1, 1, 4)
    buffer = io.BytesIO()
    torch.save({"model": m1.state_dict(), "optim": c1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    m2, c2 = container("golore50-sgd")
    m2.load_state_dict(saved["model"])
    c2.load_state_dict(saved["optim"])
    steps(m2, c2, 5, w.STEPS)
    assert same(dict(m2.named_parameters()), dict(straight_model.named_parameters()))


def test_config_groups():
    model, optimizers = container("golore50-adamw")
    groups = optimizers.optimizers[0].param_groups
    names = groups[0]["param_names"]
    assert sorted(names) == sorted(f"layers.{i}.{m}.weight" for i in range(w.LAYERS)
                                   for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    assert groups[0]["rank"] == 4 and groups[0]["switch_step"] == 4 and groups[1]["rank"] is None
    assert "layers.0.attention_norm.weight" in groups[1]["param_names"]
    assert isinstance(optimizers, SubspaceOptimizersContainer)
    cfg = golore_optimizer_config("golore@20", total_steps=1000)
    assert cfg.param_groups[0].pattern == LLAMA_MATRICES and cfg.param_groups[0].optimizer_kwargs["switch_step"] == 800
    assert golore_optimizer_config("golore@auto").param_groups[0].optimizer_kwargs["switch_step"] == "auto"
    assert [g.pattern for g in golore_optimizer_config("full").param_groups] == [".*"]
    with pytest.raises(ValueError, match="needs total_steps"):
        golore_optimizer_config("golore@20")
    with pytest.raises(ValueError, match="lb-galore"):
        golore_optimizer_config("lb-galore")
    with pytest.raises(ValueError, match="Invalid optimizer: 'Adam'"):
        golore_optimizer_config("galore", optimizer="Adam")
