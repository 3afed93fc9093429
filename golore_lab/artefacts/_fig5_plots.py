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


def floors_figure(frame: pd.DataFrame, problem, assumptions, clip: float = 1e-4) -> plt.Figure:
    """Two panels: the noise floor of ‖∇f‖² against the step size η, and against the batch B at one η.

    ``frame``: :func:`golore_lab.theory.noise_floors` rows with a ``panel`` column (``"lr"`` or ``"batch"``);
    ``problem`` the counterexample it ran on; ``assumptions`` its :func:`golore_lab.theory.assumptions`. Markers:
    the seed mean, bars min–max over seeds; lines: the closed forms and the derived bounds. Floors below
    ``clip`` (even batches, whose floor is 0) are drawn at ``clip`` as downward triangles.
    """
    import numpy as np

    from .. import theory as th

    sigma2, delta, L = assumptions.noise_variance, assumptions.delta, assumptions.smoothness
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 5.4))
    by_lr = frame[frame.panel == "lr"]
    lrs = np.geomspace(by_lr.lr.min(), by_lr.lr.max(), 60)
    for (method, batch), rows in by_lr.groupby(["method", "batch"], sort=False):
        stats = rows.groupby("lr").floor.agg(["mean", "min", "max"]).reset_index()
        label = method_label(method) + (f" (B = {batch})" if method != "golore@100" else "")
        color = method_color(method)
        style = dict(color=color, ls="none", marker="o" if method != "lb-galore" else ("s" if batch == 3 else "D"),
                     ms=5, mfc="none" if method == "lb-galore" and batch != 3 else color)
        ax.errorbar(stats.lr, stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                    label=f"{label}, measured", capsize=2, **style)
        if method == "golore@100":
            ax.loglog(lrs, [th.golore_floor(problem, lr) for lr in lrs], "-", color=color, lw=1,
                      label=r"GoLore closed form $\eta\sigma^2 c_3/(2\delta - \eta c_2)$ (package's)")
            ax.loglog(lrs, L * lrs * sigma2, "--", color=color, lw=1, label=r"GoLore bound as $T\to\infty$: $L\eta\,E\|e\|^2$ (τ = 1)")
        else:
            ax.loglog(lrs, [th.lb_galore_floor(problem, batch, lr) for lr in lrs], "-", color=color, lw=0.8, alpha=0.8)
    ax.plot([], [], "k-", lw=0.8, label="SVD methods: the odd/even law (package's)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size η (fixed)")
    ax.set_ylabel(r"floor: mean $\|\nabla f(X_t)\|_F^2$ over $T/2 \leq t \leq T$")
    ax.set_title("floor vs η: GoLore's noise term ∝ η; the SVD methods' bias does not move", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)

    by_batch = frame[frame.panel == "batch"]
    sweep_lr = float(by_batch.lr.iloc[0])
    lb = by_batch[by_batch.method.isin(["lb-galore", "galore"])]
    stats = lb.groupby("batch").floor.agg(["mean", "min", "max"]).reset_index()
    shown = stats["mean"].clip(lower=clip)
    zero = stats["mean"] < clip
    color = method_color("lb-galore")
    bx.loglog(stats.batch[~zero], shown[~zero], "s", color=color, ms=5, label="L.B. GaLore (B = 1: GaLore), measured")
    bx.loglog(stats.batch[zero], shown[zero], "v", color=color, ms=6, mfc="none",
              label=f"even B: measured floor < {clip:g} (the law: 0)")
    odd = np.arange(1, int(stats.batch.max()) + 1, 2)
    bx.loglog(odd, [th.lb_galore_floor(problem, int(b), sweep_lr) for b in odd], "-", color=color, lw=0.8,
              label="odd B: the odd/even law (package's), exact")
    batches = np.geomspace(1, stats.batch.max(), 50)
    bx.loglog(batches, 14 * sigma2 / (delta * batches), "k--", lw=1, label=r"bias bound $14\sigma^2/(\delta B)$ (τ = 1, package's)")
    golore = by_batch[by_batch.method == "golore@100"].floor.mean()
    bx.axhline(golore, color=method_color("golore@100"), ls=":", lw=1.2, label=f"GoLore (B = 1) at η = {sweep_lr:g}")
    bx.set_xlabel("batch size B (every step is a refresh: τ = 1)")
    bx.set_ylabel(r"floor of $\|\nabla f\|_F^2$")
    bx.set_title(f"floor vs B at η = {sweep_lr:g}: L.B. GaLore's bias vanishes as B grows", fontsize=10)
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    for axis in (ax, bx):
        axis.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
