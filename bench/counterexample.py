"""Speed of the counterexample: the batched fast engine against a step-by-step loop over the library optimizer.

    python bench/counterexample.py [--repeats 3] [--slow-steps 20000]

Prints the wall time of Figure 1 at the paper's settings (both panels, four methods, 10 noise seeds: SGD
200 000 steps, AdamW 100 000 steps), curve-seeds per second for both engines, and their ratio, all measured
in this run. The optimizer engine is timed on ``--slow-steps`` steps per curve and its rate is scaled to the
paper's length (its cost per step is constant). Medians over ``--repeats``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from golore_lab import counterexample as ce


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-steps", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    problem = ce.Counterexample()
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # one-time torch._dynamo import, not timed
    seeds = range(args.seeds)
    curves = {name: len(cfg["methods"]) * args.seeds for name, cfg in ce.PAPER.items()}

    fast = {name: statistics.median(timed(lambda: ce.run(problem, seeds=seeds, **cfg)) for _ in range(args.repeats))
            for name, cfg in ce.PAPER.items()}
    slow = {}
    for name, cfg in ce.PAPER.items():
        short = {**cfg, "steps": args.slow_steps, "methods": cfg["methods"]}
        seconds = statistics.median(
            timed(lambda: ce.run(problem, seeds=[0], engine="optimizer", **short)) for _ in range(args.repeats))
        slow[name] = seconds / len(cfg["methods"]) * cfg["steps"] / args.slow_steps  # seconds per full-length curve

    print(f"Figure 1 at the paper's settings, 4 methods x {args.seeds} seeds per panel "
          f"(median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'panel':<6} {'steps':>8} {'fast s':>8} {'fast curve-seeds/s':>19} {'optimizer curve-seeds/s':>24} "
          f"{'ratio':>7}")
    for name, cfg in ce.PAPER.items():
        fast_rate = curves[name] / fast[name]
        slow_rate = 1 / slow[name]
        print(f"{name:<6} {cfg['steps']:>8} {fast[name]:>8.2f} {fast_rate:>19.2f} {slow_rate:>24.4f} "
              f"{fast_rate / slow_rate:>7.0f}x")
    total_fast = sum(fast.values())
    total_slow = sum(slow[name] * curves[name] for name in ce.PAPER)
    print(f"both panels: fast {total_fast:.1f} s, optimizer loop {total_slow:.0f} s (extrapolated), "
          f"ratio {total_slow / total_fast:.0f}x")


if __name__ == "__main__":
    main()
