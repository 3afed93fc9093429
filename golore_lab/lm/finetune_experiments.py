"""The fine-tuning results: a Table-2-like accuracy table and Figure 4 at CPU size (producer ``finetune``).

* :func:`table_runs` -- Full, GaLore and GoLore@20% with AdamW on both tasks and several seeds; one row per run
  with its test accuracy and macro-F1. :func:`summarize_table` turns it into the paper's layout: mean ± std over
  seeds per task and for the average over tasks, plus the *paired* GoLore − GaLore difference (with the same
  seed the two runs are identical until the switch step, so the pairing isolates the effect of the random
  subspaces in the last 20%).
* :func:`curve_runs` -- Full, GaLore and GoLore@20% with momentum SGD; training loss at every step.
  :func:`plot_curves` draws it like the paper's Figure 4 (``shared/reference/gsm8k.png``): smoothed loss vs
  steps with an inset on the last 20% of the steps.

``python -m golore_lab figures --only finetune [--preset fast|default]`` runs :func:`produce`, which caches the
runs under ``figures/data/runs/`` and writes ``figures/fig4_finetune_sgd.png`` and
``figures/table2_finetune.{csv,md}``. The presets (:data:`SIZES`):

* ``default`` (the ``cpu`` preset of :mod:`golore_lab.lm.finetune`): 3 seeds x 3 methods x 2 tasks of 40 AdamW
  steps of 16 examples (640 training examples seen; rank 4, α = 4, τ = 8, so GoLore@20% switches at step 32 and
  draws one random subspace, for the last 8 steps), sequences cut at 64 tokens, tested on the full test splits;
  the SGD curves train 60 steps (5 epochs of 192 movie-review sentences, τ = 8, random subspaces at steps 48
  and 56). One thread. The measured time is in the README;
* ``fast``: 1 seed, 3 steps of 8 examples, 32 tokens, 64 test examples: a smoke test of the path, not a result.
  ``full`` is ``default``.
"""
from __future__ import annotations

import time

import pandas as pd

from golore_lab.lm.finetune import ClassificationTask, recipe
from golore_lab.lm.train import config_dict
from golore_lab.plotting import COLORS
from golore_lab.threads import num_threads

METHODS = ("full", "galore", "golore@20")
LABELS = {"full": "Full params.", "galore": "GaLore", "golore@20": "GoLore@20%"}
STYLE = {"full": (COLORS["full"], "^"), "galore": (COLORS["galore"], "s"), "golore@20": (COLORS["golore"], "o")}

#: What each figure preset runs. ``recipe`` is the preset of :func:`golore_lab.lm.finetune.recipe`;
#: ``curves`` overrides it for the SGD figure (the paper trains few examples for many epochs; so do we).
SIZES = {
    "fast": dict(recipe="fast", tasks=("movie-reviews", "bbc-news"), seeds=(0,),
                 curves=dict(task="movie-reviews", seed=0, steps=5, train_examples=32)),
    "default": dict(recipe="cpu", tasks=("movie-reviews", "bbc-news"), seeds=(0, 1, 2),
                    curves=dict(task="movie-reviews", seed=0, steps=60, train_examples=192)),
}
SIZES["full"] = SIZES["default"]


def table_runs(preset: str = "cpu", tasks=("movie-reviews", "bbc-news"), seeds=(0, 1, 2), methods=METHODS,
               progress: bool = False, threads: int = 1) -> pd.DataFrame:
    """Fine-tune with AdamW: one row per (task, method, seed) with val/test metrics and the wall time."""
    with num_threads(threads):
        return _table_runs(preset, tasks, seeds, methods, progress)


def _table_runs(preset, tasks, seeds, methods, progress) -> pd.DataFrame:
    rows = []
    for task_name in tasks:
        task = None
        for seed in seeds:
            for method in methods:
                task_cfg, train_cfg = recipe(preset, task_name, "adamw", method=method, seed=seed, progress=progress)
                task = task or ClassificationTask(task_cfg)
                start = time.perf_counter()
                out = _run(task_cfg, train_cfg, task)
                rows.append({"task": task_name, "method": method, "seed": seed, "steps": train_cfg.steps,
                             **out["val"], **out["test"], "wall_s": time.perf_counter() - start})
    return pd.DataFrame(rows)


