"""Why full AdamW loses at CPU size: Full, GaLore and GoLore@20% at batches of 8, 32 and 128 sequences.

At the ``cpu`` size of Figure 3 (:mod:`golore_lab.artefacts.fig3_pretrain`: 160 AdamW steps of 8 × 128 tokens)
full AdamW ends with a *higher* validation perplexity than GaLore, while the paper (batch 512) finds full
training best. One explanation: with a batch this small the gradient is mostly noise, and the top-r SVD of a
noisy gradient keeps its largest directions and drops much of the noise. This artefact measures how the gap
full − GaLore and the SVD's captured fraction κ move with the batch.

Same tokens, not same steps. Every run sees the same number of sequences, ``sequences`` (1280 = Figure 3's
160 × 8), so batch B trains ``sequences / B`` steps (160, 40, 10): equal compute, the budget a user has. The
same *steps* at batch 128 would cost 16× Figure 3 (about 8 hours on 2 cores). The schedule scales with the
step count (:func:`schedule`) so that every run has the same *fraction* of warm-up (10%), the same number of
subspace refreshes (10: τ = ``update_proj_gap`` = 16, 4, 1), and its evaluations at the same token positions
(every 1/10 of the run); GoLore@20% switches to random subspaces at 80% of the run at every batch. At batch 8
the runs are Figure 3's (:func:`train_config` gives the same recipe; the final seeds are Figure 3's seeds).

Three parts, all AdamW, the ``cpu`` model and task of Figure 3:

* ``tune``: per (batch, method), the learning rates of ``lrs`` with seed ``tune_seed`` (not a final seed). The
  best is the lowest final *validation* loss (a diverged run counts as inf). When the best is at an edge of
  the grid the grid is extended by one point beyond it on the half-decade ladder 1e-3, 3e-3, 1e-2, 3e-2, ...
  (:func:`ladder_step`) and that point is run, until the best is inside (:func:`next_lr`; at most
  ``max_extensions`` points per grid, after which the table marks the lr as at an edge). The grid actually used
  is the set of tune runs in the frame (:func:`tuning`).
* ``final``: each (batch, method) at its tuned lr with ``seeds``; seed s of every method and batch starts from
  the same weights, and the runs of one batch see the same sequences, so differences are paired by seed
  (:func:`paired`, Student-t intervals).
* ``kappa``: per batch, a full-AdamW run at that batch's tuned full lr (seed ``tune_seed``) along which
  :func:`golore_lab.lm.noise_study.run_study` measures, at the start, the middle and the end, for each attention
  and MLP matrix, the fraction κ of its true gradient (``reference_windows`` fixed training windows) captured by
  the top-r SVD of *one batch of that size* (``svd``), next to what a random basis captures (r/dim).

The frame: one row per evaluation (``row = "curve"``: ``step, tokens, train_loss, val_loss, val_ppl``) and per
κ measurement (``row = "kappa"``: ``step, layer, dim, rank, svd, random, oracle, snr``); ``part, batch,
method, seed, lr`` identify the run, ``run_steps`` is its length. Presets: ``fast`` (the tiny model, batches
4 and 16, a few steps, 2 starting lrs, 1 seed: a smoke test of the path, not a result), ``default`` (the
figure and the docs' table: 3 starting lrs, 3 final seeds; its committed result is 61 single-thread training runs
of about a minute and 3 κ runs, 36 minutes of wall time with 2 worker processes on a shared 2-core machine),
``full`` (= default).
"""
from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plotting import GREY, method_label, method_style
from .fig6_when_to_switch import t_interval

NAME = "fig7_batch_size"
METHODS = ("full", "galore", "golore@20")
PARTS = ("tune", "final", "kappa")


@dataclass(frozen=True)
class Config:
    """``seq_len`` None: the model's context. Per batch B: ``sequences / B`` steps (see :func:`schedule`)."""

    preset: str
    model: str
    batches: tuple[int, ...]
    sequences: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    tune_seed: int = 3
    eval_windows: int = 48
    seq_len: int | None = None
    warmup_fraction: float = 0.1
    refreshes: int = 10
    evals: int = 10
    kappa_points: int = 2
    reference_windows: int = 256
    max_extensions: int = 4
    methods: tuple[str, ...] = METHODS


