"""``--fsdp`` in the training loop (gloo, 2 CPU processes under torchrun) against one process, and its resume.

The tolerance comes from a perturbation of the one-process run: the same examples in micro-batches of 1
instead of 2 (another summation order of the gradient, which is what sharding changes, with the
reduce-scatter's order). An FSDP run must stay within 10x that perturbation in its weights, and in every logged
metric within 10x the larger of the perturbation and one float32 rounding of the value (the logged loss is
itself summed in another order across the ranks). The gradient norm logged is the global norm the clipping
uses: a norm of the local shard alone would be off by far more.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm_fsdp_worker as w
from golore_lab.lm.train import (CHECKPOINT, CHECKPOINT_DIR, STATE, RunFolder, TrainConfig, _prepare_folder,
                                 add_train_arguments, saved_state, train)

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("train_loss", "grad_norm", "val_loss", "val_ppl")
EXACT = ("step", "examples", "tokens", "lr", *METRICS)


@pytest.fixture(scope="module")
def runs(corpus_root, tmp_path_factory):
    corpus = str(next(corpus_root.glob("corpus-*")))
    two, one, split = (tmp_path_factory.mktemp(name) for name in ("two", "one", "split"))
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([launcher, "--standalone", "--nproc-per-node", "2", str(ROOT / "tests" / "lm_fsdp_worker.py"),
                           corpus, str(two)], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    w.main(corpus, str(one), "--no-fsdp")
    w.main(corpus, str(split), "--no-fsdp", "--split")
    return dict(corpus=corpus, two=two, one=one, split=split)


def load(folder: Path, name: str, rank: int = 0) -> dict:
    return torch.load(folder / f"{name}-rank{rank}.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def metrics_close(run: list[dict], one: list[dict], split: list[dict]) -> bool:
    """Every logged metric of ``run`` within 10x its perturbation: the split run's difference from ``one``, or one
    float32 rounding of the value (the loss itself is summed in another order across the ranks) if larger."""
    assert [row["step"] for row in run] == [row["step"] for row in one] == [row["step"] for row in split]
    eps = torch.finfo(torch.float32).eps
    return all(abs(x[k] - y[k]) <= 10 * max(abs(z[k] - y[k]), eps * abs(y[k]))
               for x, y, z in zip(run, one, split) for k in METRICS if y.get(k) is not None)


@pytest.mark.parametrize("run", w.RUNS, ids=["-".join(r) for r in w.RUNS])
def test_fsdp_matches_one_process(runs, run):
    name = "-".join(run)
    rank0, rank1 = (load(runs["two"], name, r) for r in (0, 1))
    one, split = load(runs["one"], name), load(runs["split"], name)
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])  # the full weights
    assert rank0["history"] == rank1["history"] or all(  # every rank logs the same numbers (timings aside)
        {k: x[k] for k in EXACT if k in x} == {k: y[k] for k in EXACT if k in y}
        for x, y in zip(rank0["history"], rank1["history"]))

    tolerance = 10 * max_diff(split["weights"], one["weights"])
    assert max_diff(rank0["weights"], one["weights"]) <= tolerance, (max_diff(rank0["weights"], one["weights"]),
                                                                       tolerance)
    assert metrics_close(rank0["history"], one["history"], split["history"])
    if len(run) == 2:   # the clipping binds at every step (layer-wise runs do not clip)
        assert all(row["grad_norm"] > w.GRAD_CLIP for row in one["history"][1:])

    folder = runs["two"] / name  # the DCP folder, with the small state inside; nothing else, no temporaries
    assert {p.name for p in folder.iterdir()} == {CHECKPOINT_DIR, "metrics.jsonl", "metrics.csv", ".lock"}
    assert (folder / CHECKPOINT_DIR / ".metadata").exists() and (folder / CHECKPOINT_DIR / STATE).exists()
    assert torch.load(folder / CHECKPOINT_DIR / STATE, weights_only=True)["step"] == w.STEPS


def test_fsdp_resume_is_bit_identical(runs):
    name = "-".join(w.RESUMED)
    whole, resumed = load(runs["two"], name), load(runs["two"], name + "-resumed")
    assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"])
    assert [{k: x[k] for k in EXACT if k in x} for x in whole["history"]] == \
           [{k: x[k] for k in EXACT if k in x} for x in resumed["history"]]


def test_resume_cannot_flip_fsdp(runs):
    task = w.make_task(runs["corpus"])
    cfg = w.config(*w.RESUMED, False, runs["two"] / ("-".join(w.RESUMED) + "-resumed"), resume=True)
    with pytest.raises(ValueError, match="fsdp: True -> False"):
        train(task, cfg)


def test_fsdp_refusals_and_flag(task, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'wrapper' with fsdp"):
        TrainConfig(method="galore", path="wrapper", fsdp=True)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="fsdp: True without torchrun"):
        train(task, TrainConfig(method="galore", fsdp=True, steps=2, out_dir=str(tmp_path), progress=False))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert parser.parse_args(["--fsdp"]).fsdp and not parser.parse_args([]).fsdp


def test_interrupted_checkpoint_swap_is_recovered(tmp_path):
    """A kill between the two renames leaves the previous checkpoint under ``.checkpoint.old``: resume finds it,
    and the next run puts it back; a stale one beside a complete checkpoint is deleted."""
    folder = RunFolder(tmp_path)
    folder.replaced.mkdir()
    (folder.replaced / STATE).write_bytes(b"old")
    assert saved_state(tmp_path) == folder.replaced / STATE
    assert folder.recover() and (tmp_path / CHECKPOINT_DIR / STATE).read_bytes() == b"old"
    assert not folder.replaced.exists() and saved_state(tmp_path) == tmp_path / CHECKPOINT_DIR / STATE
    folder.replaced.mkdir()
    assert not folder.recover() and not folder.replaced.exists()
    assert folder.existing() == [CHECKPOINT_DIR] and not (tmp_path / CHECKPOINT).exists()
    partial = tmp_path / f".{CHECKPOINT_DIR}.3.tmp"  # a save killed before its rename: removed by the next run
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"partial")
    _prepare_folder(folder, TrainConfig(resume=True))
    assert not partial.exists() and (tmp_path / CHECKPOINT_DIR / STATE).read_bytes() == b"old"


def _run_once_more_on_a_crash(command: list[str], out: Path, env: dict) -> subprocess.CompletedProcess:
    """Run ``command``; once more, in a fresh folder, if a process of it died by SIGSEGV.

    A rank of this two-process gloo run segfaulted once in about 13 runs of the full suite here (inside torch,
    not reproduced in 12 runs of the command alone; cause unknown). A crash is not a result of the code under
    test, so one retry is allowed; any other failure, and the comparison of the results, count at once. The
    crashed run's Python stacks (``PYTHONFAULTHANDLER``) are reported as a warning, for whoever looks for the
    cause.
    """
    import warnings

    env = {**env, "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    # a process of ours killed by the signal, or torchrun's summary naming it for a rank
    if done.returncode == -signal.SIGSEGV or (done.returncode != 0 and "(SIGSEGV)" in done.stderr):
        trace = done.stderr[done.stderr.find("Fatal Python error"):][:4000]
        warnings.warn(f"a rank died by SIGSEGV; retried once. Its stacks:\n{trace}")
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return done


def test_finetune_cli_with_fsdp_matches_one_process(tmp_path):
    """``torchrun -m golore_lab finetune --fsdp`` (the MiniLM classifier sharded block by block, 2 ranks) scores the
    test split as one process does. Two ranks sum the gradient in another order: float32 round-off (~1e-7
    relative) in each of 3 steps moves the losses by about as much; 1e-4 relative is three orders above that, and
    accuracy and F1 could differ only if an example's logit margin were below ~1e-6."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    args = ["finetune", "--preset", "fast", "--task", "bbc-news", "--method", "galore", "--optimizer", "adamw",
            "--steps", "3", "--update-proj-gap", "1", "--batch-size", "8", "--proj-type", "right", "--no-progress",
            "--threads", "1"]
    results = {}
    two = [launcher, "--standalone", "--nproc-per-node", "2", "-m", "golore_lab", *args, "--fsdp"]
    for name, command in [("one", [sys.executable, "-m", "golore_lab", *args]), ("two", two)]:
        done = _run_once_more_on_a_crash(command + ["--out", str(tmp_path / name)], tmp_path / name, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "test_metrics.json").read_text())
    assert (tmp_path / "two" / CHECKPOINT_DIR / ".metadata").exists() and not (tmp_path / "two" / CHECKPOINT).exists()
    assert results["one"].keys() == results["two"].keys()
    for key, value in results["one"].items():
        assert results["two"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
