"""The counterexample numbers of docs/when_to_switch.md: GoLore@auto against GaLore and GoLore@x%.

    PYTHONPATH=. python bench/when_to_switch.py [--quick] [--only paper|others]

Every run comes from :func:`golore_lab.counterexample.run` with the same noise stream per seed: GaLore and
GoLore@x% on the fast engine, ``golore@auto`` (which always runs step by step through the library optimizer)
with its switch steps in ``frame.attrs["switch_steps"]``. Prints one table per panel: f − f* at the end (mean ± std over seeds),
the auto switch step per seed (None: never), the first logged step where GaLore's true captured fraction κ is
below r/m, and the step where GaLore's loss comes within 1% of f(X₀) − plateau of its closed-form plateau
(−1: never).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from golore_lab import counterexample as ce
from golore_lab.threads import num_threads


def panel(problem, optimizer, steps, lr, gap, seeds, percents):
    methods = ["galore"] + [f"golore@{x}" for x in percents]
    frame = ce.run(problem, methods, optimizer, steps, lr, gap, seeds, log_every=gap)
    final = frame[frame.step == steps].groupby("method", sort=False)["loss"]
    rows = {m: (final.get_group(m) - problem.f_star).to_numpy() for m in methods}
    galore = frame[frame.method == "galore"]
    r_over_m = problem.r / problem.n
    kappa_steps = [int(g[g.captured < r_over_m].step.min()) if (g.captured < r_over_m).any() else -1
                   for _, g in galore.groupby("seed")]
    f0, plateau = problem.f(problem.x0).item(), problem.galore_plateau
    near = plateau + 0.01 * (f0 - plateau)
    plateau_steps = [int(g[g.loss <= near].step.min()) if (g.loss <= near).any() else -1
                     for _, g in galore.groupby("seed")]
    start = time.time()
    auto = ce.run(problem, ["golore@auto"], optimizer, steps, lr, gap, seeds, log_every=steps)
    rows["golore@auto"] = auto[auto.step == steps].loss.to_numpy() - problem.f_star
    switches = [auto.attrs["switch_steps"][("golore@auto", seed)] for seed in seeds]
    print(f"\n{problem!r}, {optimizer}, {steps} steps, lr {lr}, gap {gap}, seeds {list(seeds)} "
          f"(auto: {time.time() - start:.0f} s)")
    for m, v in rows.items():
        print(f"  {m:12s} f - f* = {v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}   {np.round(v, 4)}")
    print(f"  auto switch steps:            {switches}")
    print(f"  GaLore kappa < r/m from step: {kappa_steps}")
    print(f"  GaLore at plateau from step:  {plateau_steps}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="the paper's instance scaled too (lr x10, steps /10), as the other instances always are")
    parser.add_argument("--only", choices=("paper", "others"), help="run one part only")
    args = parser.parse_args()
    paper_scale = 10 if args.quick else 1
    seeds = range(5)
    with num_threads(1):
        if args.only != "others":
            for optimizer, steps in (("sgd", 200_000), ("adamw", 100_000)):
                panel(ce.Counterexample(), optimizer, steps // paper_scale, 3e-5 * paper_scale, 100, seeds,
                      (25, 50, 75, 90, 100))
        if args.only == "paper":
            return
        for kw in (dict(n=12, r=3, sigma=1.0, seed=1), dict(n=10, r=4, sigma=0.5, seed=7),
                   dict(n=16, r=6, sigma=2.0, seed=3)):
            panel(ce.Counterexample(**kw), "sgd", 20_000, 3e-4, 100, seeds, (50, 75, 100))
        for kw in (dict(linear_term=False), dict(noise="isotropic"), dict(noise="none")):
            for optimizer, steps in (("sgd", 20_000), ("adamw", 10_000)):
                panel(ce.Counterexample(**kw), optimizer, steps, 3e-4, 100, seeds, (75,))


if __name__ == "__main__":
    main()
