"""Proof figure 5c: the noise floor at a fixed step size, the experiment that tests the stochastic theorems.

At η = 1/√T every convergent method on this strongly convex quadratic shows the slope −½ (exact-gradient
GaLore too), so a rate plot cannot test the theorems. At a *fixed* η the two terms of the bounds come apart:
after the start-up term has decayed, ‖∇f‖² sits at a floor made of the noise term (∝ η) and, for the SVD
methods, a bias (the price of choosing the basis from a noisy gradient, shrinking with the batch B).

Problem (1) with its two-point noise, τ = 1 (the case the derivations cover), plain SGD, every step logged,
T = ``horizon``/η steps, the floor = mean ‖∇f‖² over the second half (:func:`golore_lab.theory.noise_floors`).
Left: the floor against η — GoLore's falls like η onto its closed form; GaLore's (B = 1) and L.B. GaLore's
(B = ``batches``) do not depend on η: the noise never enters the rows f sees through an SVD basis here, so
their floor is all bias. Right: the floor against B at η = ``sweep_lr`` — L.B. GaLore's bias vanishes as B
grows (the package's odd/even law gives it exactly), GaLore's B = 1 value does not vanish with η: it
violates GoLore's theorem, which a method with a standard batch must satisfy. The frame: one row per
(panel, method, batch, lr, seed).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from ._fig5_plots import floors_figure

NAME = "fig5_rates_stochastic"


@dataclass(frozen=True)
class Config:
    preset: str
    lrs: tuple[float, ...]
    sweep_batches: tuple[int, ...]
    seeds: int
    horizon: float = 100.0
    batches: tuple[int, ...] = (3, 9)
    sweep_lr: float = 1e-2


PRESETS = {"fast": Config("fast", (5e-3, 1e-2, 3e-2, 1e-1), (2, 3, 4, 5, 8, 9, 17), 2, horizon=60.0),
           "default": Config("default", (2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1),
                             (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33), 4),
           "full": Config("full", (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1),
                          tuple(range(2, 34)), 8, horizon=200.0)}
GROUP_BY = ("panel", "method", "batch", "lr")
METHODS = ("golore@100", "galore", "lb-galore")


def expected_groups(config: Config) -> list[tuple]:
    by_lr = [("lr", m, 1, lr) for lr in config.lrs for m in METHODS[:2]]
    by_lr += [("lr", "lb-galore", b, lr) for lr in config.lrs for b in config.batches]
    by_batch = [("batch", m, 1, config.sweep_lr) for m in METHODS[:2]]
    by_batch += [("batch", "lb-galore", b, config.sweep_lr) for b in config.sweep_batches]
    return by_lr + by_batch


def run(config: Config) -> pd.DataFrame:
    from .. import theory as th

    problem, seeds = ce.Counterexample(), range(config.seeds)
    by_lr = th.noise_floors(problem, config.lrs, config.batches, METHODS, seeds, config.horizon)
    by_batch = th.noise_floors(problem, [config.sweep_lr], config.sweep_batches, METHODS, seeds, config.horizon)
    return pd.concat([by_lr.assign(panel="lr"), by_batch.assign(panel="batch")], ignore_index=True)


def plot(frame: pd.DataFrame) -> plt.Figure:
    from .. import theory as th

    problem = ce.Counterexample()
    return floors_figure(frame, problem, th.assumptions(problem))
