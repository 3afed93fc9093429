"""FSDP2 (``fully_shard``, gloo, 2 CPU processes under torchrun) against one process, and DCP checkpoints.

Tolerances come from perturbing the one-process reference by what sharding changes: the summation order of
the gradient (the same rows as two micro-batches) and the rounding of GaLore's basis (a float64 SVD; the
sharded path takes it from the float64 Gram matrix). A sharded run must stay within 10x the larger of the two;
so must GoLore@auto's test statistics (its pair products are summed over the ranks' rows, another rounding).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import fsdp_worker as w

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, *args: str) -> None:
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    worker = str(ROOT / "tests" / "fsdp_worker.py")
    done = subprocess.run([launcher, "--standalone", "--nproc-per-node", str(nproc), worker, *args], env=env,
                          timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """train at 2 ranks (checkpoint at step 3); resume it at 1 rank; a 1-rank checkpoint resumed at 2 ranks."""
    two, one, back = (tmp_path_factory.mktemp(name) for name in ("two", "one", "back"))
    torchrun(2, "train", str(two))
    torchrun(1, "resume", str(one), str(two))
    torchrun(1, "save", str(one))
    torchrun(2, "resume", str(back), str(one))
    load = lambda path: torch.load(path, weights_only=True)
    two_to_one = load(one / "resume-world1-rank0.pt")
    one_to_two = [load(back / f"resume-world2-rank{r}.pt") for r in (0, 1)]
    return dict(train=[load(two / f"train-world2-rank{r}.pt") for r in (0, 1)],
                two_to_one=two_to_one["resumed"], one_to_two=[r["resumed"] for r in one_to_two],
                auto_two_to_one=two_to_one["auto_resumed"], auto_one_to_two=[r["auto_resumed"] for r in one_to_two])


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference(run, **kw):
    """One process: the parameters, the refreshes, the tolerance from two perturbed one-process runs, and the
    refreshes of the float64-SVD one."""
    model, _, refreshes, *_ = w.run(*run, sharded=False, **kw)
    params = w.full_params(model)
    split = w.run(*run, sharded=False, split=2, **kw)
    svd64 = w.run(*run, sharded=False, projection=w.svd64, **kw)
    tolerance = 10 * max(max_diff(w.full_params(other[0]), params) for other in (split, svd64))
    return params, refreshes, tolerance, svd64[2]


def subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a aᵀ − b bᵀ‖ for orthonormal bases: zero iff they span the same subspace (blind to signs)."""
    return float(torch.linalg.matrix_norm(a.double() @ a.double().T - b.double() @ b.double().T))


@pytest.mark.parametrize("run", w.RUNS, ids=["-".join(r) for r in w.RUNS])
def test_fsdp_matches_one_process(runs, run):
    rank0, rank1 = (result[run] for result in runs["train"])
    # every rank: the same parameters, the same refreshes (steps, kinds, bases), bit for bit
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    assert [r[:3] for r in rank0["refreshes"]] == [r[:3] for r in rank1["refreshes"]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(rank0["refreshes"], rank1["refreshes"]))

    params, refreshes, tolerance, refreshes64 = reference(run)
    assert max_diff(rank0["params"], params) <= tolerance, (max_diff(rank0["params"], params), tolerance)
    assert [r[:3] for r in rank0["refreshes"]] == [r[:3] for r in refreshes]
    for (name, step, kind, basis), (*_, expected) in zip(rank0["refreshes"], refreshes):
        if kind == "random":  # a pure function of (seed, position, step): the very same basis
            assert torch.equal(basis, expected), (name, step)
    first = [(r[3], e[3], e64[3]) for r, e, e64 in zip(rank0["refreshes"], refreshes, refreshes64)
             if r[1] == 0 and r[2] == "svd"]
    for basis, expected, expected64 in first:  # Gram basis vs one-process SVD (same gradient up to rounding),
        assert subspace_gap(basis, expected) <= 10 * subspace_gap(expected64, expected)  # within float32's SVD error

    # collectives inside optimizer.step(): one all-reduce (the non-finite flags) per step, plus one per SVD
    # refresh of each matrix (its Gram matrix); nothing else
    svd_per_step = Counter(step for _, step, kind, _ in refreshes if kind == "svd")
    assert rank0["collectives"] == [{"all_reduce": 1 + svd_per_step[s]} for s in range(w.STEPS)]


