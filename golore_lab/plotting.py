"""Plot helpers: each returns a matplotlib Figure and writes nothing (``FigureContext.save`` writes files)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

#: one colour per method family, the same in every figure
COLORS = {"full": "#4c72b0", "galore": "#dd8452", "lb-galore": "#55a868", "golore": "#c44e52"}
LABELS = {"full": "Full", "galore": "GaLore", "lb-galore": "L.B. GaLore"}


def method_color(method: str) -> str:
    return COLORS.get(method.split("@")[0], "#8172b3")


def method_label(method: str) -> str:
    if method.startswith("golore@"):
        return f"GoLore@{method.split('@')[1]}%"
    return LABELS.get(method, method.replace("golore", "GoLore"))


def band_plot(ax, summary: pd.DataFrame, x: str = "step", y: str = "mean", low: str = "min", high: str = "max",
              x_scale: float = 1.0) -> None:
    """One line per method with a shaded band (for example min–max over seeds)."""
    for method, rows in summary.groupby("method", sort=False):
        xs = rows[x] / x_scale
        style = "-." if method.startswith("golore") else "-"  # GoLore@x% runs on top of GaLore before the switch
        ax.plot(xs, rows[y], style, color=method_color(method), label=method_label(method), lw=1.6)
        if low in rows and high in rows:
            ax.fill_between(xs, rows[low], rows[high], color=method_color(method), alpha=0.2, lw=0)


def counterexample_figure(summary: pd.DataFrame, f_star: float, plateau: float | None, title: str,
                          ylim: tuple[float, float] | None = None) -> plt.Figure:
    """Figure 1 of the paper: loss f(X) against logged points (one per 100 steps), closed forms as lines."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    band_plot(ax, summary, x_scale=100.0)
    ax.axhline(f_star, color="k", ls="--", lw=0.9, label=f"f* = {f_star + 0.0:.4f}")
    if plateau is not None:
        ax.axhline(plateau, color="grey", ls=":", lw=1.2, label=f"GaLore plateau (closed form) = {plateau:.3f}")
    ax.set_xlabel("iterations (×100)")
    ax.set_ylabel("loss f(X)")
    ax.set_title(title, fontsize=10)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig
