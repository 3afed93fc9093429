"""Proof figure 5b: why a large batch rescues GaLore -- the perturbation bound ‖PᵀG‖ ≥ √δ‖G‖ − 2‖E‖.

Left and middle: the bound and its constant on random instances and on the no-B counterexample
(:func:`golore_lab.theory.perturbation_trials`, :func:`golore_lab.theory.counterexample_trials`); right: the
fraction of ‖∇f‖² the SVD of a batch-B stochastic gradient keeps at the no-B X₀, exactly and as bounded
(:func:`golore_lab.theory.large_batch_capture`). The frame: the two tables stacked, ``panel`` saying which.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from ..threads import num_threads
from ._fig5_plots import perturbation_figure

NAME = "fig5_perturbation_bound"


@dataclass(frozen=True)
class Config:
    preset: str
    trials: int
    batches: tuple[int, ...] = (1,) + tuple(2**k + 1 for k in range(1, 11))  # odd: no ties in the sign mean


PRESETS = {"fast": Config("fast", 40), "default": Config("default", 150), "full": Config("full", 500)}
GROUP_BY = ("panel",)


def expected_groups(config: Config) -> list[tuple]:
    return [("bound",), ("large_batch",)]


def run(config: Config) -> pd.DataFrame:
    from .. import theory as th

    no_b = ce.Counterexample(linear_term=False)
    with num_threads(1):
        trials = pd.concat([th.perturbation_trials(trials=config.trials), th.counterexample_trials(no_b),
                            th.counterexample_trials(no_b, cancel=True)], ignore_index=True)
        capture = th.large_batch_capture(no_b, config.batches)
    return pd.concat([trials.assign(panel="bound"), capture.assign(panel="large_batch")], ignore_index=True)


def parts(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(trials, capture)``: the two tables of the frame, each with only its own columns."""
    out = [frame[frame["panel"] == p].dropna(axis=1, how="all").drop(columns="panel").reset_index(drop=True)
           for p in ("bound", "large_batch")]
    return out[0], out[1]


def plot(frame: pd.DataFrame) -> plt.Figure:
    from .. import theory as th

    trials, capture = parts(frame)
    return perturbation_figure(trials, capture, delta=th.assumptions(ce.Counterexample()).delta)
