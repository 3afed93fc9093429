"""Which pairs of a period estimate the captured signal on a language model: the evidence behind GoLore@auto's test.

    PYTHONPATH=. python bench/auto_estimators.py [--steps 3000] [--lr 1e-3] [--schedule constant|recipe]
                                                 [--out bench/results/auto_estimators.json]

GaLore-AdamW on the ``late`` LLaMA (one thread, clip 1, rank 16, τ = 100; constant lr after a linear warm-up of
300 steps, or with ``--schedule recipe`` the ``late`` recipe's cosine schedule over ``--steps``),
with ``switch_step="auto"`` whose decisions are recorded but never acted on, so that the SVD basis stays in
use. For every attention and MLP matrix and every period it keeps the projected gradients R_t = PᵀG_t and
the views Z_t = ΠᵀG_t on one fixed complement probe Π of the period (drawn by this benchmark), the library's
own test of the period (its fresh probe per pair), and at each refresh step the "truth": the gradient of 256
fixed training windows g, its ‖Pᵀg‖² and ‖g‖² for the new basis. Then, per period, the switch decision D < 0 of
(1 − r/d)·x − (r/d)(d − r)/q·y with x, y estimated from: all pairs of the period (the estimator of the first
version of the test), pairs at least 10 steps apart, consecutive pairs (point estimates), and the library's
test (disjoint adjacent pairs with a fresh probe each, t-test at ``switching.LEVEL``); the "truth" column is
κ = ‖Pᵀg‖²/‖g‖² < r/d, exactly. Also the median ratio of each estimate of ‖Pᵀg‖² (and of ‖Πᵀg‖², to its mean
over probes q/(d − r)·‖(I − PPᵀ)g‖²) to its truth: a ratio that is equal for P and Π leaves the decision
unbiased (the small batch's gradient is clipped, which scales both alike). The rates are also given for the periods in the
last 30% of the run (``late``), where the recipe's schedule has lowered the learning rate.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from golore_lab import SubspaceAdamW, switching
from golore_lab.lm.data import ensure_corpus
from golore_lab.lm.model import LlamaConfig
from golore_lab.lm.pretrain import LMTask, recipe
from golore_lab.lm.train import lr_factor
from golore_lab.projection import projected_side


def record(steps: int, lr: float, schedule: str = "constant", gap: int = 100, rank: int = 16, seed: int = 0):
    """Train; return (streams, truth, tests): streams[(position, refresh)] = [(R_t, Z_t)] (the views of the
    period's steps after its refresh on the period's basis P and on a fixed probe Π of this benchmark), truth[key]
    the true gradient's numbers at the refresh, tests[key] the library's own test of that period (taken at the
    next refresh, with its fresh probe per pair)."""
    torch.manual_seed(seed)
    cfg = recipe("late", steps=steps, lr=lr)
    task = LMTask(ensure_corpus(log=lambda *_: None), LlamaConfig.preset("late"), eval_windows=64, eval_batch=64)
    model = task.build_model(seed)
    groups = task.param_groups(model, rank=rank, update_proj_gap=gap)
    opt = SubspaceAdamW(groups, lr=lr, projection="svd", switch_step="auto", seed=seed)
    matrices = groups[0]["params"]
    sides = [projected_side(tuple(p.shape), "std") for p in matrices]
    position = {id(opt.state[p]): i for i, p in enumerate(matrices)}  # filled after the first step
    streams, truth, tests, probes, now = {}, {}, {}, {}, {"step": 0}
    decide = switching.decide

    def observe(state, r, reduce=None):  # the decision is recorded, never acted on
        test = decide(state, r, reduce)
        if test is not None:
            tests[(position[id(state)], now["step"] - gap)] = test
        return None if test is None else switching.SwitchTest(test.pairs, test.signal, test.random_signal, test.t,
                                                              test.threshold, False)

    switching.decide = observe
    reference = task.batch(10**6, 256, seed + 12345)
    try:
        for step in range(steps):
            now["step"] = step
            for group in opt.param_groups:
                group["lr"] = lr * (min(1.0, (step + 1) / 300) if schedule == "constant" else lr_factor(step, cfg))
            if step % gap == 0 and step > 0:
                opt.zero_grad()
                task.loss(model, reference).backward()
                reference_grads = [p.grad.clone() for p in matrices]
            opt.zero_grad()
            task.loss(model, task.batch(2 * step, 2, seed)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if step % gap:  # the views the library's statistic sees (weight decay 0: the raw gradient)
                for i, (p, side) in enumerate(zip(matrices, sides)):
                    P, Pi = opt.state[p]["proj"], probes[i]
                    on = (lambda B: B.T @ p.grad) if side == "left" else (lambda B: p.grad @ B)
                    streams.setdefault((i, step // gap * gap), []).append((on(P), on(Pi)))
            opt.step()
            position.update({id(opt.state[p]): i for i, p in enumerate(matrices)})
            if step % gap == 0:
                for i, p in enumerate(matrices):
                    P = opt.state[p]["proj"]
                    probes[i] = switching.complement_probe(P, torch.Generator().manual_seed(10**6 * i + step))
                    if step > 0:
                        g = reference_grads[i]
                        inside = (P.T @ g if sides[i] == "left" else g @ P).square().sum().item()
                        truth[(i, step)] = dict(signal=inside, total=g.square().sum().item(), dim=P.shape[0],
                                                rank=P.shape[1], probe=probes[i].shape[1])
    finally:
        switching.decide = decide
    return streams, truth, tests


def pair_mean(views: list[torch.Tensor], lag_min: int = 1, lag_max: int | None = None) -> float:
    total, count = 0.0, 0
    for a in range(len(views)):
        for b in range(a + lag_min, min(len(views), a + (lag_max or len(views)) + 1)):
            total += (views[a] * views[b]).sum().item()
            count += 1
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=("constant", "recipe"), default="constant")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    streams, truth, tests = record(args.steps, args.lr, args.schedule)
    estimators = {"all pairs": dict(), "pairs >= 10 apart": dict(lag_min=10), "consecutive pairs": dict(lag_max=1)}
    switches = {name: [] for name in [*estimators, "library test", "truth"]}
    late = []  # the period lies in the last 30% of the run
    ratios = {name: {"P": [], "probe": []} for name in estimators}
    for key, t in sorted(truth.items()):
        period = streams.get((key[0], key[1]), [])
        if len(period) < 20 or key not in tests:
            continue
        d, r, q = t["dim"], t["rank"], t["probe"]
        a, b = 1 - r / d, r / d * (d - r) / q
        outside = q / (d - r) * (t["total"] - t["signal"])  # E over probes of ‖Πᵀg‖²
        switches["truth"].append(t["signal"] < r / d * t["total"])  # exact: κ < r/d
        late.append(key[1] >= 0.7 * args.steps)
        R, Z = [v[0] for v in period], [v[1] for v in period]
        for name, kw in estimators.items():
            x, y = pair_mean(R, **kw), pair_mean(Z, **kw)
            switches[name].append(a * x - b * y < 0)
            ratios[name]["P"].append(x / t["signal"])
            ratios[name]["probe"].append(y / outside)
        switches["library test"].append(tests[key].switch)
    result = {"steps": args.steps, "lr": args.lr, "schedule": args.schedule, "periods": len(switches["truth"]),
              "late_periods": sum(late), "level": switching.LEVEL,
              "switch_rate": {k: sum(v) / len(v) for k, v in switches.items()},
              "late_switch_rate": {k: sum(x for x, l in zip(v, late) if l) / max(sum(late), 1)
                                   for k, v in switches.items()},
              "median_ratio_to_truth": {k: {s: statistics.median(v[s]) for s in v} for k, v in ratios.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        from golore_lab.fileio import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
