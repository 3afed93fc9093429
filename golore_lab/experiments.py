"""Typed runners behind the figures: the figure command and the notebooks call these same functions."""
from __future__ import annotations

import numpy as np
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


# ---------------------------------------------------------------------------------------------- Figure 2
def captured_runs(optimizer: str, seeds: int = 5, noise: str = "anisotropic") -> pd.DataFrame:
    """GaLore, GoLore (random from the start) and L.B. GaLore at the Figure 1 settings, with the logged
    captured fraction κ = ‖Pᵀ∇f‖²/‖∇f‖² and the top singular value of M."""
    config = {**ce.PAPER[optimizer], "methods": ("galore", "golore", "lb-galore")}
    return ce.run(ce.Counterexample(noise=noise), seeds=range(seeds), **config)


def summarize_columns(frame: pd.DataFrame, columns=("loss", "captured", "top_sv"), by=("method", "step")):
    """Mean, min and max over seeds of several logged columns, in long form (one row per column)."""
    parts = []
    for column in columns:
        stats = frame.groupby(list(by), sort=False)[column].agg(["mean", "min", "max"]).reset_index()
        parts.append(stats.assign(quantity=column))
    return pd.concat(parts, ignore_index=True)


def snr_sweep_counterexample(batches=(1, 4, 16, 64, 256), trials: int = 400, seed: int = 0) -> pd.DataFrame:
    """Captured fraction vs SNR at the counterexample's X₀: G = ∇f(X₀) rescaled, noise ±σC averaged over B."""
    from .analysis import snr_sweep

    problem = ce.Counterexample()
    snrs = np.geomspace(0.02, 20, 31)
    return snr_sweep(problem.grad(problem.x0), problem.sigma * problem.C, problem.r, snrs, batches, trials, seed,
                     noise_scale=problem.sigma)


def produce_noise(ctx: FigureContext) -> None:
    """Figure 2, quantitatively: what the subspaces capture on the counterexample (and under isotropic noise)."""
    from .plotting import captured_figure, isotropic_figure, snr_figure

    seeds = {"fast": 2, "default": 5, "full": 10}[ctx.preset]
    problem = ce.Counterexample()
    for optimizer in ("sgd", "adamw"):
        name = f"fig2_captured_{optimizer}"
        config = {**ce.PAPER[optimizer], "seeds": seeds, "methods": ["galore", "golore", "lb-galore"]}
        data = ctx.cached(name, config, lambda: thin(summarize_columns(captured_runs(optimizer, seeds))))
        ctx.save(captured_figure(data, problem.r / problem.n, problem.sigma, optimizer), name, data)

    trials = {"fast": 100, "default": 400, "full": 2000}[ctx.preset]
    config = {"batches": [1, 4, 16, 64, 256], "trials": trials, "seed": 0}
    sweep = ctx.cached("fig2_snr_sweep", config, lambda: snr_sweep_counterexample(trials=trials))
    ctx.save(snr_figure(sweep, problem.r / problem.n), "fig2_snr_sweep", sweep)

    name = "fig2_isotropic_sgd"
    config = {**ce.PAPER["sgd"], "seeds": seeds, "methods": ["galore", "golore", "lb-galore"], "noise": "both"}

    def both():
        frames = [summarize_columns(captured_runs("sgd", seeds, noise)).assign(noise=noise)
                  for noise in ce.NOISES]
        return thin(pd.concat(frames, ignore_index=True))

    data = ctx.cached(name, config, both)
    ctx.save(isotropic_figure(data, problem.f_star, problem.r / problem.n), name, data)


#: the real-model study per preset: (model preset, steps, measure every)
STUDY = {"fast": ("tiny", 30, 10), "default": ("cpu", 160, 20), "full": ("cpu", 320, 20)}


def produce_noise_lm(ctx: FigureContext) -> None:
    """Figure 2 on a real model: what each subspace captures of the tiny LLaMA's true gradient during training."""
    from .lm.noise_study import run_study
    from .plotting import lm_capture_figure

    model, steps, every = STUDY[ctx.preset]
    config = {"model": model, "steps": steps, "every": every, "batch_size": 8, "large_factor": 8,
              "reference_windows": 256, "seed": 0}
    data = ctx.cached(f"fig2_llama_captured-{ctx.preset}", config,
                      lambda: run_study(model=model, steps=steps, every=every, log=lambda *_: None))
    ctx.save(lm_capture_figure(data, model), "fig2_llama_captured", data)
