"""Figure 2 on a real model: what each rank-r subspace captures of a LLaMA layer's true gradient in training.

Full-AdamW pre-training of the package's LLaMA (:func:`golore_lab.lm.noise_study.run_study`); every ``every``
steps, for each attention and MLP weight, the captured fraction of its true gradient (a fixed reference set)
by the SVD of one batch (GaLore), of an ``large_factor``-times larger batch (L.B. GaLore), a random basis
(GoLore) and the SVD of the true gradient itself (the best rank-r subspace), and the layer's
gradient-to-noise ratio. The frame: one row per (step, layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from ..plotting import GREY, legend_below, method_style, no_minor_labels

NAME = "fig2_llama_captured"


@dataclass(frozen=True)
class Config:
    preset: str
    model: str
    steps: int
    every: int
    batch_size: int = 8
    large_factor: int = 8
    reference_windows: int = 256
    seed: int = 0


PRESETS = {"fast": Config("fast", "tiny", 30, 10), "default": Config("default", "cpu", 160, 20),
           "full": Config("full", "cpu", 320, 20)}
GROUP_BY = ("step",)


def expected_groups(config: Config) -> list[tuple]:
    return [(step,) for step in range(0, config.steps + 1, config.every)]


def run(config: Config) -> pd.DataFrame:
    from ..lm.noise_study import run_study

    frame = run_study(model=config.model, steps=config.steps, every=config.every, batch_size=config.batch_size,
                      large_factor=config.large_factor, reference_windows=config.reference_windows,
                      seed=config.seed, log=lambda *_: None)
    return frame.assign(model=config.model)


#: column -> (label, the method whose style it takes)
CAPTURE = {"svd": ("SVD of one batch (GaLore)", "galore"),
           "svd_large": ("SVD of an 8× batch (L.B. GaLore)", "lb-galore"),
           "random": ("random (GoLore)", "golore@100"),
           "oracle": ("SVD of the true gradient", None)}


def plot(frame: pd.DataFrame) -> plt.Figure:
    """Captured fraction against steps (mean and min–max over layers) and against each layer's SNR."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    for column, (label, method) in CAPTURE.items():
        style = method_style(method, label=label) if method else dict(color=GREY, ls="--", marker="", label=label)
        stats = frame.groupby("step")[column].agg(["mean", "min", "max"])
        left.plot(stats.index, stats["mean"], ms=3, **style)
        left.fill_between(stats.index, stats["min"], stats["max"], color=style["color"], alpha=0.15, lw=0)
        if method:
            right.scatter(frame["snr"], frame[column], s=9, color=style["color"], marker=style["marker"], alpha=0.6,
                          label=label)
    left.set_xlabel("training step")
    left.set_ylabel("captured fraction of the true gradient")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"LLaMA ({frame['model'].iloc[0]} preset), attention and MLP weights, full AdamW", fontsize=10)
    legend_below(left, y=-0.17)
    right.set_xscale("log")
    no_minor_labels(right.xaxis)
    right.set_xlabel("layer gradient-to-noise ratio ‖G‖₂ / ‖Ĝ − G‖₂")
    right.set_ylim(-0.02, 1.02)
    right.set_title("per layer and measurement", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
