"""Figure 3 at CPU size: validation perplexity of Full, GaLore, GoLore@20% and L.B. GaLore, AdamW and momentum SGD.

The paper (``reference/pt_loss.png``) pre-trains LLaMA-60M on C4 for 10k steps and reads, at 8-9.5k steps,
Full ~ 37.5, GaLore ~ 44.0, GoLore@20% ~ 43.5 perplexity: GoLore's gain is about the size of seed noise. Here
every method x optimizer x seed is one run of :func:`golore_lab.lm.train.train` with the scaled recipe of
:func:`golore_lab.lm.pretrain.recipe`; the seed fixes the initial weights, the data order and the random
projections (so seed s of every method starts from the same model and sees the same batches).

Grids (``python -m golore_lab figures --only pretrain --preset P``):

* ``fast``    -- tiny model, 1 seed, 30 steps: a smoke test of the whole path (CI);
* ``default`` -- the ``cpu`` model, 3 seeds, 160 steps: the figure and the README table (~20 min on 2 cores,
  results committed under ``figures/data/runs/pretrain-default.*`` and re-plotted on a fresh clone);
* ``full``    -- the same with 5 seeds.

Typical use (what the notebook does)::

    frame = load_results("default")              # cached runs, or run them
    summary_table(frame)                         # final perplexity, mean +- std over seeds
    plot_perplexity(frame, "adamw")              # a matplotlib Figure
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from ..plotting import COLORS
from ..threads import num_threads
from .train import config_dict

METHODS = ("full", "galore", "golore@20", "lb-galore")
LABELS = {"full": "Full params.", "galore": "GaLore", "golore@20": "GoLore@20%", "lb-galore": "L.B. GaLore"}
STYLE = {"full": (COLORS["full"], "^"), "galore": (COLORS["galore"], "s"), "golore@20": (COLORS["golore"], "o"),
         "lb-galore": (COLORS["lb-galore"], "D")}  # the package's colours (golore_lab.plotting)
OPTIMIZERS = ("adamw", "sgd")
GRIDS = {
    "fast": dict(model="tiny", seeds=(0,), seq_len=32, eval_windows=16, overrides=dict(batch_size=8, steps=30)),
    "default": dict(model="cpu", seeds=(0, 1, 2), seq_len=None, eval_windows=48, overrides={}),
    "full": dict(model="cpu", seeds=(0, 1, 2, 3, 4), seq_len=None, eval_windows=48, overrides={}),
}


def grid_configs(preset: str) -> list:
    """The :class:`TrainConfig` of every run of a grid, in the order they run."""
    from .pretrain import recipe

    if preset not in GRIDS:
        raise ValueError(f"Unknown preset: {preset!r} (choose from {sorted(GRIDS)})")
    grid = GRIDS[preset]
    return [recipe(grid["model"], method=m, optimizer=o, seed=s, progress=False, **grid["overrides"])
            for o in OPTIMIZERS for m in METHODS for s in grid["seeds"]]


def cache_config(preset: str) -> dict:
    """What the cached results depend on (the cache is reused only if this matches)."""
    grid = GRIDS[preset]
    return {"preset": preset, "model": grid["model"], "seq_len": grid["seq_len"], "eval_windows": grid["eval_windows"],
            "runs": [config_dict(c) for c in grid_configs(preset)], "version": 1}


def run_grid(preset: str = "default", threads: int = 1, log=print) -> pd.DataFrame:
    """Run every configuration of ``preset``; return the tidy logged rows (one per logged step and run).

    Columns: optimizer, method, seed, step, tokens, train_loss, val_loss, val_ppl, elapsed_s, run_seconds.
    """
    from .data import ensure_corpus
    from .model import LlamaConfig
    from .pretrain import LMTask
    from .train import train

    grid = GRIDS[preset]
    task = LMTask(ensure_corpus(log=log), LlamaConfig.preset(grid["model"]), seq_len=grid["seq_len"],
                  eval_windows=grid["eval_windows"])
    frames, start = [], time.perf_counter()
    for cfg in grid_configs(preset):
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


def load_results(preset: str = "default", out_dir: Path | str = "figures", force: bool = False) -> pd.DataFrame:
    """The grid's rows from the committed cache ``out_dir/data/runs/pretrain-PRESET.csv``, or run it."""
    from golore_lab.figures import FigureContext

    ctx = FigureContext(out_dir=Path(out_dir), preset=preset, force=force)
    return ctx.cached(f"pretrain-{preset}", cache_config(preset), lambda: run_grid(preset))