PRESETS = {
    "fast": Config("fast", "tiny", (4, 16), 160, (3e-3, 1e-2), (1,), tune_seed=0, eval_windows=16,
                   reference_windows=32, max_extensions=2),
    "default": Config("default", "cpu", (8, 32, 128), 1280, (1e-3, 3e-3, 1e-2), (0, 1, 2)),
    "full": Config("full", "cpu", (8, 32, 128), 1280, (1e-3, 3e-3, 1e-2), (0, 1, 2)),
}
GROUP_BY = ("part", "batch", "method", "seed")


def expected_groups(config: Config) -> list[tuple]:
    return ([("tune", b, m, config.tune_seed) for b in config.batches for m in config.methods]
            + [("final", b, m, s) for b in config.batches for m in config.methods for s in config.seeds]
            + [("kappa", b, "full", config.tune_seed) for b in config.batches])


# ------------------------------------------------------------------------------------------------ schedule
def _whole(value: float, what: str) -> int:
    if abs(value - round(value)) > 1e-9 or round(value) < 1:
        raise ValueError(f"Invalid {what}: {value:g} (must be a whole number >= 1)")
    return int(round(value))


def schedule(config: Config, batch: int) -> dict[str, int]:
    """The run length and the step counts that scale with it at ``batch``: ``steps = sequences / batch``,
    ``warmup_steps = warmup_fraction × steps``, ``update_proj_gap = steps / refreshes``, ``eval_every = steps /
    evals``; each must be a whole number (else ``ValueError``), so every batch has the same fractions exactly."""
    steps = _whole(config.sequences / batch, f"steps (sequences {config.sequences} / batch {batch})")
    out = {"steps": steps,
           "warmup_steps": _whole(config.warmup_fraction * steps,
                                  f"warmup_steps ({config.warmup_fraction:g} × {steps})"),
           "update_proj_gap": _whole(steps / config.refreshes, f"update_proj_gap ({steps} / {config.refreshes})"),
           "eval_every": _whole(steps / config.evals, f"eval_every ({steps} / {config.evals})")}
    return out


def train_config(config: Config, batch: int, method: str, lr: float, seed: int):
    """The :class:`golore_lab.lm.train.TrainConfig` of one run: the model's recipe at ``batch`` with
    :func:`schedule`'s step counts (at batch 8 of the default preset: Figure 3's recipe, except ``lr``)."""
    from ..lm.pretrain import recipe

    return recipe(config.model, method=method, optimizer="adamw", lr=lr, seed=seed, batch_size=batch,
                  progress=False, **schedule(config, batch))


# ------------------------------------------------------------------------------------------------ lr grid
def ladder_step(lr: float, direction: int) -> float:
    """The neighbour of ``lr`` on the half-decade ladder ..., 3e-4, 1e-3, 3e-3, 1e-2, ... (10^(k/2) to one
    significant digit) one step up (``direction`` +1) or down (−1); ``lr`` must be on the ladder."""
    k = round(2 * math.log10(lr))
    if not math.isclose(lr, _rung(k), rel_tol=1e-9):
        raise ValueError(f"Invalid lr: {lr:g} (not on the half-decade ladder 1e-3, 3e-3, 1e-2, ...)")
    return _rung(k + direction)


def _rung(k: int) -> float:
    return float(f"{10 ** (k / 2):.0e}")


def best_lr(losses: dict[float, float]) -> float:
    """The lr with the lowest loss (ties: the smaller lr; an all-inf grid: its smallest lr)."""
    return min(losses, key=lambda lr: (losses[lr], lr))


def next_lr(losses: dict[float, float], start: tuple[float, ...], max_extensions: int) -> float | None:
    """The next lr a grid search must run, or None when it is done.

    ``losses``: final validation loss per lr run so far (inf: diverged); ``start``: the starting grid. First
    every point of ``start``; then, while the best is the smallest (largest) lr run, the ladder's next point
    below (above) it, at most ``max_extensions`` of them; None once the best is inside the grid, or the
    extensions are spent."""
    missing = [lr for lr in start if lr not in losses]
    if missing:
        return missing[0]
    if len(set(losses) - set(start)) >= max_extensions:
        return None
    grid = sorted(losses)
    best = best_lr(losses)
    if best == grid[0]:
        return ladder_step(best, -1)
    if best == grid[-1]:
        return ladder_step(best, +1)
    return None


