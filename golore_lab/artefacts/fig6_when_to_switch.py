"""When to switch, on a language model in its noise-dominated phase: Full, GaLore, GoLore@20%, L.B. GaLore, GoLore@auto.

The ``late`` pre-training recipe of :func:`golore_lab.lm.pretrain.recipe` (a 2-layer, width-64 LLaMA trained
for 6000 AdamW steps on batches of 2 × 32 tokens, rank 16, τ = 100) runs long enough, with noisy enough
gradients, that the SVD of one batch captures less of the true gradient late in training than early on. Three
parts, all AdamW:

* ``kappa``: the real-model κ measurement (:func:`golore_lab.lm.noise_study.run_study`, full AdamW at the
  recipe's default learning rate): every ``kappa_every`` steps, for each attention and MLP matrix, the captured
  fraction of its true gradient (a fixed reference set of training windows) by the top-r SVD of one batch, of
  an 8× batch, by a random basis and by the true gradient's own SVD;
* ``tune``: each method at each learning rate of ``lrs`` with seed ``tune_seed``; the method's learning rate is
  the one with the lowest final *validation* loss (:func:`tuned_lrs`; a run that diverges counts as inf);
* ``final``: each method at its tuned learning rate with ``seeds`` (fresh seeds: the tuning seed is not
  among them, so the comparison is not biased by the selection).

A seed fixes the initial weights, the data order and the random projections, so seed s of every method starts
from the same model and sees the same batches: differences are paired (:func:`paired`, with t-intervals).
GoLore@auto runs also record, per matrix, the step of its switch (the optimizer's ``switch_log``; NaN: never).

The frame: one row per logged evaluation (``row = "curve"``), per auto-switch record (``row = "switch"``) and
per κ measurement (``row = "kappa"``); ``part, method, seed, lr`` identify the run. Presets: ``fast`` (the tiny
model, 40 steps, 2 lrs, 1 final seed: a smoke test of the path, not a result), ``default`` (the figure and the
docs' table: 4 lrs, 5 final seeds; 46 single-thread runs of 1–2 minutes, about half an hour with 2 processes
on a shared 2-core machine), ``full`` (= default).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
import multiprocessing

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plotting import GREY, method_label, method_style

NAME = "fig6_when_to_switch"
METHODS = ("full", "galore", "golore@20", "lb-galore", "golore@auto")


@dataclass(frozen=True)
class Config:
    """``steps`` None: the model preset's recipe."""

    preset: str
    model: str
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    tune_seed: int = 0
    steps: int | None = None
    eval_windows: int = 256
    kappa_every: int = 300
    reference_windows: int = 256
    methods: tuple[str, ...] = METHODS


PRESETS = {
    "fast": Config("fast", "tiny", (3e-3, 1e-2), (1,), steps=40, eval_windows=16, kappa_every=4,
                   reference_windows=64),
    "default": Config("default", "late", (3e-4, 1e-3, 3e-3, 1e-2), (1, 2, 3, 4, 5)),
    "full": Config("full", "late", (3e-4, 1e-3, 3e-3, 1e-2), (1, 2, 3, 4, 5)),
}
GROUP_BY = ("part", "method", "seed")


def expected_groups(config: Config) -> list[tuple]:
    return ([("kappa", "full", config.tune_seed)]
            + [("tune", m, config.tune_seed) for m in config.methods]
            + [("final", m, s) for m in config.methods for s in config.seeds])


# ------------------------------------------------------------------------------------------------ runs
def _task(config: Config):
    from ..lm.data import ensure_corpus
    from ..lm.model import LlamaConfig
    from ..lm.pretrain import LMTask

    return LMTask(ensure_corpus(log=lambda *_: None), LlamaConfig.preset(config.model), eval_windows=config.eval_windows,
                  eval_batch=64)


def train_config(config: Config, method: str, lr: float, seed: int):
    """The :class:`golore_lab.lm.train.TrainConfig` of one run."""
    from ..lm.pretrain import recipe

    sizes = {} if config.steps is None else {"steps": config.steps}
    return recipe(config.model, method=method, optimizer="adamw", lr=lr, seed=seed, progress=False, **sizes)


