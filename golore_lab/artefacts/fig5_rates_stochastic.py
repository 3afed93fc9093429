"""Proof figure 5c: GoLore and L.B. GaLore converge at O(1/√T), GaLore does not, on the counterexample.

For each horizon T: plain SGD in the subspace with η = ``lr_scale``/√T, L.B. batch ⌈``batch_scale``·√T⌉,
τ = ``update_proj_gap`` (:func:`golore_lab.theory.stochastic_rates`); the plotted quantity is (1/T)Σ‖∇f‖²,
mean and min–max over seeds, with the log-log slope fitted from T ≥ ``slope_from``. The frame: one row per
(method, T, seed).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from ._fig5_plots import rates_figure

NAME = "fig5_rates_stochastic"


@dataclass(frozen=True)
class Config:
    preset: str
    steps: tuple[int, ...]
    seeds: int
    methods: tuple[str, ...] = ("galore", "golore@100", "lb-galore")
    lr_scale: float = 1.0
    batch_scale: float = 1.0
    update_proj_gap: int = 10


PRESETS = {"fast": Config("fast", (500, 1000, 2000, 4000, 8000), 4),
           "default": Config("default", (500, 1000, 2000, 4000, 8000, 16000, 32000), 8),
           "full": Config("full", tuple(500 * 2**k for k in range(9)), 16)}
GROUP_BY = ("method", "steps")
#: log-log slopes are fitted from this T on (after the start-up transient)
SLOPE_FROM = 1000


def expected_groups(config: Config) -> list[tuple]:
    return [(m, t) for m in config.methods for t in config.steps]


def run(config: Config) -> pd.DataFrame:
    from .. import theory as th

    return th.stochastic_rates(ce.Counterexample(), config.steps, methods=config.methods,
                               seeds=range(config.seeds), lr_scale=config.lr_scale,
                               batch_scale=config.batch_scale, update_proj_gap=config.update_proj_gap)


def plot(frame: pd.DataFrame) -> plt.Figure:
    from .. import theory as th

    problem = ce.Counterexample()
    summary = th.rate_summary(frame)
    slopes = th.rate_slopes(summary, SLOPE_FROM).to_dict()
    seeds = frame["seed"].nunique()
    return rates_figure(summary, slopes, -0.5, f"η = 1/√T, L.B. batch ⌈√T⌉, τ = 10, {seeds} seeds",
                        floor=2 * (problem.galore_plateau - problem.f_star))
