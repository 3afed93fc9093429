"""Throughput, optimizer state and peak memory of each pre-training method, and the training program's overhead.

    python bench/pretrain_throughput.py [--model cpu] [--steps 40] [--rounds 3] [--threads 1]

All timings come from one process, with the methods interleaved round by round (so a busy machine slows every
method alike); each number is the median over rounds. Measured:

* tokens/s and steps/s of a whole ``train()`` call for Full AdamW, GaLore, GoLore (random projections from
  the start: the method's steady state) and L.B. GaLore, and each one's ratio to Full AdamW. A run of
  ``--steps`` steps (a multiple of ``update_proj_gap``) pays for every SVD refresh, so GaLore's number is
  amortized; targets: GoLore >= 0.95x, GaLore >= 0.9x. L.B. GaLore processes more tokens per step, so compare
  its steps/s;
* the overhead of ``train()`` itself: Full AdamW through ``train()`` vs a bare loop (forward, backward, clip,
  step, zero_grad on the same model and batches); target <= 5 %;
* both in process CPU time (one thread: what the run costs, robust to other jobs on a shared machine) and
  wall-clock;
* optimizer-state bytes (sum over ``optimizer.state`` tensors) for the chosen model and for LLaMA-60M, and the
  peak resident memory of a short run of each method in a fresh subprocess (``/proc/self/status`` VmHWM).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golore_lab.lm.data import ensure_corpus  # noqa: E402
from golore_lab.lm.model import LlamaConfig, build_model, llama_param_groups  # noqa: E402
from golore_lab.lm.pretrain import LMTask, recipe  # noqa: E402
from golore_lab.lm.train import make_optimizer, train  # noqa: E402

METHODS = {"full": {}, "galore": {}, "golore@100": {}, "lb-galore": {}}


def timed_train(task, cfg) -> dict:
    """Tokens/s and steps/s of one whole ``train()`` call (model build, ``steps`` steps, two 1-window evals).

    Both wall-clock and process CPU time are reported: with one thread the CPU time is what the run itself
    cost, unaffected by other jobs on a shared machine; wall-clock is what a user waits for.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(task, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = result.history[-1]["tokens"]
    return {"cpu_tokens_per_s": tokens / cpu, "wall_tokens_per_s": tokens / wall,
            "cpu_steps_per_s": cfg.steps / cpu, "wall_steps_per_s": cfg.steps / wall}


def bare_loop(task, cfg) -> dict:
    """The plainest loop over the same model, optimizer and batches: forward, backward, clip, step, zero_grad."""
    wall, cpu = time.perf_counter(), time.process_time()
    model = task.build_model(cfg.seed)
    opt = make_optimizer(task.param_groups(model), cfg)
    for i in range(cfg.steps):
        batch = task.batch(i * cfg.batch_size, cfg.batch_size, cfg.seed)
        task.loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = cfg.steps * cfg.batch_size * task.seq_len
    return {"cpu_tokens_per_s": tokens / cpu, "wall_tokens_per_s": tokens / wall,
            "cpu_steps_per_s": cfg.steps / cpu, "wall_steps_per_s": cfg.steps / wall}


def state_bytes(model_name: str, method: str, vocab_size: int) -> int:
    """Bytes of optimizer state after one step on random gradients (AdamW, the recipe's rank)."""
    cfg = recipe(model_name, method=method, **METHODS[method])
    model = build_model(LlamaConfig.preset(model_name, vocab_size=vocab_size))
    subspace = {} if method == "full" else dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap)
    opt = make_optimizer(llama_param_groups(model, **subspace), cfg)
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    opt.step()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def child_peak(args, method: str) -> dict:
    """Run a few steps of ``method`` in a fresh process; report its peak RSS and the training's share (MiB).

    Read from ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs`` just before training), not
    ``ru_maxrss``, which a child inherits from its (here much larger) parent across fork + exec.
    """
    code = (f"import sys, torch; sys.argv=['x']; torch.set_num_threads({args.threads});"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r});"
            f"import pretrain_throughput as b; b.child_main({args.model!r}, {method!r}, {args.vocab_size})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(model_name: str, method: str, vocab_size: int) -> None:
    corpus = ensure_corpus(vocab_size=vocab_size, log=lambda m: None)
    task = LMTask(corpus, LlamaConfig.preset(model_name))
    cfg = recipe(model_name, method=method, steps=25, eval_every=10_000, progress=False, **METHODS[method])
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark to the current RSS
        handle.write("5")
    train(task, cfg)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_mib": round(peak / 1024, 1), "training_rss_mib": round((peak - before) / 1024, 1)}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cpu", choices=["tiny", "cpu", "60m"])
    parser.add_argument("--steps", type=int, default=40, help="steps per timed run (a multiple of the recipe's tau)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = LMTask(ensure_corpus(vocab_size=args.vocab_size), LlamaConfig.preset(args.model), eval_windows=1)
    base = recipe(args.model, steps=args.steps, warmup_steps=2, eval_every=10 * args.steps, log_every=args.steps,
                  progress=False)
    results = {m: [] for m in METHODS}
    bare = []
    for round_ in range(0 if args.memory_only else args.rounds):
        for method, extra in METHODS.items():
            results[method].append(timed_train(task, replace(base, method=method, **extra)))
        bare.append(bare_loop(task, base))
        print(f"round {round_ + 1}/{args.rounds} (CPU tokens/s): " + ", ".join(
            f"{m} {results[m][-1]['cpu_tokens_per_s']:.0f}" for m in METHODS)
            + f", bare {bare[-1]['cpu_tokens_per_s']:.0f}", file=sys.stderr)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} if rs else {} for m, rs in results.items()}
    full = med["full"]
    report = {"model": args.model, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "tokens_per_step": base.batch_size * task.seq_len, "update_proj_gap": base.update_proj_gap,
              "methods": {}}
    for method in METHODS:
        report["methods"][method] = {
            **{k: round(v, 1) for k, v in med[method].items()},
            **{f"ratio_vs_full_{k}": round(v / full[k], 3) for k, v in med[method].items()},
            "optimizer_state_bytes": state_bytes(args.model, method, args.vocab_size),
            "optimizer_state_bytes_60m_v32k": state_bytes("60m", method, 32000),
            **child_peak(args, method),
        }
    bare_med = {k: statistics.median(b[k] for b in bare) for k in bare[0]} if bare else {}
    report["bare_loop"] = {k: round(v, 1) for k, v in bare_med.items()}
    report["train_overhead_vs_bare"] = {k: round(1.0 - full[k] / bare_med[k], 4) for k in bare_med}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
