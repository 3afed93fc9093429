"""Table 2 at CPU size: fine-tuning all-MiniLM-L6-v2 with AdamW, Full vs GaLore vs GoLore@20%.

Every (task, seed, method) is one run of :func:`golore_lab.lm.finetune.run` with the recipe preset
``recipe`` of :func:`golore_lab.lm.finetune.recipe`. ``default`` (the ``cpu`` recipe): 3 seeds x 3 methods x 2
tasks of 40 AdamW steps of 16 examples (rank 4, α = 4, τ = 8: GoLore@20% switches at step 32 and draws one
random subspace, for the last 8 steps), sequences cut at 64 tokens, tested on the full test splits. ``fast``:
1 seed, 3 steps of 8 examples, 32 tokens, 64 test examples -- a smoke test of the path, not a result. ``full``
is ``default``. The frame: one row per run with its validation and test metrics and wall time.

:func:`table` gives the paper's layout: test accuracy (and macro-F1 for the 5-class BBC task) in %, mean ± std
over seeds per task and for the average over tasks, plus the *paired* difference GoLore@20% − GaLore (with
the same seed the two runs are identical until the switch step, so the pairing isolates the random subspaces).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from ..plotting import method_label, method_style
from ..threads import num_threads

NAME = "table2_finetune"


@dataclass(frozen=True)
class Config:
    preset: str
    recipe: str
    seeds: tuple[int, ...]
    tasks: tuple[str, ...] = ("movie-reviews", "bbc-news")
    methods: tuple[str, ...] = ("full", "galore", "golore@20")


PRESETS = {"fast": Config("fast", "fast", (0,)), "default": Config("default", "cpu", (0, 1, 2)),
           "full": Config("full", "cpu", (0, 1, 2))}
GROUP_BY = ("task", "method", "seed")


def expected_groups(config: Config) -> list[tuple]:
    return [(t, m, s) for t in config.tasks for m in config.methods for s in config.seeds]


def run(config: Config, progress: bool = False, threads: int = 1) -> pd.DataFrame:
    """Fine-tune with AdamW: one row per (task, method, seed) with val/test metrics and the wall time."""
    from ..lm.finetune import ClassificationTask, recipe
    from ..lm.finetune import run as finetune

    rows = []
    with num_threads(threads):
        for task_name in config.tasks:
            task = None
            for seed in config.seeds:
                for method in config.methods:
                    task_cfg, train_cfg = recipe(config.recipe, task_name, "adamw", method=method, seed=seed,
                                                 progress=progress)
                    task = task or ClassificationTask(task_cfg)
                    start = time.perf_counter()
                    out = finetune(task_cfg, train_cfg, task)
                    rows.append({"task": task_name, "method": method, "seed": seed, "steps": train_cfg.steps,
                                 **out["val"], **out["test"], "wall_s": time.perf_counter() - start})
    return pd.DataFrame(rows)


def paired_name(method: str) -> str:
    """The key of the paired difference ``method`` − GaLore in :func:`summarize`."""
    return f"{method}-galore"


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std (over seeds, ddof = 1) of test accuracy per task, macro-F1 for BBC News, and their average.

    Columns: ``metric`` (e.g. ``movie-reviews accuracy``), ``method``, ``mean``, ``std``, ``n`` -- in percent.
    The average is taken per seed over the tasks' accuracies, then summarised over seeds. Rows with method
    ``golore@X-galore`` are the paired differences GoLore@X% − GaLore (same task and seed).
    """
    metrics = []
    for task in runs["task"].unique():
        metrics.append((f"{task} accuracy", task, "test_accuracy"))
        if task == "bbc-news":
            metrics.append((f"{task} macro-F1", task, "test_macro_f1"))
    order = list(dict.fromkeys(runs["method"]))
    wide = {name: runs[runs["task"] == task].pivot(index="seed", columns="method", values=col)[order] * 100
            for name, task, col in metrics}
    tasks = list(runs["task"].unique())
    if len(tasks) > 1:
        wide["average accuracy"] = sum(wide[f"{t} accuracy"] for t in tasks) / len(tasks)
    rows = []
    for name, table in wide.items():
        if "galore" in table.columns:
            table = table.assign(**{paired_name(m): table[m] - table["galore"]
                                    for m in table.columns if m.startswith("golore@")})
        for method in table.columns:
            values = table[method].dropna()
            rows.append({"metric": name, "method": method, "mean": values.mean(),
                         "std": values.std(ddof=1) if len(values) > 1 else float("nan"), "n": len(values)})
    return pd.DataFrame(rows)


def _label(method: str) -> str:
    if method.endswith("-galore"):
        return f"{method_label(method[:-len('-galore')])} − GaLore (paired)"
    return method_label(method)


def table_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: one row per method, one column per metric, ``mean ± std``."""
    order = list(dict.fromkeys(summary["method"]))
    metrics = list(dict.fromkeys(summary["metric"]))
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method in order:
        cells = []
        for metric in metrics:
            row = summary[(summary["metric"] == metric) & (summary["method"] == method)].iloc[0]
            sign = "+" if method.endswith("-galore") and row["mean"] >= 0 else ""
            spread = f" ± {row['std']:.2f}" if row["n"] > 1 else ""
            cells.append(f"{sign}{row['mean']:.2f}{spread}")
        lines.append(f"| {_label(method)} | " + " | ".join(cells) + " |")
    n = int(summary["n"].max())
    return "\n".join(lines) + f"\n\nTest metrics in %, mean ± std over {n} seed(s) (ddof = 1).\n"


def golore_reading(summary: pd.DataFrame) -> str:
    """One sentence on whether GoLore beat GaLore here, from the paired differences (no adjectives added)."""
    paired = summary[summary["method"].str.endswith("-galore")]
    row = paired[paired["metric"] == "average accuracy"]
    row = paired.head(1) if row.empty else row
    mean, std, n = row["mean"].iloc[0], row["std"].iloc[0], int(row["n"].iloc[0])
    head = f"{_label(row['method'].iloc[0])[:-len(' (paired)')]}, paired by seed, {row['metric'].iloc[0]}: {mean:+.2f}"
    if n < 2:
        return head + " points from a single seed: no spread, so no conclusion. The paper reports about +0.3 on GLUE."
    se = std / n ** 0.5
    verdict = ("within one standard error of zero" if abs(mean) <= se else
               f"{'above' if mean > 0 else 'below'} zero by {abs(mean) / se:.1f} standard errors")
    return (f"{head} ± {std:.2f} points over {n} seeds (standard error {se:.2f}): {verdict}. "
            "The paper reports about +0.3 on GLUE.")


def table(frame: pd.DataFrame) -> str:
    summary = summarize(frame)
    return table_markdown(summary) + "\n" + golore_reading(summary) + "\n"


def plot(frame: pd.DataFrame) -> plt.Figure:
    """Test accuracy of every run, one panel per task, one column of points per method (seeds side by side)."""
    tasks = list(dict.fromkeys(frame["task"]))
    methods = list(dict.fromkeys(frame["method"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(methods):
            rows = frame[(frame["task"] == task) & (frame["method"] == method)]
            style = method_style(method, ls="none", ms=6)
            ax.plot([i] * len(rows), rows["test_accuracy"] * 100, **style)
            ax.hlines(rows["test_accuracy"].mean() * 100, i - 0.25, i + 0.25, color=style["color"], lw=2)
        ax.set_xticks(range(len(methods)), [method_label(m) for m in methods])
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{task}: every seed (points) and the mean (bar)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Fine-tuning all-MiniLM-L6-v2 with AdamW (Table 2 at CPU size)", fontsize=11)
    fig.tight_layout()
    return fig
