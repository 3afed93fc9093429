"""Typed runners behind the figures: the figure command and the notebooks call these same functions."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import counterexample as ce
from .figures import FigureContext
from .plotting import counterexample_figure
from .threads import num_threads

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


# ---------------------------------------------------------------------------------------------- theory (05)
#: sizes of the theory figures' computations per preset (the notebook uses "fast")
THEORY = {
    "fast": dict(mc_sizes=tuple(2**k for k in range(3, 12)), replicates=6, bias_samples=2048, trials=40,
                 rate_steps=(500, 1000, 2000, 4000, 8000), rate_seeds=4, deterministic_steps=4000),
    "default": dict(mc_sizes=tuple(2**k for k in range(3, 13)), replicates=8, bias_samples=4096, trials=150,
                    rate_steps=(500, 1000, 2000, 4000, 8000, 16000, 32000), rate_seeds=8, deterministic_steps=8000),
    "full": dict(mc_sizes=tuple(2**k for k in range(3, 16)), replicates=16, bias_samples=32768, trials=500,
                 rate_steps=tuple(500 * 2**k for k in range(9)), rate_seeds=16, deterministic_steps=32000),
}
#: the O(1/√T) experiment: η = lr_scale/√T, L.B. batch ⌈batch_scale·√T⌉ at refreshes, τ = update_proj_gap
STOCHASTIC_RATE = dict(lr_scale=1.0, batch_scale=1.0, update_proj_gap=10)
#: deterministic GaLore: L·η·τ = ½, the largest step the derived O(1/T) bound allows
DETERMINISTIC_RATE = dict(lr=0.05, update_proj_gap=10)
#: log-log slopes are fitted from this T on (after the start-up transient)
SLOPE_FROM = {"stochastic": 1000, "deterministic": 256}


def theory_stiefel(preset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 5a's data: the Monte Carlo of E[PPᵀ] (per replicate) and the projected-gradient bias per method."""
    from . import theory as th

    cfg = THEORY[preset]
    study = th.stiefel_mean_study(10, 4, cfg["mc_sizes"], cfg["replicates"])
    no_b = ce.Counterexample(linear_term=False)
    sizes = [2**k for k in range(2, 20) if 2**k <= cfg["bias_samples"]]
    bias = pd.concat([th.projected_gradient_bias(no_b, no_b.x0, projection, cfg["bias_samples"], sizes=sizes)
                      .assign(method=method) for method, projection in [("golore", "random"), ("galore", "svd")]],
                     ignore_index=True)
    return study, bias


def theory_perturbation(preset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 5b's data: the bound on random and counterexample instances, and the large-batch capture."""
    from . import theory as th

    no_b = ce.Counterexample(linear_term=False)
    trials = pd.concat([th.perturbation_trials(trials=THEORY[preset]["trials"]), th.counterexample_trials(no_b),
                        th.counterexample_trials(no_b, cancel=True)], ignore_index=True)
    capture = th.large_batch_capture(no_b, [1] + [2**k + 1 for k in range(1, 11)])  # odd: no ties
    return trials, capture


def theory_stochastic_rates(preset: str) -> pd.DataFrame:
    """Figure 5c's data: GaLore, GoLore and L.B. GaLore with η ∝ 1/√T on the counterexample, per seed."""
    from . import theory as th

    cfg = THEORY[preset]
    return th.stochastic_rates(ce.Counterexample(), cfg["rate_steps"], seeds=range(cfg["rate_seeds"]),
                               **STOCHASTIC_RATE)


def produce_theory(ctx: FigureContext) -> None:
    """The figures of notebook 05 (convergence proofs): Haar moments, perturbation bound, the two rates."""
    with num_threads(1):  # 10 × 10 matrices: OpenMP threads only add overhead
        _produce_theory(ctx)


def _produce_theory(ctx: FigureContext) -> None:
    from . import plotting
    from . import theory as th

    cfg = THEORY[ctx.preset]
    study, bias = theory_stiefel(ctx.preset)
    rms = th.rms_by_size(study)
    fig = plotting.stiefel_mean_figure(study, rms, bias, 10, 4, th.loglog_slope(rms.samples, rms.rms))
    ctx.save(fig, "fig5_stiefel_mean", pd.concat([study.assign(panel="stiefel_mean"),
                                                  bias.assign(panel="projected_gradient_bias")], ignore_index=True))

    trials, capture = theory_perturbation(ctx.preset)
    fig = plotting.perturbation_figure(trials, capture, delta=0.4)
    ctx.save(fig, "fig5_perturbation_bound", pd.concat([trials.assign(panel="bound"),
                                                        capture.assign(panel="large_batch")], ignore_index=True))

    problem = ce.Counterexample()
    config = {**STOCHASTIC_RATE, "steps": cfg["rate_steps"], "seeds": cfg["rate_seeds"]}
    rates = ctx.cached("fig5_rates_stochastic", config, lambda: theory_stochastic_rates(ctx.preset))
    summary = th.rate_summary(rates)
    slopes = th.rate_slopes(summary, SLOPE_FROM["stochastic"]).to_dict()
    fig = plotting.rates_figure(summary, slopes, -0.5, f"η = 1/√T, L.B. batch ⌈√T⌉, τ = 10, {cfg['rate_seeds']} seeds",
                                floor=2 * (problem.galore_plateau - problem.f_star))
    ctx.save(fig, "fig5_rates_stochastic", summary)

    exact = ce.Counterexample(noise="none")
    det = th.deterministic_rate(exact, steps=cfg["deterministic_steps"], **DETERMINISTIC_RATE)
    shown = det[det.steps.isin(np.unique(np.geomspace(1, cfg["deterministic_steps"], 40).astype(int)))]
    slope = th.loglog_slope(*det[det.steps >= SLOPE_FROM["deterministic"]][["steps", "avg_grad_sq"]].T.values)
    summary = shown.rename(columns={"avg_grad_sq": "mean"})
    fig = plotting.rates_figure(summary[["method", "steps", "mean"]], {"galore": slope}, -1.0,
                                "deterministic GaLore (exact gradients), η = 0.05, τ = 10",
                                guides=("galore",),
                                bound=summary[["steps", "bound"]])
    ctx.save(fig, "fig5_rate_deterministic", shown)
