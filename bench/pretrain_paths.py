"""Pre-training throughput of the optimizer path vs the wrapper path (``--path``), one process.

    python bench/pretrain_paths.py [--model cpu] [--steps 48] [--rounds 3] [--threads 1] [--out paths.json]

Each round runs, for every method (GaLore, GoLore with random projections from the start -- its steady state --
and L.B. GaLore, all with AdamW), a whole ``train()`` call on each path, interleaved so that a busy machine slows
both alike; reported are the medians over rounds of tokens/s in process CPU time (one thread: what the run
costs, robust to other jobs) and wall-clock, and the wrapper / optimizer ratio. ``--steps`` should be a multiple
of the recipe's ``update_proj_gap`` so that each run pays for the same refreshes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab.lm.data import ensure_corpus  # noqa: E402
from golore_lab.lm.model import LlamaConfig  # noqa: E402
from golore_lab.lm.pretrain import LMTask, recipe  # noqa: E402
from pretrain_throughput import timed_train  # noqa: E402

METHODS = {"galore": {}, "golore@100": {}, "lb-galore": {}}
PATHS = ("optimizer", "wrapper")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu", choices=["tiny", "cpu", "60m"])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = LMTask(ensure_corpus(vocab_size=args.vocab_size), LlamaConfig.preset(args.model), eval_windows=1)
    base = recipe(args.model, steps=args.steps, warmup_steps=2, eval_every=10 * args.steps, log_every=args.steps,
                  progress=False)
    runs = {(m, p): [] for m in METHODS for p in PATHS}
    for round_ in range(args.rounds):
        for method, extra in METHODS.items():
            for path in PATHS:
                runs[method, path].append(timed_train(task, replace(base, method=method, path=path, **extra)))
        print(f"round {round_ + 1}/{args.rounds} (CPU tokens/s): " + ", ".join(
            f"{m}/{p} {r[-1]['cpu_tokens_per_s']:.0f}" for (m, p), r in runs.items()), file=sys.stderr)
    report = {"model": args.model, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "update_proj_gap": base.update_proj_gap, "rank": base.rank, "methods": {}}
    for method in METHODS:
        med = {p: {k: statistics.median(r[k] for r in runs[method, p]) for k in runs[method, p][0]} for p in PATHS}
        report["methods"][method] = {
            **{f"{p}_{k}": round(v, 1) for p in PATHS for k, v in med[p].items() if "tokens" in k},
            **{f"ratio_wrapper_vs_optimizer_{k}": round(med["wrapper"][k] / med["optimizer"][k], 3)
               for k in med["optimizer"] if "tokens" in k},
        }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
