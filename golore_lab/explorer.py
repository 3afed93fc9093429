"""The counterexample explorer of notebook 01: move ν, r, B, τ, η, the optimizer and the noise law by hand.

:func:`compute` runs Full, GaLore, L.B. GaLore (batch B) and GoLore on the counterexample with the fast engine
(:func:`golore_lab.counterexample.run`, ``engine="fast"``) and :func:`draw` plots, per method, the loss above
f*, the captured fraction κ(t) = ‖Pᵀ∇f‖²/‖∇f‖² against r/m and the largest singular value of M_t against the
noise level ν. :func:`figure` is the two together, the explorer's callback (about a second at the defaults).
:func:`show` puts it behind ipywidgets controls and displays one output that is the live explorer where
widgets render and a PNG of the default settings where they do not (the web view of a committed notebook)::

    from golore_lab import explorer
    explorer.show()
"""
from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass, replace

import matplotlib.pyplot as plt
import pandas as pd

from . import counterexample as ce
from . import theory as th
from .plotting import GREY, band_plot, legend_below

METHODS = ("full", "galore", "lb-galore", "golore@100")
NOISE_LAWS = {"±1 (two-point)": "anisotropic", "Gaussian": "gaussian"}
#: τ values offered (each divides the explorer's 4000 steps)
GAPS = (1, 2, 5, 10, 20, 50, 100, 200)


@dataclass(frozen=True)
class Settings:
    """One position of the explorer's controls (validated by :func:`golore_lab.counterexample.run`)."""

    noise_sigma: float = 1.0   # ν, the noise level (D and X₀ stay those of σ = 1)
    rank: int = 4              # r (also the size of the noise block: it changes k = n − r and D)
    batch: int = 3             # L.B. GaLore's refresh batch B
    update_proj_gap: int = 10  # τ
    lr: float = 3e-3           # η
    optimizer: str = "sgd"     # "sgd" (no momentum) or "adamw"
    noise: str = "anisotropic"  # "anisotropic" (ξ = ±1) or "gaussian" (ξ ~ N(0, 1)), same rows, same covariance
    steps: int = 4000
    seeds: int = 3

    @property
    def log_every(self) -> int:
        """A multiple of τ near steps/100 (SGD runs whole periods in closed form between logs)."""
        return self.update_proj_gap * max(1, -(-self.steps // (100 * self.update_proj_gap)))


def problem_of(settings: Settings) -> ce.Counterexample:
    return ce.Counterexample(r=settings.rank, noise=settings.noise, noise_sigma=settings.noise_sigma)


def compute(settings: Settings) -> pd.DataFrame:
    """Mean, min and max over the seeds of loss − f*, κ and the largest sᵢ(M), per method and logged step.

    Long form: ``method, step, quantity, mean, min, max`` with ``quantity`` in ``gap`` (loss − f*),
    ``captured``, ``top_sv``.
    """
    if settings.steps % settings.log_every:
        raise ValueError(f"Invalid update_proj_gap: {settings.update_proj_gap!r} (must divide steps = {settings.steps} "
                         f"in whole logging intervals; try one of {GAPS})")
    problem = problem_of(settings)
    frame = ce.run(problem, methods=METHODS, optimizer=settings.optimizer, steps=settings.steps, lr=settings.lr,
                   update_proj_gap=settings.update_proj_gap, seeds=range(settings.seeds), batch=settings.batch,
                   log_every=settings.log_every, engine="fast")
    frame["gap"] = frame["loss"] - problem.f_star
    parts = [frame.groupby(["method", "step"], sort=False)[q].agg(["mean", "min", "max"]).reset_index()
             .assign(quantity=q) for q in ("gap", "captured", "top_sv")]
    return pd.concat(parts, ignore_index=True)


def draw(summary: pd.DataFrame, settings: Settings) -> plt.Figure:
    """Three panels: loss − f* (log scale, with the ±1 law's closed-form stalls), κ(t) against r/m, top sᵢ(M_t)."""
    problem = problem_of(settings)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.9))
    gap, kappa, top = (summary[summary.quantity == q] for q in ("gap", "captured", "top_sv"))
    floor = 1e-8  # loss − f* is drawn on a log scale; rounding can put it at or below 0
    band_plot(axes[0], gap.assign(**{c: gap[c].clip(lower=floor) for c in ("mean", "min", "max")}))
    axes[0].set_yscale("log")
    axes[0].set_ylim(floor / 2, None)
    if settings.noise == "anisotropic":
        axes[0].axhline(problem.galore_plateau - problem.f_star, color=GREY, ls=":", lw=1.2,
                        label="GaLore's stall ½Σmin(sᵢ, ν)²")
        lb = th.lb_galore_plateau(problem, settings.batch) - problem.f_star
        if lb > 0:
            axes[0].axhline(lb, color=GREY, ls="-.", lw=1.0, label=f"L.B. stall ½Σmin(sᵢ, ν/{settings.batch})²")
    axes[0].set(ylabel=f"loss − f*  (floored at {floor:g})", title="how far from the optimum")
    band_plot(axes[1], kappa)
    axes[1].axhline(problem.r / problem.n, color="k", ls="--", lw=0.9, label=f"r/m = {problem.r / problem.n:g}")
    axes[1].set(ylabel="κ = ‖Pᵀ∇f‖² / ‖∇f‖²", ylim=(-0.03, 1.03), title="what the subspace captures")
    band_plot(axes[2], top)
    axes[2].axhline(problem.noise_sigma, color=GREY, ls=":", lw=1.2, label=f"ν = {problem.noise_sigma:.3g}")
    axes[2].set(ylabel="largest sᵢ(M_t)", title="largest singular value of M = X₁₁ + D")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
        legend_below(ax, ncol=2, y=-0.2)
    law = next(name for name, value in NOISE_LAWS.items() if value == settings.noise)
    fig.suptitle(f"{settings.optimizer.upper()}, ν = {settings.noise_sigma:.3g}, r = {settings.rank}, B = {settings.batch},"
                 f" τ = {settings.update_proj_gap}, η = {settings.lr:.2g}, noise ξ {law}; mean and min–max over "
                 f"{settings.seeds} seeds", fontsize=10)
    fig.tight_layout()
    return fig


