"""Figure 4 at CPU size: fine-tuning all-MiniLM-L6-v2 with momentum SGD, training loss of Full, GaLore and
GoLore@20% with the paper's inset on the last 20% of the steps.

The paper trains few examples for many epochs; so does ``default``: 60 steps of 16 over 192 movie-review
sentences (5 epochs, τ = 8, random subspaces at steps 48 and 56), the ``cpu`` recipe of
:func:`golore_lab.lm.finetune.recipe` otherwise. ``fast``: 5 steps over 32 sentences. ``full`` is ``default``.
The frame: ``method, step, train_loss`` (every step).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from ..plotting import method_style
from ..threads import num_threads

NAME = "fig4_finetune"


@dataclass(frozen=True)
class Config:
    preset: str
    recipe: str
    steps: int
    train_examples: int
    task: str = "movie-reviews"
    seed: int = 0
    methods: tuple[str, ...] = ("full", "galore", "golore@20")


PRESETS = {"fast": Config("fast", "fast", steps=5, train_examples=32),
           "default": Config("default", "cpu", steps=60, train_examples=192),
           "full": Config("full", "cpu", steps=60, train_examples=192)}
GROUP_BY = ("method",)


def expected_groups(config: Config) -> list[tuple]:
    return [(m,) for m in config.methods]


def run(config: Config, progress: bool = False, threads: int = 1) -> pd.DataFrame:
    """Fine-tune with momentum SGD and log the training loss of every step: ``method, step, train_loss``."""
    from ..lm.finetune import ClassificationTask, recipe
    from ..lm.finetune import run as finetune

    rows, shared = [], None
    with num_threads(threads):
        for method in config.methods:
            task_cfg, train_cfg = recipe(config.recipe, config.task, "sgd", method=method, seed=config.seed,
                                         steps=config.steps, log_every=1, progress=progress,
                                         task_overrides={"train_examples": config.train_examples})
            shared = shared or ClassificationTask(task_cfg)
            out = finetune(task_cfg, train_cfg, shared)
            rows += [{"method": method, "step": h["step"], "train_loss": h["train_loss"]}
                     for h in out["history"] if h["step"] > 0]
    return pd.DataFrame(rows)


def smooth(values, window: int) -> list[float]:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    out, total = [], 0.0
    values = list(values)
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(frame: pd.DataFrame, window: int | None = None, inset_fraction: float = 0.2) -> plt.Figure:
    """Training loss vs steps (trailing mean over ``window`` steps; default: a tenth of the run, at most 8),
    one line per method, with an inset on the last ``inset_fraction`` of the steps."""
    from mpl_toolkits.axes_grid1.inset_locator import mark_inset

    last = int(frame["step"].max())
    window = window or max(1, min(8, last // 10))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    inset = ax.inset_axes([0.5, 0.42, 0.42, 0.36])
    lo = last - inset_fraction * last
    ys = []
    for method, part in frame.groupby("method", sort=False):
        part = part.sort_values("step")
        y = smooth(part["train_loss"], window)
        every = max(1, len(part) // 6)
        style = method_style(method, lw=1.8, markevery=every)
        ax.plot(part["step"], y, **style)
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
    ax.set_title("Fine-tuning all-MiniLM-L6-v2 with momentum SGD")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return fig
