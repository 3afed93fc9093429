"""DDP through torchrun (gloo, 2 CPU processes): identical weights on both ranks, equal to one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lm_ddp_worker
from lm_helpers import build_fixture_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    build_fixture_corpus(root)
    return root


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
    for name in ("golore-adamw", "lb-galore-sgd"):
        one = torch.load(tmp_path / "one" / f"{name}-rank0.pt", weights_only=True)
        r0 = torch.load(tmp_path / "two" / f"{name}-rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / "two" / f"{name}-rank1.pt", weights_only=True)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), name  # identical projections and steps on both ranks
        for k in r0:
            torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
