"""Layer-wise steps on 2 gloo ranks (torchrun), 2 micro-batches per rank: under DDP through its communication
hook, under FSDP2 through its hooks on the reduce-scattered shards -- both rules, every projection -- against one
process taking the ordinary ``step()`` over the same 4 micro-batches, and the bytes the DDP hook all-reduces.

Tolerance: 10x the perturbation of the one-process run by summing its micro-batches in the reverse order
(another summation order, which is what the ranks and the reductions change), or one float32 rounding of the
weights where that perturbation is smaller.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerwise_dist_worker as w
from golore_lab.lm.model import build_model, is_subspace_weight

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layerwise-dist")
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    worker = str(ROOT / "tests" / "layerwise_dist_worker.py")
    done = subprocess.run([launcher, "--standalone", "--nproc-per-node", "2", worker, str(folder)], env=env,
                          timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def reduced_bytes(subspace: bool) -> int:
    """What the DDP hook all-reduces in one step: each matrix's projected gradient (rank x its other side) when
    ``subspace``, else its gradient, and every other parameter's gradient; float32."""
    model, total = build_model(w.CFG, 0), 0
    for name, p in model.named_parameters():
        m, n = p.shape if p.ndim == 2 else (p.numel(), 1)
        total += (w.RANK * max(m, n) if subspace and is_subspace_weight(name, p) else p.numel())
    return 4 * total


@pytest.mark.parametrize("engine", w.ENGINES)
@pytest.mark.parametrize("case", w.CASES, ids=["-".join(c) for c in w.CASES])
def test_layerwise_on_two_ranks_matches_one_process(out, case, engine):
    name = "-".join(case)
    r0, r1 = (load(out, f"{name}-{engine}-rank{r}") for r in (0, 1))
    one, reversed_ = load(out, f"{name}-{engine}-one"), load(out, f"{name}-{engine}-one-reversed")
    assert r0["weights"].keys() == one["weights"].keys()
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])   # bit-identical ranks
    assert r0["bytes"] == r1["bytes"] and r0["switches"] == r1["switches"]               # the same decisions
    perturbation = max_diff(reversed_["weights"], one["weights"])
    floor = torch.finfo(torch.float32).eps * max(float(v.abs().max()) for v in one["weights"].values())
    assert 0 < max_diff(r0["weights"], one["weights"]) <= 10 * max(perturbation, floor)
    # in-backward: under FSDP2 every parameter has stepped before step(); under DDP all but the last bucket's,
    # once DDP has rebuilt its buckets (20 kB each) after the first step, whose one bucket steps at step()
    early = r0["stepped_in_backward"]
    if engine == "fsdp":
        assert early == [r0["parameters"]] * w.STEPS
    else:
        assert early[0] == 0 and all(0 < e < r0["parameters"] for e in early[1:])


@pytest.mark.parametrize("case", w.CASES, ids=["-".join(c) for c in w.CASES])
def test_ddp_hook_reduces_the_projected_gradient(out, case):
    """GoLore: the projected gradient at every step (r/m of each matrix's bytes); GaLore: the gradient at its
    refreshes only (steps 0 and 5); GoLore@x%: at its SVD refresh only; GoLore@auto: the gradient until it
    switches (its statistic reads the gradient)."""
    rule, projection = case
    sent = load(out, f"{rule}-{projection}-ddp-rank0")
    full, projected = reduced_bytes(False), reduced_bytes(True)
    assert projected < full / 3
    expected = {"svd": [full if t % w.GAP == 0 else projected for t in range(w.STEPS)],
                "random": [projected] * w.STEPS,
                "switch": [full] + [projected] * (w.STEPS - 1)}
    if projection == "auto":
        first = min((step for _, step in sent["switches"]), default=w.STEPS)
        assert sent["bytes"][:first] == [full] * first and all(b <= full for b in sent["bytes"])
    else:
        assert sent["bytes"] == expected[projection]


def test_a_nonfinite_gradient_on_one_rank_stops_both_alike(out):
    """The mean of a NaN is NaN on every rank: both raise the same ``FloatingPointError`` from the backward, at
    the first bucket waited for, before any parameter of that bucket changed (later buckets never step)."""
    r0, r1 = (load(out, f"nonfinite-rank{r}") for r in (0, 1))
    assert r0 == r1 and r0["step"] == 2 and "Non-finite gradient in parameter" in r0["error"]
    assert r0["changed"] == 0