def png(fig: plt.Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, then closed (100 dpi: a third less time to render than the package's 130)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def figure(**controls) -> plt.Figure:
    """The explorer's callback: :func:`draw` of :func:`compute` at ``Settings(**controls)``."""
    settings = Settings(**controls)
    return draw(compute(settings), settings)


# ----------------------------------------------------------------------------------------------------- widgets
def controls(settings: Settings = Settings()) -> dict:
    """One ipywidgets control per setting the explorer moves (``continuous_update=False``: a run per release)."""
    import ipywidgets as w

    style, layout = {"description_width": "150px"}, w.Layout(width="420px")
    common = dict(continuous_update=False, style=style, layout=layout)
    return {
        "noise_sigma": w.FloatLogSlider(value=settings.noise_sigma, base=10, min=-1.3, max=0.6, step=0.05,
                                        description="ν (noise level)", readout_format=".3g", **common),
        "rank": w.IntSlider(value=settings.rank, min=1, max=8, description="r (rank)", **common),
        "batch": w.IntSlider(value=settings.batch, min=1, max=12, description="B (L.B. GaLore batch)", **common),
        "update_proj_gap": w.SelectionSlider(value=settings.update_proj_gap, options=GAPS, description="τ (refresh gap)",
                                             **common),
        "lr": w.FloatLogSlider(value=settings.lr, base=10, min=-4, max=-1, step=0.1, description="η (step size)",
                               readout_format=".2g", **common),
        "optimizer": w.ToggleButtons(value=settings.optimizer, options=["sgd", "adamw"], description="optimizer",
                                     style=style),
        "noise": w.ToggleButtons(value=settings.noise, options=list(NOISE_LAWS.items()), description="noise law ξ",
                                 style=style),
    }


class Explorer:
    """The widgets and their output; displayed, it is the live explorer or, where widgets do not render, a PNG."""

    def __init__(self, settings: Settings = Settings()):
        import ipywidgets as w

        self.settings = settings
        self.controls = controls(settings)
        self.output = w.Output()
        self.status = w.HTML()
        self.box = w.VBox([w.HBox([w.VBox(list(self.controls.values())[:4]),
                                   w.VBox(list(self.controls.values())[4:] + [self.status])]), self.output])
        self.png, self.summary = b"", None
        self.update()
        for control in self.controls.values():
            control.observe(lambda change: self.update(), names="value")

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def update(self) -> bytes:
        """Re-run at the controls' values and replace the figure (the widgets' callback); returns the PNG
        (empty, keeping the last figure, if the optimizers refuse a setting)."""
        import time

        from IPython.display import Image, clear_output, display

        self.settings = replace(self.settings, **self.values())
        self.status.value = "<i>running…</i>"
        start = time.perf_counter()
        try:
            summary = compute(self.settings)
            image = png(draw(summary, self.settings))
        except ValueError as error:  # a setting the optimizers refuse: say so, keep the last figure
            self.status.value = f"<b>{error}</b>"
            return b""
        self.summary, self.png = summary, image  # what the figure shows (explorer.final reads the summary)
        with self.output:
            clear_output(wait=True)
            display(Image(image))
        self.status.value = f"ran in {time.perf_counter() - start:.1f} s"
        return image

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.box._repr_mimebundle_(**kwargs)
        if self.png:
            bundle["image/png"] = base64.b64encode(self.png).decode("ascii")
        bundle["text/plain"] = (f"Counterexample explorer at {asdict(self.settings)} (run the cell in Jupyter to move "
                                "the controls)")
        return bundle


def show(**controls_at) -> Explorer:
    """Display the explorer (controls start at ``Settings(**controls_at)``) and return it."""
    from IPython.display import display

    explorer = Explorer(Settings(**controls_at))
    display(explorer)
    return explorer


def final(summary: pd.DataFrame, quantity: str = "gap") -> pd.Series:
    """The last logged mean of ``quantity`` per method."""
    rows = summary[summary.quantity == quantity]
    return rows[rows.step == rows.step.max()].set_index("method")["mean"]

