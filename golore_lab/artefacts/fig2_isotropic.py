"""Figure 2, the isotropic-noise control: the same SGD runs under the paper's anisotropic noise ±σC and under
i.i.d. Gaussian noise of the same total variance σ²r, where the noise has no preferred direction and GaLore's
SVD finds the gradient again.

The frame is :mod:`golore_lab.artefacts.fig2_captured`'s, with a ``noise`` column.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from ..plotting import band_plot, legend_below
from .fig1_counterexample import SGD, Panel, thin
from .fig2_captured import METHODS, QUANTITIES, summarize_columns

NAME = "fig2_isotropic"


@dataclass(frozen=True)
class Config:
    preset: str
    seeds: int
    panel: Panel = replace(SGD, methods=METHODS)
    noises: tuple[str, ...] = ("anisotropic", "isotropic")
    thin: int = 5


PRESETS = {"fast": Config("fast", seeds=2), "default": Config("default", seeds=5), "full": Config("full", seeds=10)}
GROUP_BY = ("noise", "quantity", "method")


def expected_groups(config: Config) -> list[tuple]:
    return [(n, q, m) for n in config.noises for q in QUANTITIES for m in config.panel.methods]


def run(config: Config) -> pd.DataFrame:
    frames = [thin(summarize_columns(config.panel.run(ce.Counterexample(noise=noise), config.seeds)), config.thin)
              .assign(noise=noise) for noise in config.noises]
    return pd.concat(frames, ignore_index=True)


def plot(frame: pd.DataFrame) -> plt.Figure:
    """Loss (top) and captured fraction (bottom), one column per noise model."""
    problem = ce.Counterexample()
    noises = list(dict.fromkeys(frame["noise"]))
    fig, axes = plt.subplots(2, len(noises), figsize=(4.75 * len(noises), 6.0), sharex=True, squeeze=False)
    for col, noise in enumerate(noises):
        part = frame[frame["noise"] == noise]
        band_plot(axes[0, col], part[part["quantity"] == "loss"], x_scale=100.0)
        axes[0, col].axhline(problem.f_star, color="k", ls="--", lw=0.9, label="f*")
        axes[0, col].set_title(f"{noise} noise (total variance σ²r)", fontsize=10)
        band_plot(axes[1, col], part[part["quantity"] == "captured"], x_scale=100.0)
        axes[1, col].axhline(problem.r / problem.n, color="k", ls=(0, (1, 2)), lw=0.9, label="r/m")
        axes[1, col].set_ylim(-0.03, 1.03)
        axes[1, col].set_xlabel("iterations (×100)")
    axes[0, 0].set_ylabel("loss f(X)")
    axes[1, 0].set_ylabel("captured fraction")
    handles = {label: h for ax in axes[:, 0] for h, label in zip(*ax.get_legend_handles_labels())}
    legend_below(axes[1, 0], ncol=5, handles=list(handles.values()), labels=list(handles))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