def _train_job(config: Config, part: str, method: str, lr: float, seed: int) -> pd.DataFrame:
    """One training run (in a worker process, one thread): its evaluations, and its switches if GoLore@auto."""
    import torch

    from ..lm.model import is_subspace_weight
    from ..lm.train import RunError, train

    torch.set_num_threads(1)
    task = _task(config)
    cfg = train_config(config, method, lr, seed)
    start = time.perf_counter()
    try:
        result = train(task, cfg)
    except RunError:  # diverged: a final loss of inf, which tuning never selects
        return pd.DataFrame({"row": ["curve"], "step": [cfg.steps], "val_loss": [math.inf], "val_ppl": [math.inf],
                             "part": part, "method": method, "seed": seed, "lr": lr,
                             "run_seconds": time.perf_counter() - start})
    seconds = time.perf_counter() - start
    curve = pd.DataFrame([h for h in result.history if "val_loss" in h])[["step", "train_loss", "val_loss", "val_ppl"]]
    frames = [curve.assign(row="curve")]
    if method == "golore@auto":  # one row per subspace matrix, in the optimizer's parameter order
        names = [n for n, p in result.model.named_parameters() if is_subspace_weight(n, p)]
        switched = {e["position"]: e for e in result.switch_log}
        frames.append(pd.DataFrame({
            "row": "switch", "layer": names,
            "switch_step": [switched[i]["step"] if i in switched else math.nan for i in range(len(names))],
            "signal": [switched[i]["signal"] if i in switched else math.nan for i in range(len(names))],
            "random_signal": [switched[i]["random_signal"] if i in switched else math.nan for i in range(len(names))],
            "t": [switched[i]["t"] if i in switched else math.nan for i in range(len(names))],
        }))
    out = pd.concat(frames, ignore_index=True)
    return out.assign(part=part, method=method, seed=seed, lr=lr, run_seconds=seconds)


def _kappa_job(config: Config) -> pd.DataFrame:
    """The κ measurement along a full-AdamW run of the recipe (:func:`golore_lab.lm.noise_study.run_study`)."""
    import torch

    from ..lm.noise_study import run_study
    from ..lm.pretrain import recipe

    torch.set_num_threads(1)
    cfg = recipe(config.model, **({} if config.steps is None else {"steps": config.steps}))
    start = time.perf_counter()
    frame = run_study(model=config.model, steps=cfg.steps, every=config.kappa_every, batch_size=cfg.batch_size,
                      reference_windows=config.reference_windows, seed=config.tune_seed, log=lambda *_: None)
    frame = frame[["step", "layer", "dim", "rank", "svd", "svd_large", "random", "oracle", "snr"]]
    return frame.assign(row="kappa", part="kappa", method="full", seed=config.tune_seed, lr=cfg.lr,
                        run_seconds=time.perf_counter() - start)


def tuned_lrs(frame: pd.DataFrame) -> dict[str, float]:
    """Per method, the learning rate of the ``tune`` part with the lowest final validation loss."""
    curves = frame[(frame.part == "tune") & (frame.row == "curve")]
    last = curves[curves.step == curves.step.max()]
    best = last.loc[last.groupby("method", sort=False).val_loss.idxmin()]
    return dict(zip(best.method, best.lr.astype(float)))


def run(config: Config, workers: int = 2, log=print) -> pd.DataFrame:
    """The three parts, ``workers`` runs at a time (one thread each); the κ study runs next to the tuning."""
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited thread pools or RNG state
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        jobs = [pool.submit(_kappa_job, config)]
        jobs += [pool.submit(_train_job, config, "tune", m, lr, config.tune_seed)
                 for m in config.methods for lr in config.lrs]
        frames = []
        for job in jobs:
            frames.append(job.result())
            f = frames[-1]
            log(f"{NAME}: {f.part.iloc[0]} {f.method.iloc[0]} lr {f.lr.iloc[0]:g}: "
                f"{'' if f.part.iloc[0] == 'kappa' else 'val loss %.4f ' % f.val_loss.dropna().iloc[-1]}"
                f"({f.run_seconds.iloc[0]:.0f} s, total {time.perf_counter() - start:.0f} s)")
        lrs = tuned_lrs(pd.concat(frames, ignore_index=True))
        log(f"{NAME}: tuned learning rates {lrs}")
        jobs = [pool.submit(_train_job, config, "final", m, lrs[m], s) for m in config.methods for s in config.seeds]
        for job in jobs:
            frames.append(job.result())
            f = frames[-1]
            log(f"{NAME}: final {f.method.iloc[0]} seed {f.seed.iloc[0]}: val loss {f.val_loss.dropna().iloc[-1]:.4f} "
                f"({f.run_seconds.iloc[0]:.0f} s, total {time.perf_counter() - start:.0f} s)")
    columns = ["part", "method", "seed", "lr", "row", "step", "train_loss", "val_loss", "val_ppl", "layer", "dim",
               "rank", "svd", "svd_large", "random", "oracle", "snr", "switch_step", "signal", "random_signal", "t",
               "run_seconds"]
    return pd.concat(frames, ignore_index=True).reindex(columns=columns)


