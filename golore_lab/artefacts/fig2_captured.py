"""Figure 2 on the counterexample: what each subspace captures of the true gradient, SGD and AdamW.

GaLore, GoLore (random subspaces throughout, ``golore@100``) and L.B. GaLore at the Figure 1 settings, logging
the captured fraction κ = ‖Pᵀ∇f‖²/‖∇f‖² of the basis in use and the largest singular value of M = X₁₁ + D
(GaLore keeps a direction of M at a refresh iff its singular value exceeds σ). The frame, long form: one row
per (optimizer, quantity, method, logged point) with ``mean, min, max`` over seeds; ``quantity`` is ``loss``,
``captured`` or ``top_sv``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from ..plotting import GREY, band_plot, legend_below
from .fig1_counterexample import ADAMW, SGD, Panel, thin

NAME = "fig2_captured"
METHODS = ("galore", "golore@100", "lb-galore")
QUANTITIES = ("loss", "captured", "top_sv")


@dataclass(frozen=True)
class Config:
    preset: str
    seeds: int
    panels: tuple[Panel, ...] = (replace(SGD, methods=METHODS), replace(ADAMW, methods=METHODS))
    noise: str = "anisotropic"
    thin: int = 5


PRESETS = {"fast": Config("fast", seeds=2), "default": Config("default", seeds=5), "full": Config("full", seeds=10)}
GROUP_BY = ("optimizer", "quantity", "method")


def expected_groups(config: Config) -> list[tuple]:
    return [(p.optimizer, q, m) for p in config.panels for q in QUANTITIES for m in p.methods]


def summarize_columns(frame: pd.DataFrame, columns=QUANTITIES, by=("optimizer", "method", "step")) -> pd.DataFrame:
    """Mean, min and max over seeds of several logged columns, in long form (one row per column)."""
    parts = [frame.groupby(list(by), sort=False)[column].agg(["mean", "min", "max"]).reset_index()
             .assign(quantity=column) for column in columns]
    return pd.concat(parts, ignore_index=True)


def run(config: Config) -> pd.DataFrame:
    problem = ce.Counterexample(noise=config.noise)
    frames = [thin(summarize_columns(panel.run(problem, config.seeds)), config.thin) for panel in config.panels]
    return pd.concat(frames, ignore_index=True)


def _quantity(data: pd.DataFrame, name: str) -> pd.DataFrame:
    return data[data["quantity"] == name]


def plot(frame: pd.DataFrame) -> plt.Figure:
    """Per optimizer (columns): κ over iterations (top) and the largest singular value of M (bottom)."""
    problem = ce.Counterexample()
    optimizers = list(dict.fromkeys(frame["optimizer"]))
    fig, axes = plt.subplots(2, len(optimizers), figsize=(5.6 * len(optimizers), 5.4), sharex="col",
                             height_ratios=[3, 2], squeeze=False)
    for col, optimizer in enumerate(optimizers):
        top, bottom = axes[:, col]
        data = frame[frame["optimizer"] == optimizer]
        band_plot(top, _quantity(data, "captured"), x_scale=100.0)
        top.axhline(problem.r / problem.n, color="k", ls="--", lw=0.9, label=f"r/m = {problem.r / problem.n:g}")
        top.set_ylabel("captured fraction ‖Pᵀ∇f‖² / ‖∇f‖²")
        top.set_ylim(-0.03, 1.03)
        top.set_title(f"What the subspace captures, counterexample, {optimizer}", fontsize=10)
        band_plot(bottom, _quantity(data, "top_sv"), x_scale=100.0)
        bottom.axhline(problem.noise_sigma, color=GREY, ls=":", lw=1.2, label="σ")
        bottom.set_ylabel("largest sᵢ(M)")
        bottom.set_xlabel("iterations (×100)")
        handles = {label: h for ax in (top, bottom) for h, label in zip(*ax.get_legend_handles_labels())}
        legend_below(bottom, ncol=3, y=-0.33, handles=list(handles.values()), labels=list(handles))
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