def curve_runs(preset: str = "cpu", task: str = "movie-reviews", seed: int = 0, steps: int | None = None,
               train_examples: int | None = None, methods=METHODS, progress: bool = False,
               threads: int = 1) -> pd.DataFrame:
    """Fine-tune with momentum SGD and log the training loss of every step: columns ``method, step, train_loss``."""
    with num_threads(threads):
        return _curve_runs(preset, task, seed, steps, train_examples, methods, progress)


def _curve_runs(preset, task, seed, steps, train_examples, methods, progress) -> pd.DataFrame:
    rows, shared = [], None
    for method in methods:
        task_cfg, train_cfg = recipe(preset, task, "sgd", method=method, seed=seed, steps=steps, log_every=1,
                                     progress=progress, task_overrides={"train_examples": train_examples})
        shared = shared or ClassificationTask(task_cfg)
        out = _run(task_cfg, train_cfg, shared)
        rows += [{"method": method, "step": h["step"], "train_loss": h["train_loss"]}
                 for h in out["history"] if h["step"] > 0]
    return pd.DataFrame(rows)


def _run(task_cfg, train_cfg, task):
    from golore_lab.lm.finetune import run

    return run(task_cfg, train_cfg, task)


def summarize_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std (over seeds, ddof = 1) of test accuracy per task, macro-F1 for BBC News, and their average.

    Columns: ``metric`` (e.g. ``movie-reviews accuracy``), ``method``, ``mean``, ``std``, ``n`` -- in percent.
    The average is taken per seed over the tasks' accuracies, then summarised over seeds. Rows with method
    ``golore-galore`` are the paired differences GoLore@20% − GaLore (same task and seed).
    """
    runs = runs.copy()
    metrics = []  # (name, per-run column)
    for task in runs["task"].unique():
        metrics.append((f"{task} accuracy", task, "test_accuracy"))
        if task == "bbc-news":
            metrics.append((f"{task} macro-F1", task, "test_macro_f1"))
    wide = {}
    for name, task, col in metrics:
        wide[name] = runs[runs["task"] == task].pivot(index="seed", columns="method", values=col) * 100
    tasks = list(runs["task"].unique())
    if len(tasks) > 1:
        wide["average accuracy"] = sum(wide[f"{t} accuracy"] for t in tasks) / len(tasks)
    rows = []
    for name, table in wide.items():
        if {"galore", "golore@20"} <= set(table.columns):
            table = table.assign(**{"golore-galore": table["golore@20"] - table["galore"]})
        for method in table.columns:
            values = table[method].dropna()
            rows.append({"metric": name, "method": method, "mean": values.mean(),
                         "std": values.std(ddof=1) if len(values) > 1 else float("nan"), "n": len(values)})
    return pd.DataFrame(rows)


def table_markdown(summary: pd.DataFrame, command: str = "") -> str:
    """The summary as a Markdown table: one row per method, one column per metric, ``mean ± std``."""
    order = [m for m in (*METHODS, "golore-galore") if m in set(summary["method"])]
    names = {**LABELS, "golore-galore": "GoLore@20% − GaLore (paired)"}
    metrics = list(dict.fromkeys(summary["metric"]))
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method in order:
        cells = []
        for metric in metrics:
            row = summary[(summary["metric"] == metric) & (summary["method"] == method)].iloc[0]
            sign = "+" if method == "golore-galore" and row["mean"] >= 0 else ""
            spread = f" ± {row['std']:.2f}" if row["n"] > 1 else ""
            cells.append(f"{sign}{row['mean']:.2f}{spread}")
        lines.append(f"| {names[method]} | " + " | ".join(cells) + " |")
    n = int(summary["n"].max())
    text = "\n".join(lines) + f"\n\nTest metrics in %, mean ± std over {n} seed(s) (ddof = 1).\n"
    return text + (f"\nMade by: `{command}`\n" if command else "")


def smooth(values, window: int):
    """Trailing moving average over ``window`` points (shorter at the start), as a list."""
    out, total = [], 0.0
    values = list(values)
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(curves: pd.DataFrame, window: int = 8, inset_fraction: float = 0.2, title: str = ""):
    """Training loss vs steps, one line per method, with an inset on the last ``inset_fraction`` of the steps."""
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1.inset_locator import mark_inset

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    inset = ax.inset_axes([0.5, 0.42, 0.42, 0.36])
    last = curves["step"].max()
    lo = last - inset_fraction * last
    ys = []
    for method in [m for m in METHODS if m in set(curves["method"])]:
        part = curves[curves["method"] == method].sort_values("step")
        y = smooth(part["train_loss"], window)
        every = max(1, len(part) // 6)
        style = dict(color=STYLE[method][0], marker=STYLE[method][1], markevery=every, lw=1.8)
        ax.plot(part["step"], y, label=LABELS[method], **style)
        inset.plot(part["step"], y, **{**style, "markevery": max(1, every // 2)})
        ys += [v for s, v in zip(part["step"], y) if s >= lo]
    inset.set_xlim(lo, last)
    if ys:
        pad = 0.05 * (max(ys) - min(ys) + 1e-9)
        inset.set_ylim(min(ys) - pad, max(ys) + pad)
    inset.grid(alpha=0.3)
    inset.tick_params(labelsize=8)
    mark_inset(ax, inset, loc1=2, loc2=4, fc="none", ec="0.4")
    ax.set_xlabel("Iterations")
    ax.set_ylabel(f"Training loss (moving average of {window} steps)")
    ax.set_title(title or "Fine-tuning all-MiniLM-L6-v2 with momentum SGD")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return fig


def results(ctx) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table runs, SGD curves)`` for ``ctx.preset``: from the committed cache when its configuration matches,
    else run (see :data:`SIZES`). The figure producer and the notebook both call this."""
    size = SIZES[ctx.preset]
    table_cfg = {"size": size, "recipes": [[config_dict(c) for c in recipe(size["recipe"], t, "adamw")]
                                           for t in size["tasks"]]}
    runs = ctx.cached(f"finetune-table-{ctx.preset}", _jsonable(table_cfg),
                      lambda: table_runs(size["recipe"], size["tasks"], size["seeds"]))
    kw = size["curves"]
    curve_cfg = {"curves": kw, "recipe": [config_dict(c) for c in recipe(
        size["recipe"], kw["task"], "sgd", steps=kw["steps"], task_overrides={"train_examples": kw["train_examples"]})]}
    curves = ctx.cached(f"finetune-curves-{ctx.preset}", _jsonable(curve_cfg), lambda: curve_runs(size["recipe"], **kw))
    return runs, curves


