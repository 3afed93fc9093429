"""Proof figure 5a: GoLore's bases are unbiased, E[PPᵀ] = (r/m)·I, and so is its projected gradient.

Left: the Monte Carlo error ‖mean_{i≤N} PᵢPᵢᵀ − (r/m)I‖_F of N Haar bases against N, per replicate and its RMS,
with the closed form √(r(1 − r/m)/N) (:func:`golore_lab.theory.stiefel_mean_study`). Right: the relative bias
of the running mean of the projected stochastic gradient at the no-B instance's X₀, GoLore vs GaLore
(:func:`golore_lab.theory.projected_gradient_bias`). The frame: the two tables stacked, ``panel`` saying which.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from ..threads import num_threads
from ._fig5_plots import stiefel_mean_figure

NAME = "fig5_stiefel_mean"


@dataclass(frozen=True)
class Config:
    preset: str
    mc_sizes: tuple[int, ...]
    replicates: int
    bias_samples: int
    dim: int = 10
    rank: int = 4


PRESETS = {"fast": Config("fast", tuple(2**k for k in range(3, 12)), 6, 2048),
           "default": Config("default", tuple(2**k for k in range(3, 13)), 8, 4096),
           "full": Config("full", tuple(2**k for k in range(3, 16)), 16, 32768)}
GROUP_BY = ("panel",)


def expected_groups(config: Config) -> list[tuple]:
    return [("stiefel_mean",), ("projected_gradient_bias",)]


def run(config: Config) -> pd.DataFrame:
    from .. import theory as th

    with num_threads(1):  # 10 × 10 matrices: OpenMP threads only add overhead
        study = th.stiefel_mean_study(config.dim, config.rank, config.mc_sizes, config.replicates)
        no_b = ce.Counterexample(linear_term=False)
        sizes = [2**k for k in range(2, 20) if 2**k <= config.bias_samples]
        bias = pd.concat([th.projected_gradient_bias(no_b, no_b.x0, projection, config.bias_samples, sizes=sizes)
                          .assign(method=method) for method, projection in [("golore@100", "random"), ("galore", "svd")]],
                         ignore_index=True)
    frame = pd.concat([study.assign(panel="stiefel_mean"), bias.assign(panel="projected_gradient_bias")],
                      ignore_index=True)
    return frame.assign(dim=config.dim, rank=config.rank)


def parts(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(study, bias)``: the two tables of the frame, each with only its own columns."""
    study = frame[frame["panel"] == "stiefel_mean"].dropna(axis=1, how="all").drop(columns="panel")
    bias = frame[frame["panel"] == "projected_gradient_bias"].dropna(axis=1, how="all").drop(columns="panel")
    return study.reset_index(drop=True), bias.reset_index(drop=True)


def plot(frame: pd.DataFrame) -> plt.Figure:
    from .. import theory as th

    study, bias = parts(frame)
    rms = th.rms_by_size(study)
    return stiefel_mean_figure(study, rms, bias, int(frame["dim"].iloc[0]), int(frame["rank"].iloc[0]),
                               th.loglog_slope(rms.samples, rms.rms))