def search(run_one, start: tuple[float, ...], max_extensions: int) -> dict[float, float]:
    """:func:`next_lr`'s search, one run at a time: ``run_one(lr) -> final validation loss``; returns the losses
    of every lr run (the grid actually used). :func:`run` makes the same decisions with runs in parallel."""
    losses: dict[float, float] = {}
    while (lr := next_lr(losses, start, max_extensions)) is not None:
        losses[lr] = float(run_one(lr))
    return losses


# ------------------------------------------------------------------------------------------------ runs
def _task(config: Config):
    from ..lm.data import ensure_corpus
    from ..lm.model import LlamaConfig
    from ..lm.pretrain import LMTask

    return LMTask(ensure_corpus(log=lambda *_: None), LlamaConfig.preset(config.model), seq_len=config.seq_len,
                  eval_windows=config.eval_windows)


def _train_job(config: Config, part: str, batch: int, method: str, lr: float, seed: int) -> pd.DataFrame:
    """One training run (in a worker process, one thread): its evaluations."""
    import torch

    from ..lm.train import RunError, train

    torch.set_num_threads(1)
    cfg = train_config(config, batch, method, lr, seed)
    start = time.perf_counter()
    try:
        result = train(_task(config), cfg)
    except RunError:  # diverged: a final loss of inf, which tuning never selects
        curve = pd.DataFrame({"step": [cfg.steps], "tokens": [math.nan], "train_loss": [math.nan],
                              "val_loss": [math.inf], "val_ppl": [math.inf]})
    else:
        curve = pd.DataFrame([h for h in result.history if "val_loss" in h]).reindex(
            columns=["step", "tokens", "train_loss", "val_loss", "val_ppl"])
    return curve.assign(row="curve", part=part, batch=batch, method=method, seed=seed, lr=lr, run_steps=cfg.steps,
                        run_seconds=time.perf_counter() - start)


def _kappa_job(config: Config, batch: int, lr: float) -> pd.DataFrame:
    """κ of one batch of ``batch`` sequences along a full-AdamW run at ``batch`` and ``lr``
    (:func:`golore_lab.lm.noise_study.run_study`): at steps 0, steps / kappa_points, ..., steps."""
    import torch

    from ..lm.noise_study import run_study

    torch.set_num_threads(1)
    sched = schedule(config, batch)
    start = time.perf_counter()
    every = _whole(sched["steps"] / config.kappa_points, f"kappa every ({sched['steps']} / {config.kappa_points})")
    frame = run_study(model=config.model, steps=sched["steps"], every=every, batch_size=batch, large_factor=1,
                      reference_windows=config.reference_windows, seed=config.tune_seed, log=lambda *_: None,
                      lr=lr, warmup_steps=sched["warmup_steps"])
    frame = frame[["step", "layer", "dim", "rank", "svd", "random", "oracle", "snr", "val_loss"]]
    return frame.assign(row="kappa", part="kappa", batch=batch, method="full", seed=config.tune_seed, lr=lr,
                        run_steps=sched["steps"], run_seconds=time.perf_counter() - start)


COLUMNS = ["part", "batch", "method", "seed", "lr", "row", "run_steps", "step", "tokens", "train_loss", "val_loss",
           "val_ppl", "layer", "dim", "rank", "svd", "random", "oracle", "snr", "run_seconds"]


def _last_loss(frame: pd.DataFrame) -> float:
    last = frame[frame.step == frame.run_steps]
    return float(last.val_loss.iloc[-1]) if len(last) else math.inf