def golore_reading(summary: pd.DataFrame) -> str:
    """One sentence on whether GoLore@20% beat GaLore here, from the paired differences (no adjectives added)."""
    row = summary[(summary["metric"] == "average accuracy") & (summary["method"] == "golore-galore")]
    if row.empty:
        row = summary[summary["method"] == "golore-galore"].head(1)
    mean, std, n = row["mean"].iloc[0], row["std"].iloc[0], int(row["n"].iloc[0])
    head = f"GoLore@20% − GaLore, paired by seed, {row['metric'].iloc[0]}: {mean:+.2f}"
    if n < 2:
        return head + " points from a single seed: no spread, so no conclusion. The paper reports about +0.3 on GLUE."
    se = std / n ** 0.5
    verdict = ("within one standard error of zero" if abs(mean) <= se else
               f"{'above' if mean > 0 else 'below'} zero by {abs(mean) / se:.1f} standard errors")
    return (f"{head} ± {std:.2f} points over {n} seeds (standard error {se:.2f}): {verdict}. "
            "The paper reports about +0.3 on GLUE.")


def produce(ctx) -> None:
    """Figure producer ``finetune``: ``fig4_finetune_sgd.png`` and ``table2_finetune.{csv,md}``."""
    from golore_lab.figures import atomic_write_bytes, atomic_write_csv

    runs, curves = results(ctx)
    summary = summarize_table(runs)
    command = "python -m golore_lab figures --only finetune" + ("" if ctx.preset == "default" else f" --preset {ctx.preset}")
    atomic_write_csv(summary, ctx.out_dir / "table2_finetune.csv")
    atomic_write_bytes(ctx.out_dir / "table2_finetune.md",
                       (table_markdown(summary, command) + "\n" + golore_reading(summary) + "\n").encode())
    ctx.written += [ctx.out_dir / "table2_finetune.csv", ctx.out_dir / "table2_finetune.md"]
    size = SIZES[ctx.preset]
    fig = plot_curves(curves, window=max(1, min(8, int(curves["step"].max()) // 10)),
                      title=f"all-MiniLM-L6-v2 on {size['curves']['task']}, momentum SGD (seed {size['curves']['seed']})")
    ctx.save(fig, "fig4_finetune_sgd", curves)


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))
