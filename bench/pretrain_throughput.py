"""Throughput, optimizer state and peak memory of each pre-training method, and the training program's overhead.

    python bench/pretrain_throughput.py [--model cpu] [--steps 40] [--rounds 3] [--threads 1]

All timings come from one process, with the methods interleaved round by round (so a busy machine slows every
method alike); each number is the median over rounds. Measured:

* tokens/s of ``train()`` for Full AdamW, GaLore, GoLore (random projections from the start: the method's
  steady state) and L.B. GaLore, and each one's ratio to Full AdamW. "amortized" = tokens / seconds over whole
  ``update_proj_gap`` periods after the first, so every SVD refresh is paid for; targets: GoLore >= 0.95x,
  GaLore (amortized) >= 0.9x;
* the overhead of ``train()`` itself: Full AdamW through ``train()`` vs a bare loop (forward, backward, clip,
  step, zero_grad on the same model, batches prepared beforehand); target <= 5 %;
* optimizer-state bytes (sum over ``optimizer.state`` tensors) for the chosen model and for LLaMA-60M, and the
  peak resident memory of a short run of each method in a fresh subprocess (``ru_maxrss``).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab.lm.data import ensure_corpus  # noqa: E402
from golore_lab.lm.model import LlamaConfig, build_model, subspace_param_groups  # noqa: E402
from golore_lab.lm.pretrain import LMTask, recipe  # noqa: E402
from golore_lab.lm.train import make_optimizer, train  # noqa: E402

METHODS = {"full": {}, "galore": {}, "golore": {"switch_fraction": 1.0}, "lb-galore": {}}


def timed_train(task, cfg) -> dict:
    """Tokens/s of one ``train()`` run from its metrics rows (first logging window dropped as warm-up)."""
    rows = [r for r in train(task, cfg).history if r["step"] > 0]
    gap = cfg.update_proj_gap
    start = next(r for r in rows if r["step"] >= gap)  # amortize over whole periods after the first
    end = max((r for r in rows if r["step"] % gap == 0), key=lambda r: r["step"])
    windows = [(b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(rows, rows[1:])]
    return {"median_window": statistics.median(windows),
            "amortized": (end["tokens"] - start["tokens"]) / (end["elapsed_s"] - start["elapsed_s"])}


def bare_loop(task, cfg, steps: int) -> float:
    """Tokens/s of the plainest loop over the same model, optimizer and batches (prepared beforehand)."""
    model = task.build_model(cfg.seed)
    opt = make_optimizer(task.param_groups(model), cfg)
    batches = [task.batch(i * cfg.batch_size, cfg.batch_size, cfg.seed) for i in range(steps)]
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    warm = times[cfg.log_every:]
    return task.count_tokens(batches[0]) * len(warm) / sum(warm)


def state_bytes(model_name: str, method: str, vocab_size: int) -> int:
    """Bytes of optimizer state after one step on random gradients (AdamW, the recipe's rank)."""
    cfg = recipe(model_name, method=method, **METHODS[method])
    model = build_model(LlamaConfig.preset(model_name, vocab_size=vocab_size))
    subspace = {} if method == "full" else dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap)
    opt = make_optimizer(subspace_param_groups(model, **subspace), cfg)
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    opt.step()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def child_peak(args, method: str) -> dict:
    """Run a few steps of ``method`` in a fresh process; report its peak RSS (MiB)."""
    code = (f"import sys, resource, torch; sys.argv=['x']; torch.set_num_threads({args.threads});"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r});"
            f"import pretrain_throughput as b; b.child_main({args.model!r}, {method!r}, {args.vocab_size})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(model_name: str, method: str, vocab_size: int) -> None:
    corpus = ensure_corpus(vocab_size=vocab_size, log=lambda m: None)
    task = LMTask(corpus, LlamaConfig.preset(model_name))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = recipe(model_name, method=method, steps=25, eval_every=10_000, progress=False, **METHODS[method])
    train(task, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak / 1024, "training_rss_mib": (peak - before) / 1024}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu", choices=["tiny", "cpu", "60m"])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run (a multiple of the recipe's tau)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = LMTask(ensure_corpus(vocab_size=args.vocab_size), LlamaConfig.preset(args.model))
    base = recipe(args.model, steps=args.steps, warmup_steps=2, eval_every=10 * args.steps, log_every=5,
                  progress=False)
    results = {m: [] for m in METHODS}
    bare = []
    for round_ in range(args.rounds):
        for method, extra in METHODS.items():
            results[method].append(timed_train(task, replace(base, method=method, **extra)))
        bare.append(bare_loop(task, base, args.steps))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
            f"{m} {results[m][-1]['amortized']:.0f}" for m in METHODS) + f", bare {bare[-1]:.0f} tokens/s",
            file=sys.stderr)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    full = med["full"]
    report = {"model": args.model, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "tokens_per_step": base.batch_size * task.seq_len, "update_proj_gap": base.update_proj_gap,
              "methods": {}}
    for method in METHODS:
        report["methods"][method] = {
            "tokens_per_s_amortized": med[method]["amortized"],
            "tokens_per_s_median_window": med[method]["median_window"],
            "ratio_vs_full_amortized": med[method]["amortized"] / full["amortized"],
            "ratio_vs_full_median_window": med[method]["median_window"] / full["median_window"],
            "optimizer_state_bytes": state_bytes(args.model, method, args.vocab_size),
            "optimizer_state_bytes_60m_v32k": state_bytes("60m", method, 32000),
            **child_peak(args, method),
        }
    bare_median = statistics.median(bare)
    report["bare_loop_tokens_per_s"] = bare_median
    report["train_overhead_vs_bare"] = 1.0 - full["median_window"] / bare_median
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