def rerun(config: Config, frame: pd.DataFrame, methods: tuple[str, ...] = ("golore@auto",), workers: int = 2,
          log=print) -> pd.DataFrame:
    """``frame`` (a complete result of ``config``) with the tune and final runs of ``methods`` computed again and
    everything else kept: for a change of code that only those methods run (GoLore@auto's test). The methods'
    tuned learning rates come from their new tune runs. The committed default cache was last updated so::

        from golore_lab.artefacts import cache, fig6_when_to_switch as f6
        config = f6.PRESETS["default"]
        old = cache.load(root, f6.NAME, config, f6.GROUP_BY, f6.expected_groups(config))
        cache.store(root, f6.NAME, config, f6.rerun(config, old), f6.GROUP_BY, f6.expected_groups(config))
    """
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    kept = frame[~frame.method.isin(methods) | (frame.part == "kappa")]
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        tune = [job.result() for job in [pool.submit(_train_job, config, "tune", m, lr, config.tune_seed)
                                         for m in methods for lr in config.lrs]]
        lrs = tuned_lrs(pd.concat(tune, ignore_index=True))
        log(f"{NAME}: rerun {list(methods)}: tuned learning rates {lrs} ({time.perf_counter() - start:.0f} s)")
        final = [job.result() for job in [pool.submit(_train_job, config, "final", m, lrs[m], s)
                                          for m in methods for s in config.seeds]]
    log(f"{NAME}: rerun done ({time.perf_counter() - start:.0f} s)")
    order = {m: i for i, m in enumerate(config.methods)}
    out = pd.concat([kept, *tune, *final], ignore_index=True).reindex(columns=frame.columns)
    parts = {"kappa": 0, "tune": 1, "final": 2}
    return (out.assign(_p=out.part.map(parts), _m=out.method.map(order))
            .sort_values(["_p", "_m", "seed", "lr"], kind="stable").drop(columns=["_p", "_m"]).reset_index(drop=True))


# ------------------------------------------------------------------------------------------------ analysis
def final_losses(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, seed) of the ``final`` part: the last evaluation's val_loss and val_ppl, and lr."""
    curves = frame[(frame.part == "final") & (frame.row == "curve")]
    last = curves[curves.step == curves.step.max()]
    return last[["method", "seed", "lr", "val_loss", "val_ppl"]].reset_index(drop=True)


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t confidence interval of the mean of ``values`` (n >= 2; NaN width else)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired(frame: pd.DataFrame, baseline: str = "galore", metric: str = "val_loss") -> pd.DataFrame:
    """Per method: mean and 95% t-interval of (method − ``baseline``) over the seeds both have (paired by seed)."""
    finals = final_losses(frame).pivot(index="seed", columns="method", values=metric)
    rows = []
    for method in dict.fromkeys(frame.method):
        if method == baseline or method not in finals:
            continue
        diff = (finals[method] - finals[baseline]).dropna().to_numpy()
        mean, low, high = t_interval(diff)
        rows.append({"method": method, "metric": metric, "mean": mean, "low": low, "high": high, "seeds": len(diff)})
    return pd.DataFrame(rows)


def kappa_summary(frame: pd.DataFrame, early: tuple[float, float] = (0.05, 0.2), late: float = 0.8) -> pd.DataFrame:
    """Per layer: the SVD-of-one-batch captured fraction averaged over an early window of steps (``early``, as
    fractions of the run) and over the last (1 − ``late``) of the run, and r/dim (what a random basis captures)."""
    kappa = frame[frame.row == "kappa"]
    steps = kappa.step.max()
    early_rows = kappa[(kappa.step >= early[0] * steps) & (kappa.step <= early[1] * steps)]
    late_rows = kappa[kappa.step >= late * steps]
    out = pd.DataFrame({"early": early_rows.groupby("layer", sort=False).svd.mean(),
                        "late": late_rows.groupby("layer", sort=False).svd.mean(),
                        "late_snr": late_rows.groupby("layer", sort=False).snr.mean(),
                        "r_over_dim": kappa.groupby("layer", sort=False).apply(
                            lambda d: (d["rank"] / d["dim"]).iloc[0], include_groups=False)})
    return out.reset_index()


def switches(frame: pd.DataFrame) -> pd.DataFrame:
    """GoLore@auto's switch records of the ``final`` part: one row per (seed, layer); switch_step NaN: never."""
    return frame[(frame.part == "final") & (frame.row == "switch")][["seed", "layer", "switch_step"]].reset_index(drop=True)


