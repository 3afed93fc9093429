"""Figure 2, the signal-to-noise sweep: the captured fraction of ∇f(X₀) against its SNR ‖∇f‖₂/σ.

At the counterexample's X₀ the direction of ∇f is fixed and its size set to each SNR; one stochastic gradient
adds ±σC averaged over a batch of B signs. The top-r SVD of that sample captures the gradient only above the
noise (threshold ∝ 1/√B), a random basis captures r/m at every SNR (:func:`golore_lab.analysis.snr_sweep`).
The frame: one row per (method, snr) with ``captured`` (mean over trials) and ``stderr``.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import counterexample as ce
from ..plotting import method_style

NAME = "fig2_snr_sweep"


@dataclass(frozen=True)
class Config:
    preset: str
    trials: int
    batches: tuple[int, ...] = (1, 4, 16, 64, 256)
    snr_range: tuple[float, float] = (0.02, 20.0)
    points: int = 31  # geometrically spaced SNRs over snr_range
    seed: int = 0


PRESETS = {"fast": Config("fast", trials=100), "default": Config("default", trials=400),
           "full": Config("full", trials=2000)}
GROUP_BY = ("method",)


def expected_groups(config: Config) -> list[tuple]:
    return [(f"svd (B={b})",) for b in config.batches] + [("random",)]


def run(config: Config) -> pd.DataFrame:
    from ..analysis import snr_sweep

    problem = ce.Counterexample()
    snrs = np.geomspace(*config.snr_range, config.points)
    return snr_sweep(problem.grad(problem.x0), problem.noise_sigma * problem.C, problem.r, snrs, config.batches,
                     config.trials, config.seed, noise_scale=problem.noise_sigma)


def plot(frame: pd.DataFrame) -> plt.Figure:
    problem = ce.Counterexample()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    cmap = plt.get_cmap("viridis")
    batches = sorted(b for b in frame["batch"].unique() if b > 0)
    markers = "ov^sDP"
    for i, batch in enumerate(batches):
        rows = frame[frame["batch"] == batch]
        ax.plot(rows["snr"], rows["captured"], color=cmap(i / max(1, len(batches) - 1)), marker=markers[i % 6],
                ms=3, markevery=3, label=f"SVD, B = {batch}")
    rows = frame[frame["method"] == "random"]
    ax.plot(rows["snr"], rows["captured"], **method_style("golore@100", label="random (GoLore)", ms=3, markevery=3))
    ax.axhline(problem.r / problem.n, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("signal-to-noise ratio ‖∇f‖₂ / σ")
    ax.set_ylabel("captured fraction (mean over trials)")
    ax.set_title("SVD captures the gradient only above the noise; random captures r/m", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig
