"""Drawing helpers shared by the proof figures (``fig5_*``): each returns a matplotlib Figure, writes nothing."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..plotting import method_color, method_label, method_style


def _slope_guide(ax, xs, anchor_x: float, anchor_y: float, slope: float, label: str | None, color: str = "k") -> None:
    """A dashed line y = anchor_y (x / anchor_x)^slope over ``xs``: the reference rate on a log-log plot."""
    import numpy as np

    xs = np.asarray(xs, dtype=float)
    ax.plot(xs, anchor_y * (xs / anchor_x) ** slope, "--", color=color, lw=0.9, alpha=0.7, label=label)


def _plain_log_ticks(ax, xs, ys) -> None:
    """Readable tick labels on a log-log plot: the x values themselves when few, 1-2-5 steps on a short y range."""
    import numpy as np
    from matplotlib import ticker

    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if len(xs) <= 10:
        ax.set_xticks(list(xs))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    if np.log10(np.max(ys) / np.min(ys)) < 2:
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def stiefel_mean_figure(study: pd.DataFrame, rms: pd.DataFrame, bias: pd.DataFrame, dim: int, rank: int,
                        slope: float) -> plt.Figure:
    """Two panels: the Monte Carlo error of E[PPᵀ] = (r/m)I against N, and the bias of the projected gradient.

    ``study``/``rms`` come from :func:`golore_lab.theory.stiefel_mean_study` / ``rms_by_size``; ``bias`` has
    columns ``method, samples, bias`` (:func:`golore_lab.theory.projected_gradient_bias` per method).
    """
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 3.9))
    ax.loglog(study.samples, study.error, ".", color="#999999", ms=3, label="one replicate")
    ax.loglog(rms.samples, rms.rms, "o", color=method_color("golore@100"), label=f"RMS over replicates (slope {slope:.3f})")
    ax.loglog(rms.samples, rms.predicted, "k--", lw=1,
              label=r"closed form $\sqrt{r(1-r/m)/N}$ (slope $-1/2$)")
    ax.set_xlabel("number of bases N")
    ax.set_ylabel(r"$\|\,\mathrm{mean}_{i \leq N}\, P_iP_i^\top - (r/m)\,I\,\|_F$")
    ax.set_title(f"GoLore's bases (m = {dim}, r = {rank}): E[PPᵀ] = (r/m)·I", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    for method, rows in bias.groupby("method", sort=False):
        bx.loglog(rows.samples, rows.bias, ms=4, **method_style(method))
    golore = bias[bias.method == "golore@100"]
    if len(golore):
        _slope_guide(bx, golore.samples, golore.samples.iloc[0], golore.bias.iloc[0], -0.5, r"$\propto N^{-1/2}$")
    bx.set_xlabel("number of oracle calls N")
    bx.set_ylabel(r"$\|\mathrm{mean}(PP^\top g) - \delta\nabla f\| \,/\, \|\delta\nabla f\|$")
    bx.set_title("projected stochastic gradient, no-B instance at X₀", fontsize=10)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def perturbation_figure(trials: pd.DataFrame, capture: pd.DataFrame, delta: float) -> plt.Figure:
    """Three panels: the bound ‖PᵀG‖ ≥ √δ‖G‖ − 2‖E‖ on every instance, its constant, and what a batch buys.

    ``trials`` has the columns of :func:`golore_lab.theory.perturbation_bound` plus ``family`` and ``ratio``;
    ``capture`` comes from :func:`golore_lab.theory.large_batch_capture`.
    """
    import numpy as np

    styles = {"random": dict(color="#999999", marker=".", ms=3, ls="none", alpha=0.5, label="random G, E"),
              "counterexample": dict(color=method_color("galore"), marker="o", ms=4, ls="none", zorder=3,
                                     label=r"no-B $\nabla f(X_0)$, $E = s\sigma C$"),
              "counterexample, cancelling": dict(color=method_color("golore@100"), marker="s", ms=7, ls="none", mfc="none",
                                                 label=r"no-B $\nabla f(X_0)$, $E = s\sigma C - \delta\nabla f$")}
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4.1))
    root = np.sqrt(delta)
    xs = np.logspace(np.log10(trials.ratio.min()), np.log10(trials.ratio.max()), 200)
    for family, rows in trials.groupby("family", sort=False):
        style = styles.get(family, dict(label=family, ls="none", marker="x"))
        ax.semilogx(rows.ratio, rows.lhs / rows.grad, **style)
        bx.semilogx(rows.ratio, rows.constant, **style)
    ax.semilogx(xs, root - 2 * xs, "k-", lw=1.2, label=r"bound $\sqrt{\delta} - 2\,\|E\|/\|G\|$")
    ax.semilogx(xs, root - (1 + root) * xs, "k:", lw=1.2, label=r"proof's $\sqrt{\delta} - (1+\sqrt{\delta})\|E\|/\|G\|$")
    ax.set_ylim(-0.08, 1.05)
    ax.set_xlabel(r"noise ratio $\|E\|_F / \|G\|_F$")
    ax.set_ylabel(r"$\|P^\top G\|_F / \|G\|_F$,  P = top-r space of G + E")
    ax.set_title("the bound holds on every instance", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    for value, style, label in [(2.0, "-", "2 (the bound)"), (1 + root, ":", r"$1+\sqrt{\delta}$ (proof)"),
                                (1.0, "--", "1 (reached)")]:
        bx.axhline(value, color="k", ls=style, lw=1, label=label)
    bx.set_ylim(-0.3, 2.2)
    bx.set_xlabel(r"noise ratio $\|E\|_F / \|G\|_F$")
    bx.set_ylabel(r"$c = (\sqrt{\delta}\|G\| - \|P^\top G\|) / \|E\|$")
    bx.set_title("its constant: c ≤ 1+√δ always, c → 1 on the counterexample", fontsize=10)
    bx.legend(fontsize=7, loc="upper left")
    cx.semilogx(capture.batch, capture.captured, "o-", color=method_color("lb-galore"), label=r"exact $E\|P^\top\nabla f\|^2/\|\nabla f\|^2$")
    cx.semilogx(capture.batch, capture.pointwise_bound, "s--", color="k", ms=3,
                label=r"$E(\sqrt{\delta}\|\nabla f\| - 2\|E\|)_+^2 / \|\nabla f\|^2$")
    cx.semilogx(capture.batch, capture.mean_bound.clip(lower=0), "^:", color="k", ms=3,
                label=r"$(\frac{\delta}{2}\|\nabla f\|^2 - 4\sigma^2/B)_+ / \|\nabla f\|^2$")
    cx.axhline(delta, color="grey", lw=0.8, ls="-.", label=r"$\delta = r/m$")
    cx.set_xscale("log", base=2)
    cx.set_xlabel("batch size B at the refresh")
    cx.set_ylabel("fraction of ‖∇f‖² the SVD keeps")
    cx.set_title("no-B instance at X₀: what a large batch buys", fontsize=10)
    cx.set_ylim(-0.02, 1.0)
    cx.legend(fontsize=7, loc="upper right")
    for axis in (ax, bx, cx):
        axis.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def rates_figure(summary: pd.DataFrame, slopes: dict[str, float], reference_slope: float, title: str,
                 guides: tuple[str, ...] = ("golore@100", "lb-galore"), floor: float | None = None,
                 bound: pd.DataFrame | None = None) -> plt.Figure:
    """Mean ‖∇f‖² over T steps against T (log-log), one line per method, with the theory's slope as a guide.

    ``summary``: ``method, steps, mean, min, max`` (:func:`golore_lab.theory.rate_summary`); ``slopes``: the
    fitted slope per method, shown in the legend; ``guides``: the methods that get a dashed line of the
    theory's slope through their last point; ``floor``: GaLore's plateau ‖∇f‖² (a horizontal line);
    ``bound``: ``steps, bound``, a derived upper bound drawn as a line.
    """
    fig, ax = plt.subplots(figsize=(5.6, 4.1))
    for method, rows in summary.groupby("method", sort=False):
        label = f"{method_label(method)} (slope {slopes[method]:+.2f})" if method in slopes else method_label(method)
        ax.loglog(rows.steps, rows["mean"], ms=4, **method_style(method, label=label))
        if "min" in rows and "max" in rows:
            ax.fill_between(rows.steps, rows["min"], rows["max"], color=method_color(method), alpha=0.2, lw=0)
        if method in guides:
            _slope_guide(ax, rows.steps, rows.steps.iloc[-1], rows["mean"].iloc[-1] * 1.3, reference_slope, None,
                         method_color(method))
    if guides:
        ax.plot([], [], "k--", lw=0.9, alpha=0.7, label=f"slope {reference_slope:g} (theory)")
    if floor is not None:
        ax.axhline(floor, color="grey", ls=":", lw=1.2, label=f"GaLore plateau ‖∇f‖² = {floor:.2f}")
    if bound is not None:
        ax.loglog(bound.steps, bound.bound, "k-", lw=1, label="derived upper bound")
    _plain_log_ticks(ax, summary.steps.unique(), summary["mean"])
    ax.set_xlabel("iterations T")
    ax.set_ylabel(r"$\frac{1}{T}\sum_{t<T}\|\nabla f(X_t)\|_F^2$")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
