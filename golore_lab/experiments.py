"""Typed runners behind the figures: the figure command and the notebooks call these same functions."""
from __future__ import annotations

import pandas as pd

from . import counterexample as ce
from .figures import FigureContext
from .plotting import counterexample_figure

#: noise seeds per preset (the runs always have the paper's length)
SEEDS = {"fast": 3, "default": 10, "full": 20}
#: the figures keep every 5th logged point (one per 500 steps)
THIN = 5


def figure1(optimizer: str, seeds: int = 10, linear_term: bool = True, **overrides) -> pd.DataFrame:
    """Run one panel of Figure 1 at the paper's settings (``ce.PAPER``) and return the per-run frame."""
    config = {**ce.PAPER[optimizer], **overrides}
    problem = ce.Counterexample(linear_term=linear_term)
    return ce.run(problem, seeds=range(seeds), **config)


def thin(summary: pd.DataFrame, every: int = THIN, log_every: int = 100) -> pd.DataFrame:
    """Keep the logged points whose step is a multiple of ``every · log_every``."""
    return summary[summary["step"] % (every * log_every) == 0].reset_index(drop=True)


def produce_counterexample(ctx: FigureContext) -> None:
    """Figure 1 (both panels) and the "no B" figure of the non-convergence theorem."""
    seeds = SEEDS[ctx.preset]
    for linear_term, suffix in [(True, ""), (False, "_noB")]:
        problem = ce.Counterexample(linear_term=linear_term)
        for optimizer in ("sgd", "adamw"):
            name = f"fig1_counterexample{suffix}_{optimizer}"
            config = {**ce.PAPER[optimizer], "seeds": seeds, "linear_term": linear_term, "engine": "fast"}
            summary = ctx.cached(name, config, lambda: thin(ce.summarize(figure1(optimizer, seeds, linear_term))))
            method_label = "MSGD (plain SGD)" if optimizer == "sgd" else "AdamW"
            title = (f"{'No-B instance' if suffix else 'Counterexample'}, {method_label}, "
                     f"mean and min–max over {seeds} noise seeds")
            fig = counterexample_figure(summary, problem.f_star, problem.galore_plateau, title,
                                        ylim=(-0.1, 0.85) if suffix else None)
            ctx.save(fig, name, summary)
