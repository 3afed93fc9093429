"""Figure 3 at CPU size: validation perplexity of Full, GaLore, GoLore@20% and L.B. GaLore, AdamW and momentum SGD.

The paper pre-trains LLaMA-60M on C4 for 10k steps and reads, at 8-9.5k steps, Full ~ 37.5, GaLore ~ 44.0,
GoLore@20% ~ 43.5 perplexity (its Figure 3): GoLore's gain is about the size of seed noise. Here every method
x optimizer x seed is one run of :func:`golore_lab.lm.train.train` with the scaled recipe of
:func:`golore_lab.lm.pretrain.recipe`; the seed fixes the initial weights, the data order and the random
projections (seed s of every method starts from the same model and sees the same batches).

Presets: ``fast`` -- the tiny model, 1 seed, 30 steps (a smoke test of the path); ``default`` -- the ``cpu``
model, 3 seeds, 160 steps (the figure and the README table, about 20 minutes on 2 cores; its cache is
committed); ``full`` -- the same with 5 seeds. The frame: one row per logged step of every run (columns
``optimizer, method, seed, step, tokens, lr, train_loss, val_loss, val_ppl, elapsed_s, run_seconds``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import matplotlib.ticker
import pandas as pd

from ..plotting import family, method_label, method_style
from ..threads import num_threads

NAME = "fig3_pretrain"
OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "momentum SGD"}


@dataclass(frozen=True)
class Config:
    """``steps``/``batch_size`` None: the model preset's recipe; ``seq_len`` None: the model's context."""

    preset: str
    model: str
    seeds: tuple[int, ...]
    eval_windows: int = 48
    seq_len: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    methods: tuple[str, ...] = ("full", "galore", "golore@20", "lb-galore")
    optimizers: tuple[str, ...] = ("adamw", "sgd")


PRESETS = {
    "fast": Config("fast", "tiny", (0,), eval_windows=16, seq_len=32, steps=30, batch_size=8),
    "default": Config("default", "cpu", (0, 1, 2)),
    "full": Config("full", "cpu", (0, 1, 2, 3, 4)),
}
GROUP_BY = ("optimizer", "method", "seed")


def expected_groups(config: Config) -> list[tuple]:
    return [(o, m, s) for o in config.optimizers for m in config.methods for s in config.seeds]


def train_configs(config: Config) -> list:
    """The :class:`golore_lab.lm.train.TrainConfig` of every run, in the order they run."""
    from ..lm.pretrain import recipe

    sizes = {k: v for k, v in (("steps", config.steps), ("batch_size", config.batch_size)) if v is not None}
    return [recipe(config.model, method=m, optimizer=o, seed=s, progress=False, **sizes)
            for o in config.optimizers for m in config.methods for s in config.seeds]


def run(config: Config, threads: int = 1, log=print) -> pd.DataFrame:
    from ..lm.data import ensure_corpus
    from ..lm.model import LlamaConfig
    from ..lm.pretrain import LMTask
    from ..lm.train import train

    task = LMTask(ensure_corpus(log=log), LlamaConfig.preset(config.model), seq_len=config.seq_len,
                  eval_windows=config.eval_windows)
    frames, start = [], time.perf_counter()
    for cfg in train_configs(config):
        t0 = time.perf_counter()
        with num_threads(threads):
            result = train(task, cfg)
        seconds = time.perf_counter() - t0
        frame = pd.DataFrame(result.history)
        frame.insert(0, "seed", cfg.seed)
        frame.insert(0, "method", cfg.method)
        frame.insert(0, "optimizer", cfg.optimizer)
        frame["run_seconds"] = seconds
        frames.append(frame)
        log(f"pretrain {cfg.optimizer}/{cfg.method} seed {cfg.seed}: val ppl {result.final['val_ppl']:.2f} "
            f"({seconds:.0f} s, total {time.perf_counter() - start:.0f} s)")
    columns = ["optimizer", "method", "seed", "step", "tokens", "lr", "train_loss", "val_loss", "val_ppl",
               "elapsed_s", "run_seconds"]
    return pd.concat(frames, ignore_index=True)[columns]


def curves(frame: pd.DataFrame, optimizer: str) -> pd.DataFrame:
    """Validation perplexity per (method, step): mean, std and count over seeds."""
    evals = frame[(frame.optimizer == optimizer) & frame.val_ppl.notna()]
    out = evals.groupby(["method", "step"], sort=False).val_ppl.agg(["mean", "std", "count"]).reset_index()
    return out.rename(columns={"mean": "val_ppl_mean", "std": "val_ppl_std", "count": "seeds"})


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Final validation perplexity per optimizer and method: mean, std over seeds, and the gap to GaLore."""
    last = frame[frame.val_ppl.notna()].sort_values("step").groupby(["optimizer", "method", "seed"]).tail(1)
    table = last.groupby(["optimizer", "method"], sort=False).val_ppl.agg(["mean", "std", "count"]).reset_index()
    galore = table[table.method == "galore"].set_index("optimizer")["mean"]
    table["minus_galore"] = table["mean"] - table.optimizer.map(galore)
    order = {m: i for i, m in enumerate(dict.fromkeys(frame["method"]))}
    table = table.sort_values(["optimizer", "method"], key=lambda s: s.map(order) if s.name == "method" else s)
    return table.rename(columns={"mean": "final_ppl_mean", "std": "final_ppl_std", "count": "seeds"}).reset_index(drop=True)


