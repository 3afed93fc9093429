"""Figure 1: the counterexample, momentum-free SGD (left) and AdamW (right), at the paper's settings.

Loss f(X) of Full, GaLore, L.B. GaLore and GoLore@X% over the paper's 200 000 (SGD) / 100 000 (AdamW) steps,
mean and min–max over the noise seeds, with the closed-form GaLore plateau f* + ½Σmin(sᵢ(M₀), σ)² and f*.
The frame: one row per (optimizer, method, logged point) every ``thin`` × 100 steps, columns ``optimizer,
method, step, mean, std, min, max, seeds``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import pandas as pd

from .. import counterexample as ce
from ..plotting import GREY, band_plot, legend_below

NAME = "fig1_counterexample"


@dataclass(frozen=True)
class Panel:
    """One optimizer's run of the counterexample (the paper's Figure 1 settings by default)."""

    optimizer: str
    steps: int
    lr: float
    update_proj_gap: int
    methods: tuple[str, ...]
    batch: int = 100

    def run(self, problem: ce.Counterexample, seeds: int) -> pd.DataFrame:
        """The per-seed frame of :func:`golore_lab.counterexample.run` (all logged quantities)."""
        return ce.run(problem, methods=self.methods, optimizer=self.optimizer, steps=self.steps, lr=self.lr,
                      update_proj_gap=self.update_proj_gap, seeds=range(seeds), batch=self.batch)


#: the paper's panels: τ = 100, lr 3e-5, L.B. batch 100, GoLore@75% (SGD) and GoLore@50% (AdamW)
SGD = Panel(**ce.PAPER["sgd"])
ADAMW = Panel(**ce.PAPER["adamw"])


@dataclass(frozen=True)
class Config:
    preset: str
    seeds: int
    panels: tuple[Panel, ...] = (SGD, ADAMW)
    linear_term: bool = True
    thin: int = 5  # keep every 5th logged point (one per 500 steps)


PRESETS = {"fast": Config("fast", seeds=3), "default": Config("default", seeds=10),
           "full": Config("full", seeds=20)}
GROUP_BY = ("optimizer", "method")


def expected_groups(config: Config) -> list[tuple]:
    return [(p.optimizer, m) for p in config.panels for m in p.methods]


def thin(frame: pd.DataFrame, every: int, log_every: int = 100) -> pd.DataFrame:
    """Keep the logged points whose step is a multiple of ``every · log_every``."""
    return frame[frame["step"] % (every * log_every) == 0].reset_index(drop=True)


def run(config: Config) -> pd.DataFrame:
    problem = ce.Counterexample(linear_term=config.linear_term)
    frames = [thin(ce.summarize(panel.run(problem, config.seeds)), config.thin) for panel in config.panels]
    return pd.concat(frames, ignore_index=True).assign(seeds=config.seeds)


def draw(frame: pd.DataFrame, problem: ce.Counterexample, title: str, ylim=None) -> plt.Figure:
    """One panel per optimizer: the loss bands, f* and (with noise) the closed-form GaLore plateau."""
    optimizers = list(dict.fromkeys(frame["optimizer"]))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5.2 * len(optimizers), 3.9), squeeze=False)
    names = {"sgd": "SGD (no momentum)", "adamw": "AdamW"}
    for ax, optimizer in zip(axes[0], optimizers):
        part = frame[frame["optimizer"] == optimizer]
        band_plot(ax, part, x_scale=100.0)
        ax.axhline(problem.f_star, color="k", ls="--", lw=0.9, label=f"f* = {problem.f_star + 0.0:.4f}")
        ax.axhline(problem.galore_plateau, color=GREY, ls=":", lw=1.2,
                   label=f"GaLore plateau (closed form) = {problem.galore_plateau:.3f}")
        ax.set_xlabel("iterations (×100)")
        ax.set_ylabel("loss f(X)")
        ax.set_title(f"{names.get(optimizer, optimizer)}, mean and min–max over {int(part['seeds'].iloc[0])} seeds",
                     fontsize=10)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        legend_below(ax)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot(frame: pd.DataFrame) -> plt.Figure:
    return draw(frame, ce.Counterexample(), "The counterexample (problem (1)): GaLore stalls on its plateau")


def no_b(config: Config) -> Config:
    """The same configuration on the no-B instance."""
    return replace(config, linear_term=False)
