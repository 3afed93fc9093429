"""DDP through torchrun (gloo, 2 CPU processes): identical weights on both ranks, equal to one process.

Both paths: the optimizer path (DDP over the plain model) and the wrapper path (DDP over the SubspaceModel,
whose W and P DDP ignores; the refreshes all-reduce the full gradients themselves).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import lm_ddp_worker

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_matches_one_process(corpus_root, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    corpus = str(next(corpus_root.glob("corpus-*")))
    worker = str(ROOT / "tests" / "lm_ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    lm_ddp_worker.main(corpus, str(tmp_path / "one"))  # one process, same global batch
    subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", worker, corpus, str(tmp_path / "two")],
                   check=True, env=env, timeout=120, capture_output=True)
    for run in lm_ddp_worker.RUNS:
        name = lm_ddp_worker.run_name(*run)
        one = torch.load(tmp_path / "one" / f"{name}-rank0.pt", weights_only=True)
        r0 = torch.load(tmp_path / "two" / f"{name}-rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / "two" / f"{name}-rank1.pt", weights_only=True)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), name  # identical projections and steps on both ranks
        for k in r0:
            torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        if run[2] == "wrapper":  # frozen W, bases P, factors B and step counters: bitwise equal on both ranks
            w0, w1 = (torch.load(tmp_path / "two" / f"{name}-rank{r}-wrapper.pt", weights_only=True) for r in (0, 1))
            assert w0.keys() == w1.keys() and any(k.endswith(".proj") for k in w0)
            for k in w0:
                assert (w0[k] == w1[k]) if k.endswith("_extra_state") else torch.equal(w0[k], w1[k]), f"{name}: {k}"
            assert {w0[k]["step"] for k in w0 if k.endswith("_extra_state")} == {6}