def run(config: Config, workers: int = 2, log=print, executor=None) -> pd.DataFrame:
    """The three parts, ``workers`` runs at a time (one thread each). Each (batch, method) grid decides its next
    point (:func:`next_lr`) as soon as its runs are in, its final seeds start once it is done, and each batch's
    κ run once its full-AdamW lr is tuned. The result does not depend on the order the runs finish in.
    ``executor``: the pool (default: ``workers`` spawned processes; the tests pass threads)."""
    start = time.perf_counter()
    if executor is None:  # fresh interpreters: no inherited thread pools or RNG state
        executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    losses = {(b, m): {} for b in config.batches for m in config.methods}
    running = {key: 0 for key in losses}
    frames, pending = [], {}
    with executor as pool:
        def submit(fn, *args, info):
            pending[pool.submit(fn, config, *args)] = info

        for b in sorted(config.batches, reverse=True):  # the short-step grids tend to extend: start them first
            for m in config.methods:
                for lr in config.lrs:
                    submit(_train_job, "tune", b, m, lr, config.tune_seed, info=("tune", b, m, lr))
                    running[(b, m)] += 1
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for job in sorted(done, key=lambda j: pending[j]):
                part, b, m, lr = pending.pop(job)[:4]
                f = job.result()
                frames.append(f)
                what = (f"kappa batch {b} lr {lr:g}" if part == "kappa" else
                        f"{part} batch {b} {m} lr {lr:g} seed {f.seed.iloc[0]}: val loss {_last_loss(f):.4f}")
                log(f"{NAME}: {what} ({f.run_seconds.iloc[0]:.0f} s, total {time.perf_counter() - start:.0f} s)")
                if part != "tune":
                    continue
                losses[(b, m)][lr] = _last_loss(f)
                running[(b, m)] -= 1
                if running[(b, m)]:
                    continue
                nxt = next_lr(losses[(b, m)], config.lrs, config.max_extensions)
                if nxt is not None:
                    submit(_train_job, "tune", b, m, nxt, config.tune_seed, info=("tune", b, m, nxt))
                    running[(b, m)] += 1
                    continue
                best = best_lr(losses[(b, m)])
                grid = sorted(losses[(b, m)])
                log(f"{NAME}: batch {b} {m}: tuned lr {best:g} on the grid {[f'{x:g}' for x in grid]}"
                    + ("" if grid[0] < best < grid[-1] else " (AT AN EDGE: extensions spent)"))
                for s in config.seeds:
                    submit(_train_job, "final", b, m, best, s, info=("final", b, m, best, s))
                if m == "full":
                    submit(_kappa_job, b, best, info=("kappa", b, m, best))
    log(f"{NAME}: done ({time.perf_counter() - start:.0f} s)")
    return _ordered(pd.concat(frames, ignore_index=True).reindex(columns=COLUMNS), config)


def _ordered(frame: pd.DataFrame, config: Config) -> pd.DataFrame:
    """A fixed row order (part, batch, method, seed, lr, then each run's own order), whatever order runs ended in."""
    keys = pd.DataFrame({"_p": frame.part.map({p: i for i, p in enumerate(PARTS)}),
                         "_m": frame.method.map({m: i for i, m in enumerate(config.methods)}),
                         "_i": np.arange(len(frame))})
    out = pd.concat([frame, keys], axis=1).sort_values(["_p", "batch", "_m", "seed", "lr", "_i"], kind="stable")
    return out.drop(columns=["_p", "_m", "_i"]).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ analysis
def _last_rows(frame: pd.DataFrame, part: str) -> pd.DataFrame:
    curves = frame[(frame.part == part) & (frame.row == "curve")]
    return curves[curves.step == curves.run_steps]


