"""Proof figure 5d: deterministic GaLore (exact gradients) converges at O(1/T), under the derived bound.

One exact-gradient GaLore run with η = ``lr``, τ = ``update_proj_gap`` (L·η·τ = ½, the largest step the
bound allows; :func:`golore_lab.theory.deterministic_rate`): (1/T)Σ_{t<T}‖∇f‖² for every T ≤ ``steps``,
with the slope fitted from T ≥ ``slope_from``. The frame: one row per T (``method, steps, avg_grad_sq,
bound``).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import counterexample as ce
from ._fig5_plots import rates_figure

NAME = "fig5_rate_deterministic"


@dataclass(frozen=True)
class Config:
    preset: str
    steps: int
    lr: float = 0.05
    update_proj_gap: int = 10


PRESETS = {"fast": Config("fast", 4000), "default": Config("default", 8000), "full": Config("full", 32000)}
GROUP_BY = ("method",)
#: the slope is fitted from this T on (after the start-up transient)
SLOPE_FROM = 256


def expected_groups(config: Config) -> list[tuple]:
    return [("galore",)]


def run(config: Config) -> pd.DataFrame:
    from .. import theory as th

    return th.deterministic_rate(ce.Counterexample(noise="none"), steps=config.steps, lr=config.lr,
                                 update_proj_gap=config.update_proj_gap)


def slope(frame: pd.DataFrame) -> float:
    """The fitted log-log slope of (1/T)Σ‖∇f‖² against T, over T ≥ :data:`SLOPE_FROM`."""
    from .. import theory as th

    late = frame[frame.steps >= SLOPE_FROM]
    return th.loglog_slope(late.steps, late.avg_grad_sq)


def plot(frame: pd.DataFrame) -> plt.Figure:
    shown = frame[frame.steps.isin(np.unique(np.geomspace(1, frame.steps.max(), 40).astype(int)))]
    summary = shown.rename(columns={"avg_grad_sq": "mean"})
    return rates_figure(summary[["method", "steps", "mean"]], {"galore": slope(frame)}, -1.0,
                        "deterministic GaLore (exact gradients), η = 0.05, τ = 10", guides=("galore",),
                        bound=summary[["steps", "bound"]])