def test_fsdp_left_side_all_reduces_the_projected_gradient(runs):
    """proj_type="left" on a row-sharded matrix: R = Σ_k P_kᵀ G_k is all-reduced at every step (one per matrix),
    an SVD refresh all-gathers G; same parameters as one process."""
    left0, left1 = (result["left"] for result in runs["train"])
    assert all(torch.equal(left0["params"][k], left1["params"][k]) for k in left0["params"])
    params, refreshes, tolerance, _ = reference(w.LEFT_RUN, proj_type="left")
    assert max_diff(left0["params"], params) <= tolerance
    assert [r[:3] for r in left0["refreshes"]] == [r[:3] for r in refreshes]
    matrices = len({r[0] for r in refreshes})
    svd_per_step = Counter(step for _, step, kind, _ in refreshes if kind == "svd")
    expected = [{"all_reduce": 1 + matrices, **({"all_gather_single": svd_per_step[s]} if svd_per_step[s] else {})}
                for s in range(w.STEPS)]
    assert left0["collectives"] == expected


def test_fsdp_nonfinite_on_one_rank_raises_on_every_rank(runs):
    for method in ("galore", "golore@100"):
        (m0, unchanged0), (m1, unchanged1) = (result["nonfinite"][method] for result in runs["train"])
        assert m0 == m1 and "Non-finite gradient in parameter param_groups[0]['params'][12]" in m0, method
        assert unchanged0 and unchanged1


def test_fsdp_rejects_other_placements(runs):
    assert "placements (Replicate(),)" in runs["train"][0]["placement_error"]


def test_dcp_resume(runs):
    final = runs["train"][0][w.RESUME_RUN]["params"]
    assert all(torch.equal(runs["train"][0]["resumed"][k], final[k]) for k in final)  # same world size: bitwise
    tolerance = reference(w.RESUME_RUN)[2]
    assert max_diff(runs["two_to_one"], final) <= tolerance
    r0, r1 = runs["one_to_two"]
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert max_diff(r0, final) <= tolerance


# ---------------------------------------------------------------- GoLore@auto

STATISTICS = ("signal", "random_signal", "t")


@functools.lru_cache(maxsize=None)
def auto_reference(side: str):
    """One process: GoLore@auto's result (as :func:`fsdp_worker.auto_result`), and the tolerances of the
    parameters and of each test statistic: 10x their largest change under the two perturbations of
    :func:`reference`, whose decisions must be the reference's."""
    ref = w.auto_result(*w.run_auto(side, sharded=False))
    tolerance = dict.fromkeys(("params", *STATISTICS), 0.0)
    for perturbed in (w.auto_result(*w.run_auto(side, sharded=False, split=2)),
                      w.auto_result(*w.run_auto(side, sharded=False, projection=w.svd64))):
        assert [(r["name"], r["step"]) for r in perturbed["log"]] == [(r["name"], r["step"]) for r in ref["log"]]
        tolerance["params"] = max(tolerance["params"], max_diff(perturbed["params"], ref["params"]))
        for key, gap in statistic_gaps(perturbed["tests"], ref["tests"]).items():
            tolerance[key] = max(tolerance[key], gap)
    return ref, {key: 10 * value for key, value in tolerance.items()}


def statistic_gaps(tests: list, expected: list) -> dict[str, float]:
    """The largest difference of each statistic between two runs' tests, which must take the same decisions at
    the same refreshes (each test: (name, step, (signal, random_signal, t, switch) or None))."""
    assert [(n, s, t is None or t[3]) for n, s, t in tests] == [(n, s, t is None or t[3]) for n, s, t in expected]
    pairs = [(a, b) for (*_, a), (*_, b) in zip(tests, expected) if a is not None]
    assert pairs, "no test was taken"
    return {key: max(abs(a[i] - b[i]) for a, b in pairs) for i, key in enumerate(STATISTICS)}


def switch_steps(log: list) -> list:
    return [(r["name"], r["position"], r["step"]) for r in log]