def tuning(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (batch, method): the grid actually run, the tuned lr (lowest final validation loss of the ``tune``
    part), whether it is inside the grid, and the number of points run."""
    last = _last_rows(frame, "tune")
    rows = []
    for (b, m), d in last.groupby(["batch", "method"], sort=False):
        losses = dict(zip(d.lr.astype(float), d.val_loss.astype(float)))
        best, grid = best_lr(losses), sorted(losses)
        rows.append({"batch": int(b), "method": m, "grid": grid, "lr": best, "inside": grid[0] < best < grid[-1],
                     "points": len(grid), "tune_loss": losses[best]})
    return pd.DataFrame(rows)


def tuned_lrs(frame: pd.DataFrame) -> dict[tuple[int, str], float]:
    """{(batch, method): tuned lr}."""
    return {(r.batch, r.method): r.lr for r in tuning(frame).itertuples()}


def final_losses(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (batch, method, seed) of the ``final`` part: the last evaluation's val_loss, val_ppl, and lr."""
    return _last_rows(frame, "final")[["batch", "method", "seed", "lr", "val_loss", "val_ppl"]].reset_index(drop=True)


def paired(frame: pd.DataFrame, baseline: str = "galore", metric: str = "val_loss") -> pd.DataFrame:
    """Per (batch, method ≠ ``baseline``): mean and 95% t-interval of (method − baseline), paired by seed."""
    finals = final_losses(frame)
    rows = []
    for b, d in finals.groupby("batch", sort=True):
        wide = d.pivot(index="seed", columns="method", values=metric)
        for m in dict.fromkeys(d.method):
            if m == baseline or baseline not in wide:
                continue
            diff = (wide[m] - wide[baseline]).dropna().to_numpy()
            mean, low, high = t_interval(diff)
            rows.append({"batch": int(b), "method": m, "metric": metric, "mean": mean, "low": low, "high": high,
                         "seeds": len(diff)})
    return pd.DataFrame(rows)


def kappa_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per batch and measured step: κ of the SVD of one batch (``svd``), of a random basis and of the true
    gradient's own SVD (``oracle``), means over the layers; ``position`` = step / run_steps; r/dim."""
    kappa = frame[frame.row == "kappa"]
    out = kappa.groupby(["batch", "step"], sort=True).agg(
        run_steps=("run_steps", "first"), svd=("svd", "mean"), svd_min=("svd", "min"), svd_max=("svd", "max"),
        random=("random", "mean"), oracle=("oracle", "mean"), snr=("snr", "mean"),
        r_over_dim=("rank", "first"), dim=("dim", "first")).reset_index()
    out["r_over_dim"] = out.r_over_dim / out.dim
    out["position"] = out.step / out.run_steps
    return out.drop(columns="dim")


def kappa_by_batch(frame: pd.DataFrame) -> pd.DataFrame:
    """Per batch: κ (SVD of one batch, mean over layers) at the start, middle and end, their mean, and r/dim."""
    s = kappa_summary(frame)
    rows = []
    for b, d in s.groupby("batch", sort=True):
        d = d.sort_values("step")
        rows.append({"batch": int(b), "start": d.svd.iloc[0], "middle": d.svd.iloc[len(d) // 2],
                     "end": d.svd.iloc[-1], "mean": d.svd.mean(), "r_over_dim": d.r_over_dim.iloc[0]})
    return pd.DataFrame(rows)


def _ci(r, digits: int) -> str:
    if math.isnan(r["low"]):
        return f"{r['mean']:+.{digits}f}"
    return f"{r['mean']:+.{digits}f} [{r['low']:+.{digits}f}, {r['high']:+.{digits}f}]"


def _pm(values: pd.Series, digits: int) -> str:
    """mean ± std (ddof 1); the mean alone for one value."""
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def _lr_cell(r) -> str:
    return f"{r.lr:g}" + ("" if r.inside else " (edge)")


def table(frame: pd.DataFrame) -> str:
    """Per batch × method: steps, the lr grid run, the tuned lr, final validation loss / perplexity (mean ± std)
    and the paired difference to GaLore (95% CI); then κ of one batch per batch size."""
    finals = final_losses(frame)
    tune = tuning(frame).set_index(["batch", "method"])
    diffs = {metric: paired(frame, metric=metric).set_index(["batch", "method"]) for metric in ("val_loss", "val_ppl")}
    kappa = kappa_by_batch(frame).set_index("batch")
    steps = frame[frame.part == "final"].groupby("batch").run_steps.first()
    lines = ["| batch | steps | method | lr grid run | tuned lr | val. loss | val. ppl | − GaLore: loss (95% CI) | "
             "− GaLore: ppl (95% CI) | κ (one batch) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (b, m), d in finals.groupby(["batch", "method"], sort=False):
        t = tune.loc[(b, m)]
        cells = [str(int(b)), str(int(steps[b])), method_label(m), ", ".join(f"{x:g}" for x in t.grid),
                 _lr_cell(t), _pm(d.val_loss, 4), _pm(d.val_ppl, 2)]
        for metric, digits in (("val_loss", 4), ("val_ppl", 2)):
            cells.append(_ci(diffs[metric].loc[(b, m)], digits) if (b, m) in diffs[metric].index else "")
        cells.append(f"{kappa.loc[b, 'mean']:.3f}" if b in kappa.index else "")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = int(finals.groupby(["batch", "method"]).seed.nunique().min())
    klines = ["| batch | κ start | κ middle | κ end | κ mean | r/dim |", "|---|---|---|---|---|---|"]
    for b, r in kappa.iterrows():
        klines.append(f"| {int(b)} | {r.start:.3f} | {r.middle:.3f} | {r.end:.3f} | {r['mean']:.3f} | "
                      f"{r.r_over_dim:g} |")
    return ("\n".join(lines) + f"\n\nSame tokens per run ({int((steps * steps.index).iloc[0])} sequences): final "
            f"validation loss and perplexity, mean ± std over {_seeds(seeds)} at each (batch, method)'s tuned "
            "learning rate (tuned on a separate seed; \"(edge)\": the best lr is at an edge of the grid run); "
            "differences paired by seed. κ: the fraction of the true gradient captured by the top-r SVD of one "
            "batch, mean over the layers and over the start, middle and end of a full-AdamW run at that batch:\n\n"
            + "\n".join(klines) + "\n")


def _describe_gap(rows: pd.DataFrame) -> str:
    """What the CIs of full − GaLore say, per batch, in words: above / below / contains 0."""
    parts = []
    for r in rows.itertuples():
        where = ("> 0" if r.low > 0 else "< 0" if r.high < 0 else "CI contains 0") if not math.isnan(r.low) else \
            ("> 0" if r.mean > 0 else "< 0") + " (1 seed, no CI)"
        parts.append(f"B={r.batch}: {where}")
    return ", ".join(parts)


def plot(frame: pd.DataFrame) -> plt.Figure:
    """(a) final validation loss against the batch per method; (b) the paired differences to GaLore; (c) κ."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15.5, 4.4))
    finals = final_losses(frame)
    batches = sorted(finals.batch.unique())
    tune = tuning(frame).set_index(["batch", "method"])
    for k, (m, d) in enumerate(finals.groupby("method", sort=False)):
        stats = d.groupby("batch").val_loss.agg(["mean", "std"]).reindex(batches)
        x = np.array(batches, dtype=float) * (1 + 0.04 * (k - 1))  # a small offset: the error bars stay apart
        style = method_style(m, label=method_label(m))
        a.errorbar(x, stats["mean"], yerr=stats["std"].fillna(0), capsize=3, **style)
        for xi, bi, yi in zip(x, batches, stats["mean"]):
            a.annotate(f"{tune.loc[(bi, m), 'lr']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                       fontsize=6, color=style["color"])
    seeds = int(finals.groupby(["batch", "method"]).seed.nunique().min())
    a.set_ylabel("final validation loss")
    a.set_title(f"Final val. loss at the tuned lr (labels), mean ± std over {_seeds(seeds)}", fontsize=10)
    a.legend(fontsize=8)

    diffs = paired(frame)
    for m, d in diffs.groupby("method", sort=False):
        d = d.sort_values("batch")
        low, high = (d["mean"] - d.low).fillna(0), (d.high - d["mean"]).fillna(0)
        b.errorbar(d.batch, d["mean"], yerr=[low, high], capsize=3,
                   **method_style(m, label=f"{method_label(m)} − GaLore"))
    b.axhline(0, color=GREY, lw=1)
    b.set_ylabel("paired difference of final val. loss (95% CI)")
    full = diffs[diffs.method == "full"].sort_values("batch")
    b.set_title("Full − GaLore: " + _describe_gap(full), fontsize=10)
    b.legend(fontsize=8)

    ks = kappa_summary(frame)
    style = method_style("galore")
    for pos, marker, ls in ((0.0, "o", ":"), (0.5, "s", "--"), (1.0, "^", "-")):
        d = ks[np.isclose(ks.position, pos)].sort_values("batch")
        c.plot(d.batch, d.svd, color=style["color"], marker=marker, ls=ls, ms=5,
               label=f"SVD of one batch, {'start' if pos == 0 else 'middle' if pos == 0.5 else 'end'} of the run")
    r_over = float(ks.r_over_dim.iloc[0])
    c.axhline(r_over, color=GREY, ls="--", lw=1, label=f"random basis: r/dim = {r_over:g}")
    c.set_ylim(0, 1.02)
    c.set_ylabel("captured fraction κ of the true gradient\n(mean over layers)")
    by = kappa_by_batch(frame)
    c.set_title("κ of one batch, mean over start/middle/end: " + ", ".join(
        f"{r.batch}: {r.mean:.2f}" for r in by.itertuples()), fontsize=10)
    c.legend(fontsize=7, loc="lower right")
    for ax in (a, b, c):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(x) for x in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch (sequences per step; steps = budget / batch)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