def curves(frame: pd.DataFrame, optimizer: str) -> pd.DataFrame:
    """Validation perplexity per (method, step): mean, std and count over seeds (the data behind a figure)."""
    evals = frame[(frame.optimizer == optimizer) & frame.val_ppl.notna()]
    out = evals.groupby(["method", "step"]).val_ppl.agg(["mean", "std", "count"]).reset_index()
    out.insert(0, "optimizer", optimizer)
    return out.rename(columns={"mean": "val_ppl_mean", "std": "val_ppl_std", "count": "seeds"})


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Final validation perplexity per optimizer and method: mean, std over seeds, and the gap to GaLore."""
    last = frame[frame.val_ppl.notna()].sort_values("step").groupby(["optimizer", "method", "seed"]).tail(1)
    table = last.groupby(["optimizer", "method"]).val_ppl.agg(["mean", "std", "count"]).reset_index()
    galore = table[table.method == "galore"].set_index("optimizer")["mean"]
    table["minus_galore"] = table["mean"] - table.optimizer.map(galore)
    order = {m: i for i, m in enumerate(METHODS)}
    table = table.sort_values(["optimizer", "method"], key=lambda s: s.map(order) if s.name == "method" else s)
    return table.rename(columns={"mean": "final_ppl_mean", "std": "final_ppl_std", "count": "seeds"}).reset_index(drop=True)


def table_markdown(table: pd.DataFrame) -> str:
    """The summary table as Markdown, one row per method, one column per optimizer."""
    names = {"adamw": "AdamW", "sgd": "momentum SGD"}
    lines = ["| method | " + " | ".join(f"{names[o]}: final val. ppl" for o in OPTIMIZERS) + " |",
             "|---|" + "---|" * len(OPTIMIZERS)]
    for method in METHODS:
        cells = []
        for optimizer in OPTIMIZERS:
            row = table[(table.method == method) & (table.optimizer == optimizer)]
            cells.append("" if row.empty else f"{row.final_ppl_mean.iloc[0]:.2f} ± {row.final_ppl_std.fillna(0).iloc[0]:.2f}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_perplexity(frame: pd.DataFrame, optimizer: str, zoom_fraction: float = 0.25):
    """Validation perplexity vs steps, mean +- std over seeds, with an inset on the last ``zoom_fraction``."""
    import matplotlib.pyplot as plt

    data = curves(frame, optimizer)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    last_step = data.step.max()
    inset = ax.inset_axes([0.42, 0.42, 0.54, 0.40])
    for method in METHODS:
        d = data[data.method == method]
        if d.empty:
            continue
        color, marker = STYLE[method]
        lo, hi = d.val_ppl_mean - d.val_ppl_std.fillna(0), d.val_ppl_mean + d.val_ppl_std.fillna(0)
        for target in (ax, inset):
            target.plot(d.step, d.val_ppl_mean, color=color, marker=marker, markersize=4, label=LABELS[method])
            target.fill_between(d.step, lo, hi, color=color, alpha=0.2, linewidth=0)
    tail = data[data.step >= (1 - zoom_fraction) * last_step]
    inset.set_xlim(tail.step.min(), last_step)
    inset.set_ylim((tail.val_ppl_mean - tail.val_ppl_std.fillna(0)).min() * 0.98,
                   (tail.val_ppl_mean + tail.val_ppl_std.fillna(0)).max() * 1.02)
    inset.grid(alpha=0.3)
    inset.tick_params(labelsize=7)
    ax.indicate_inset_zoom(inset, edgecolor="0.4")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (log scale)")
    seeds = int(data.seeds.max())
    name = {"adamw": "AdamW", "sgd": "momentum SGD"}[optimizer]
    ax.set_title(f"Pre-training with {name} (mean ± std over {seeds} seed{'s' * (seeds > 1)})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    return fig


def produce(ctx) -> None:
    """Figure producer ``pretrain``: fig3_pretrain_adamw.png, fig3_pretrain_sgd.png and the final-ppl table."""
    from golore_lab.figures import atomic_write_csv

    frame = ctx.cached(f"pretrain-{ctx.preset}", cache_config(ctx.preset), lambda: run_grid(ctx.preset))
    for optimizer in OPTIMIZERS:
        ctx.save(plot_perplexity(frame, optimizer), f"fig3_pretrain_{optimizer}", curves(frame, optimizer))
    atomic_write_csv(summary_table(frame), Path(ctx.out_dir) / "data" / "fig3_pretrain_table.csv")