@pytest.mark.parametrize("side", list(w.AUTO_RUNS))
def test_fsdp_auto_matches_one_process(runs, side):
    rank0, rank1 = (result["auto"][side] for result in runs["train"])
    # every rank: the same decisions, statistics, switch log and parameters, bit for bit
    assert rank0["tests"] == rank1["tests"] and rank0["log"] == rank1["log"]
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    assert [r[:3] for r in rank0["refreshes"]] == [r[:3] for r in rank1["refreshes"]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(rank0["refreshes"], rank1["refreshes"]))
    assert rank0["log"], "no matrix switched: the comparison would not cover a switch"

    ref, tolerance = auto_reference(side)
    # the same switches (parameter and step), the same refresh kinds, statistics and parameters within tolerance
    assert switch_steps(rank0["log"]) == switch_steps(ref["log"])
    for mine, theirs in zip(rank0["log"], ref["log"]):
        assert all(abs(mine[key] - theirs[key]) <= tolerance[key] for key in STATISTICS), (mine, theirs, tolerance)
    assert [r[:3] for r in rank0["refreshes"]] == [r[:3] for r in ref["refreshes"]]
    gaps = statistic_gaps(rank0["tests"], ref["tests"])
    assert all(gaps[key] <= tolerance[key] for key in STATISTICS), (gaps, tolerance)
    assert max_diff(rank0["params"], ref["params"]) <= tolerance["params"]

    # collectives inside optimizer.step(): exactly GaLore's. Right side: the flags, plus one all-reduce per matrix
    # whose refresh computes a Gram matrix -- every matrix not switched before (the one that switches at this
    # refresh too: its test needs the Gram all-reduce that carries its pair sums). Left side: the flags and one
    # all-reduce of R (carrying the probe's view) per matrix per step, an all-gather per SVD refresh.
    matrices = len({r[0] for r in ref["refreshes"]})
    switched = {r["name"]: r["step"] for r in ref["log"]}
    gathered = Counter(step for name, step, kind, _ in ref["refreshes"] if kind == "svd")
    grams = Counter(step for name, step, _, _ in ref["refreshes"] if step <= switched.get(name, step))
    if side == "right":
        expected = [{"all_reduce": 1 + grams[s]} for s in range(w.AUTO_STEPS)]
    else:
        expected = [{"all_reduce": 1 + matrices, **({"all_gather_single": gathered[s]} if gathered[s] else {})}
                    for s in range(w.AUTO_STEPS)]
    assert rank0["collectives"] == expected


@pytest.mark.parametrize("side", list(w.AUTO_RUNS))
@pytest.mark.parametrize("step", w.AUTO_CKPTS)
def test_dcp_resume_auto_same_world_size_is_bitwise(runs, side, step):
    """Mid-period before the switch (the decision taken from restored pair sums) and after it (the record)."""
    full = runs["train"][0]["auto"][side]
    for result in runs["train"]:
        resumed = result["auto_resumed"][(side, step)]
        assert resumed["tests"] == [t for t in full["tests"] if t[1] >= step]
        assert resumed["log"] == full["log"]
        assert all(torch.equal(resumed["params"][k], full["params"][k]) for k in full["params"])


def test_dcp_resume_auto_across_world_sizes(runs):
    """2 -> 1 and 1 -> 2 ranks from a checkpoint before the switch: the period's pair products are saved summed
    over the ranks, so the resumed run takes the same decisions, within float tolerance of the statistics."""
    full = runs["train"][0]["auto"]["right"]
    _, tolerance = auto_reference("right")
    r0, r1 = runs["auto_one_to_two"]
    assert r0["tests"] == r1["tests"] and r0["log"] == r1["log"]
    for resumed in (runs["auto_two_to_one"], r0):
        assert switch_steps(resumed["log"]) == switch_steps(full["log"])
        gaps = statistic_gaps(resumed["tests"], [t for t in full["tests"] if t[1] >= w.AUTO_CKPTS[0]])
        assert all(gaps[key] <= tolerance[key] for key in STATISTICS), (gaps, tolerance)
        assert max_diff(resumed["params"], full["params"]) <= tolerance["params"]
