"""Plot helpers: each returns a matplotlib Figure and writes nothing (``FigureContext.save`` writes files)."""
from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
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


def _quantity(data: pd.DataFrame, name: str) -> pd.DataFrame:
    return data[data["quantity"] == name]


def captured_figure(data: pd.DataFrame, ratio: float, sigma: float, optimizer: str) -> plt.Figure:
    """Captured fraction of ∇f over iterations (top) and GaLore's largest singular value of M (bottom)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 5.2), sharex=True, height_ratios=[3, 2])
    band_plot(top, _quantity(data, "captured"), x_scale=100.0)
    top.axhline(ratio, color="k", ls="--", lw=0.9, label=f"r/m = {ratio:g}")
    top.set_ylabel("captured fraction ‖Pᵀ∇f‖² / ‖∇f‖²")
    top.set_ylim(-0.03, 1.03)
    top.legend(fontsize=8, loc="center right")
    top.set_title(f"What the subspace captures, counterexample, {optimizer}", fontsize=10)
    band_plot(bottom, _quantity(data, "top_sv"), x_scale=100.0)
    bottom.axhline(sigma, color="grey", ls=":", lw=1.2, label="σ")
    bottom.set_ylabel("largest sᵢ(M)")
    bottom.set_xlabel("iterations (×100)")
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def snr_figure(sweep: pd.DataFrame, ratio: float) -> plt.Figure:
    """Captured fraction of the true gradient against its SNR, for SVD of batches of B and random bases."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    cmap = plt.get_cmap("viridis")
    batches = sorted(b for b in sweep["batch"].unique() if b > 0)
    for i, batch in enumerate(batches):
        rows = sweep[sweep["batch"] == batch]
        ax.plot(rows["snr"], rows["captured"], color=cmap(i / max(1, len(batches) - 1)), label=f"SVD, B = {batch}")
    rows = sweep[sweep["method"] == "random"]
    ax.plot(rows["snr"], rows["captured"], color=COLORS["golore"], ls="-.", label="random (GoLore)")
    ax.axhline(ratio, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("signal-to-noise ratio ‖∇f‖₂ / σ")
    ax.set_ylabel("captured fraction (mean over trials)")
    ax.set_title("SVD captures the gradient only above the noise; random captures r/m", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def isotropic_figure(data: pd.DataFrame, f_star: float, ratio: float) -> plt.Figure:
    """Loss and captured fraction under the paper's anisotropic noise and under isotropic noise."""
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 6.0), sharex=True)
    for col, noise in enumerate(("anisotropic", "isotropic")):
        part = data[data["noise"] == noise]
        band_plot(axes[0, col], _quantity(part, "loss"), x_scale=100.0)
        axes[0, col].axhline(f_star, color="k", ls="--", lw=0.9)
        axes[0, col].set_title(f"{noise} noise (total variance σ²r)", fontsize=10)
        band_plot(axes[1, col], _quantity(part, "captured"), x_scale=100.0)
        axes[1, col].axhline(ratio, color="k", ls="--", lw=0.8)
        axes[1, col].set_ylim(-0.03, 1.03)
        axes[1, col].set_xlabel("iterations (×100)")
    axes[0, 0].set_ylabel("loss f(X)")
    axes[1, 0].set_ylabel("captured fraction")
    axes[0, 0].legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


CAPTURE_STYLE = {"svd": ("SVD of one batch (GaLore)", COLORS["galore"], "o"),
                 "svd_large": ("SVD of an 8× batch (L.B. GaLore)", COLORS["lb-galore"], "s"),
                 "random": ("random (GoLore)", COLORS["golore"], "^"),
                 "oracle": ("SVD of the true gradient", "#777777", "")}


def lm_capture_figure(data: pd.DataFrame, model: str) -> plt.Figure:
    """Captured fraction of each layer's true gradient: against training steps (mean and min–max over layers),
    and against the layer's gradient-to-noise ratio (one point per layer and measurement)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for column, (label, color, marker) in CAPTURE_STYLE.items():
        stats = data.groupby("step")[column].agg(["mean", "min", "max"])
        left.plot(stats.index, stats["mean"], color=color, marker=marker or None, ms=3, label=label,
                  ls="--" if column == "oracle" else "-")
        left.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.15, lw=0)
        if column in ("svd", "svd_large", "random"):
            right.scatter(data["snr"], data[column], s=9, color=color, marker=marker, alpha=0.6, label=label)
    left.set_xlabel("training step")
    left.set_ylabel("captured fraction of the true gradient")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"LLaMA ({model} preset), attention and MLP weights, full AdamW", fontsize=10)
    left.legend(fontsize=8, loc="center right")
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_xlabel("layer gradient-to-noise ratio ‖G‖₂ / ‖Ĝ − G‖₂")
    right.set_ylim(-0.02, 1.02)
    right.set_title("per layer and measurement", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