def table(frame: pd.DataFrame) -> str:
    """Tuned lr, final validation loss and perplexity (mean ± std), and the paired difference to GaLore (95% CI)."""
    finals = final_losses(frame)
    diffs = {metric: paired(frame, metric=metric).set_index("method") for metric in ("val_loss", "val_ppl")}
    lines = ["| method | tuned lr | val. loss | val. ppl | − GaLore: loss (95% CI) | − GaLore: ppl (95% CI) |",
             "|---|---|---|---|---|---|"]
    for method, d in finals.groupby("method", sort=False):
        cells = [f"{d.lr.iloc[0]:g}", f"{d.val_loss.mean():.4f} ± {d.val_loss.std(ddof=1):.4f}",
                 f"{d.val_ppl.mean():.2f} ± {d.val_ppl.std(ddof=1):.2f}"]
        for metric, digits in (("val_loss", 4), ("val_ppl", 2)):
            if method in diffs[metric].index:
                r = diffs[metric].loc[method]
                cells.append(f"{r['mean']:+.{digits}f} [{r['low']:+.{digits}f}, {r['high']:+.{digits}f}]")
            else:
                cells.append("")
        lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
    seeds = int(finals.groupby("method").seed.nunique().min())
    kappa = kappa_summary(frame)
    below = int((kappa.late < kappa.early).sum())
    return ("\n".join(lines) + f"\n\nFinal validation loss and perplexity, mean ± std over {seeds} seeds at each "
            f"method's tuned learning rate; differences paired by seed. κ (SVD of one batch, full AdamW): "
            f"{kappa.early.mean():.3f} early → {kappa.late.mean():.3f} late (mean over layers; lower late in "
            f"{below} of {len(kappa)} layers).\n")


def plot(frame: pd.DataFrame) -> plt.Figure:
    """(a) validation loss at the tuned lrs; (b) κ per layer along training with the auto switches; (c) each
    layer's switch step against its late κ."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15.5, 4.3))
    curves = frame[(frame.part == "final") & (frame.row == "curve")]
    for method, d in curves.groupby("method", sort=False):
        stats = d.groupby("step").val_loss.agg(["mean", "std"])
        lr = d.lr.iloc[0]
        a.plot(stats.index, stats["mean"], ms=4, **method_style(method, label=f"{method_label(method)} (lr {lr:g})"))
        a.fill_between(stats.index, stats["mean"] - stats["std"].fillna(0), stats["mean"] + stats["std"].fillna(0),
                       color=method_style(method)["color"], alpha=0.2, lw=0)
    tail = curves[curves.step >= 0.5 * curves.step.max()].groupby(["method", "step"]).val_loss.mean()
    a.set_ylim(tail.min() - 0.05 * (tail.max() - tail.min()) - 0.01, tail.max() + 0.3 * (tail.max() - tail.min()) + 0.01)
    a.set_xlabel("step")
    a.set_ylabel("validation loss")
    seeds = int(curves.groupby("method").seed.nunique().min())
    a.set_title(f"AdamW at each method's tuned lr (mean ± std, {seeds} seed{'s' * (seeds > 1)})", fontsize=10)
    a.legend(fontsize=7)

    kappa = frame[frame.row == "kappa"]
    stats = kappa.groupby("step").svd.agg(["mean", "min", "max"])
    style = method_style("galore", label="SVD of one batch (GaLore), mean and range over layers")
    b.plot(stats.index, stats["mean"], ms=3, **style)
    b.fill_between(stats.index, stats["min"], stats["max"], color=style["color"], alpha=0.15, lw=0)
    r_over = float((kappa["rank"] / kappa["dim"]).iloc[0])
    b.axhline(r_over, color=GREY, ls="--", lw=1, label=f"random basis: r/dim = {r_over:g}")
    steps = switches(frame).switch_step.dropna()
    if len(steps):
        b.plot(steps, np.full(len(steps), 0.02), "|", color=method_style("golore@auto")["color"], ms=12,
               label="GoLore@auto switches (all seeds, layers)")
    b.set_ylim(0, 1.02)
    b.set_xlabel("step")
    b.set_ylabel("captured fraction κ of the true gradient")
    b.set_title("Full AdamW: what the SVD of one batch captures", fontsize=10)
    b.legend(fontsize=7, loc="center right")

    summary = kappa_summary(frame).set_index("layer")
    records = switches(frame)
    total = int(curves.step.max())
    auto_style = method_style("golore@auto")
    for seed, d in records.groupby("seed"):
        x = summary.loc[d.layer, "late"].to_numpy()
        never = d.switch_step.isna().to_numpy()
        c.scatter(x[~never], d.switch_step[~never], s=18, color=auto_style["color"], marker=auto_style["marker"],
                  alpha=0.7)
        c.scatter(x[never], np.full(never.sum(), total), s=18, facecolors="none", edgecolors=auto_style["color"],
                  marker=auto_style["marker"], alpha=0.7)
    c.axvline(r_over, color=GREY, ls="--", lw=1)
    c.axhline(total, color=GREY, lw=0.8)
    c.set_xlabel("layer's κ late in training (mean over the last 20% of the full-AdamW run)")
    c.set_ylabel(f"GoLore@auto switch step (hollow, at {total}: never)")
    c.set_title("Each layer's switch (one marker per layer and seed)", fontsize=10)
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