def table(frame: pd.DataFrame) -> str:
    """The final perplexities as Markdown, one row per method, one column per optimizer (mean ± std)."""
    summary = summary_table(frame)
    optimizers = list(dict.fromkeys(frame["optimizer"]))
    lines = ["| method | " + " | ".join(f"{OPTIMIZER_NAMES[o]}: final val. ppl" for o in optimizers) + " |",
             "|---|" + "---|" * len(optimizers)]
    for method in dict.fromkeys(frame["method"]):
        cells = []
        for optimizer in optimizers:
            row = summary[(summary.method == method) & (summary.optimizer == optimizer)]
            cells.append("" if row.empty else
                         f"{row.final_ppl_mean.iloc[0]:.2f} ± {row.final_ppl_std.fillna(0).iloc[0]:.2f}")
        lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
    seeds = int(summary["seeds"].max())
    return "\n".join(lines) + f"\n\nFinal validation perplexity, mean ± std over {seeds} seed(s).\n"


def draw(ax, frame: pd.DataFrame, optimizer: str, zoom_fraction: float = 0.25) -> None:
    """Validation perplexity vs steps, mean ± std over seeds, with an inset on the last ``zoom_fraction``."""
    data = curves(frame, optimizer)
    last_step = data.step.max()
    inset = ax.inset_axes([0.42, 0.42, 0.54, 0.40])
    for method, d in data.groupby("method", sort=False):
        lo, hi = d.val_ppl_mean - d.val_ppl_std.fillna(0), d.val_ppl_mean + d.val_ppl_std.fillna(0)
        # GaLore and GoLore@X% coincide until the switch (same seed, same run): GoLore's hollow markers on
        # GaLore's larger filled squares keep both visible where the curves overlap
        hollow = {"markerfacecolor": "white", "markersize": 4} if family(method) == "golore" else {"markersize": 5}
        for target in (ax, inset):
            target.plot(d.step, d.val_ppl_mean, **method_style(method, **hollow))
            target.fill_between(d.step, lo, hi, color=method_style(method)["color"], alpha=0.2, linewidth=0)
    tail = data[data.step >= (1 - zoom_fraction) * last_step]
    inset.set_xlim(tail.step.min(), last_step)
    inset.set_ylim((tail.val_ppl_mean - tail.val_ppl_std.fillna(0)).min() * 0.98,
                   (tail.val_ppl_mean + tail.val_ppl_std.fillna(0)).max() * 1.02)
    inset.grid(alpha=0.3)
    inset.tick_params(labelsize=7)
    ax.indicate_inset_zoom(inset, edgecolor="0.4")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (log scale)")
    seeds = int(data.seeds.max())
    ax.set_title(f"Pre-training with {OPTIMIZER_NAMES[optimizer]} (mean ± std over {seeds} seed{'s' * (seeds > 1)})",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)


def plot(frame: pd.DataFrame) -> plt.Figure:
    optimizers = list(dict.fromkeys(frame["optimizer"]))
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6.4 * len(optimizers), 4.6), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers):
        draw(ax, frame, optimizer)
    fig.tight_layout()
    return fig
